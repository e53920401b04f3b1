# Stub of the extension fastsgd._native.stepper (the step and the functional entry).
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from typing_extensions import disjoint_base

@disjoint_base
class SGDStepper:
    amp_unscale: bool
    amp_inv_scale: float
    amp_skipped: bool
    def step(self, param_groups: list[dict[str, Any]], state: Any) -> None: ...
    def validate(self, param_groups: list[dict[str, Any]], state: Any) -> None: ...

def sgd(params: Iterable[np.ndarray], grads: Iterable[np.ndarray | None],
        momentum_buffers: Sequence[np.ndarray | None],
        options: dict[str, Any]) -> list[tuple[int, np.ndarray]]: ...
