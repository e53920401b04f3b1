# Stub of the extension fastsgd._native.roofline (the benchmark's rooflines).
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from typing_extensions import disjoint_base

@disjoint_base
class Roofline:
    def __init__(self, params: Iterable[np.ndarray], grads: Iterable[np.ndarray],
                 momentum_buffers: Sequence[np.ndarray], read_objects: bool = False,
                 masters: Sequence[np.ndarray] | None = None) -> None: ...
    def __call__(self) -> None: ...

@disjoint_base
class TorchApiFloor:
    def __init__(self, params: Iterable[Any], bump: Callable[[list[Any]], None]) -> None: ...
    def __call__(self) -> None: ...
