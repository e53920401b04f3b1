# Stub of the extension fastsgd._native.tensors (torch tensors on the kernel).
from typing import Any

from typing_extensions import disjoint_base

DIFFERENTIABLE: str
FUSED: str
UNSUPPORTED_DTYPE: str

@disjoint_base
class TensorStepper:
    def step(self, param_groups: list[dict[str, Any]], state: Any) -> None: ...

def _set_exchange_api(enabled: bool) -> bool: ...
