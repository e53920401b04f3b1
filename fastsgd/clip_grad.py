"""Gradient clipping with torch.nn.utils' interface, over fastsgd Parameters.

Each grad's norm is computed natively in one call for all grads of a dtype,
accumulated in double in a fixed order (8 interleaved partial results:
csrc/clip_loop.h), then rounded to the grad's dtype.  As in torch, the total
is the norm of those norms, in float64 if any grad is float64 and float32
otherwise, and every grad is multiplied by min(max_norm / (total + 1e-6), 1).
torch accumulates each grad's norm in its own order and precision, so totals
and clipped grads agree with torch's to within a few units in the last place
of the dtype (tests/test_clip_grad.py: rtol 1e-5 for float32, 1e-12 for
float64), not bit for bit.  ``clip_grad_value_`` is exact.

float16 and bfloat16 grads: each norm is rounded to the grad's dtype, the
total is computed from those in float32 and rounded to their dtype, and the
scaling multiplies in float32 and rounds once, as torch does; grads of
several dtypes give a float32 total (float64 if any grad is float64), as
torch's type promotion does.
"""
import types
import warnings

import numpy as np

from . import _native

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _grads(parameters):
    """The grads of parameters that have one, and their positions."""
    if isinstance(parameters, np.ndarray):
        parameters = [parameters]
    present = [(i, p.grad) for i, p in enumerate(parameters) if p.grad is not None]
    return [g for _, g in present], [i for i, _ in present]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    """Scale the grads of ``parameters`` in place so that their total
    ``norm_type``-norm is at most ``max_norm``; return the total norm before
    clipping (a numpy float32 or float64 scalar).  ``foreach`` is accepted
    for torch compatibility: the native path is always taken."""
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=2)
    grads, positions = _grads(parameters)
    norm_type = float(norm_type)
    if not grads:
        return np.float32(0.0)
    _check_infinity_norm_sizes(norm_type, (g.size for g in grads))
    dtypes = [g.dtype for g in grads]
    norms = _native.grad_norms(grads, positions, norm_type)
    total, coef = _total_norm_and_coef(_common_dtype(dtypes), dtypes, norms, max_norm,
                                       norm_type, error_if_nonfinite)
    _native.scale_grads(grads, positions, float(coef))
    return total


def _check_infinity_norm_sizes(norm_type, sizes):
    """A max or min over no element has no value: torch's messages (its
    foreach path computes inf norms, linalg.vector_norm -inf ones)."""
    if np.isinf(norm_type) and any(size == 0 for size in sizes):
        raise RuntimeError(
            "_foreach_norm cannot compute the infinity norm on an empty tensor because "
            "the operation does not have an identity" if norm_type > 0 else
            "linalg.vector_norm cannot compute the -inf norm on an empty tensor because "
            "the operation does not have an identity")


def _total_norm_and_coef(dtype, grad_dtypes, norms, max_norm, norm_type, error_if_nonfinite):
    """The total norm and the clipping coefficient, from each grad's norm (in
    double, in the order of the grads) rounded to its dtype; ``dtype`` is the
    grads' common dtype (_common_dtype).  fastsgd.distributed computes its
    sharded total here too, from norms gathered across ranks, so that it is
    one process's."""
    per_grad = np.array([t.type(n) for t, n in zip(grad_dtypes, norms)], dtype=dtype)
    if dtype.itemsize == 2:  # numpy's norm has no 16-bit loops: float32, rounded back
        per_grad = per_grad.astype(np.float32)
    total = dtype.type(np.linalg.norm(per_grad, ord=norm_type))
    if error_if_nonfinite and not np.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`")
    with np.errstate(all="ignore"):
        coef = min(dtype.type(float(max_norm)) / (total + dtype.type(1e-6)), dtype.type(1.0))
    return total, coef


def _common_dtype(grad_dtypes):
    """torch's promotion of the grads' norms: their dtype if they share one,
    else float64 if any is float64, else float32."""
    dtypes = set(grad_dtypes)
    if len(dtypes) == 1:
        return dtypes.pop()
    return np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp the grads of ``parameters`` in place to [-clip_value, clip_value]."""
    clip_value = float(clip_value)
    grads, positions = _grads(parameters)
    _native.clamp_grads(grads, positions, -clip_value, clip_value)
