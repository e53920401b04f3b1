# Stub of the extension fastsgd._native.batch (pointer lists; no Python-level API).
from typing_extensions import disjoint_base

@disjoint_base
class Batch: ...

@disjoint_base
class Owners: ...
