"""fastsgd: torch.optim.SGD, bit for bit, on numpy arrays, in native code.

The kernel in use is chosen at import: the best this CPU runs, unless the
environment variable FASTSGD_CPU_CAPABILITY names another ("avx512",
"avx2", "portable", "default"; see available_capabilities()).  "default"
rounds as torch does at ATEN_CPU_CAPABILITY=default; the others as torch's
vectorised kernels (one fused multiply-add per multiply-add), bit-identical
to each other.  Steps use up to get_num_threads() OpenMP threads.
"""
import os as _os

from . import amp, autodiff, functional, lr_scheduler, reference, swa_utils
from ._native import (
    available_capabilities,
    cpu_capability,
    get_num_threads,
    has_openmp,
    set_cpu_capability,
    set_num_threads,
)
from .checkpoint import CheckpointError, load, save
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .optimizer import (
    Optimizer,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
    required,
)
from .parameter import Parameter
from .sgd import SGD

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "Optimizer",
    "Parameter",
    "SGD",
    "amp",
    "autodiff",
    "available_capabilities",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "cpu_capability",
    "functional",
    "get_num_threads",
    "get_total_norm",
    "has_openmp",
    "load",
    "lr_scheduler",
    "reference",
    "register_optimizer_step_post_hook",
    "register_optimizer_step_pre_hook",
    "required",
    "save",
    "set_cpu_capability",
    "set_num_threads",
    "swa_utils",
]

Parameter.__module__ = __name__
autodiff._register_when_imported()

if _os.environ.get("FASTSGD_CPU_CAPABILITY"):
    set_cpu_capability(_os.environ["FASTSGD_CPU_CAPABILITY"])
