# Stub of the extension fastsgd._native.plan (a group's staging and the plan cache).
from typing_extensions import disjoint_base

NO_AUTOGRAD: str

def parallel_staging_count() -> int: ...

@disjoint_base
class Staging: ...

@disjoint_base
class GroupPlan:
    new_buffers: list[tuple[int, object]]
    new_masters: list[tuple[int, object]]
