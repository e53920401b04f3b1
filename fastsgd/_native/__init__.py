"""fastsgd's native layer: one Cython module per concern over the C kernels in csrc/.

kernels (kernel choice and threads; owns the C library), objects.pxd (reading
arrays and Parameters on raw pointers), rules.pxd (the input rules and their
messages), batch (pointer lists and the arrays they hold), plan (a group's
staging and the plan cache), stepper (the step and the functional entry),
clip (clipping's, GradScaler's and averaging's loops), roofline (the benchmark's rooflines,
outside the step path) and tensors (torch tensors, imported by fastsgd.torch alone: it imports
torch).  This file gathers the names the rest of fastsgd uses.
"""
from .clip import clamp_grads, grad_norms, lerp_arrays, mean_arrays, scale_grads, unscale_grads
from .kernels import (
    available_capabilities,
    cpu_capability,
    get_num_threads,
    has_openmp,
    native_call_count,
    parallel_threshold,
    set_cpu_capability,
    set_num_threads,
)
from .plan import NO_AUTOGRAD, parallel_staging_count
from .roofline import Roofline, TorchApiFloor
from .stepper import SGDStepper, sgd

__all__ = [
    "NO_AUTOGRAD",
    "Roofline",
    "SGDStepper",
    "TorchApiFloor",
    "available_capabilities",
    "clamp_grads",
    "cpu_capability",
    "get_num_threads",
    "grad_norms",
    "has_openmp",
    "lerp_arrays",
    "mean_arrays",
    "native_call_count",
    "parallel_staging_count",
    "parallel_threshold",
    "scale_grads",
    "set_cpu_capability",
    "set_num_threads",
    "sgd",
    "unscale_grads",
]
