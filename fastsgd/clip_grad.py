"""Gradient clipping with torch.nn.utils' interface, over fastsgd Parameters.

Each grad's norm is computed natively in one call for all grads of a dtype,
accumulated in double in a fixed order (8 interleaved partial results:
csrc/clip_loop.h), then rounded to the grad's dtype.  As in torch, the total
is the norm of those norms, computed in their common dtype (float64 if any
grad is float64, else float32), and every grad is multiplied by
min(max_norm / (total + 1e-6), 1).  ``clip_grad_norm_`` is
``get_total_norm`` followed by ``clip_grads_with_norm_``, as torch's; given
the same total, ``clip_grads_with_norm_`` is exact, as is
``clip_grad_value_``.

Accuracy of the total, relative to the exact p-norm of all elements (the
bounds tests/test_clip_grad.py measures against math.fsum over the grads
converted to float64), with n the largest grad's element count, k the number
of grads, u the unit roundoff of the total's dtype (2**-24 for float32, 2**-53
for float64) and m = max(1, 1/p)::

    fastsgd:  m * ((n/8 + 4) * 2**-53 + (k + 3) * u)  (+ 2**-24 if float32 and
              float64 grads are mixed)
    torch:    m * (n + k + 3) * u_g                    (u_g: the grads' own u)

fastsgd's sum runs in double over 8 partial results and is rounded once to
the grad's dtype; combining the k norms in the total's dtype, as torch does,
adds the (k + 3) * u term.  Mixed float32 and float64 grads give a float64
total that is exact only to float32 precision: each float32 grad's norm is
rounded to float32 before it is promoted, in torch too.  torch accumulates
each grad's norm in the grad's own dtype, so its error grows with the grad's
size: for float32 grads of a million elements and p != 2 it is typically
1e-5 to 1e-4 relative, where fastsgd's stays within a few float32 units.
fastsgd and torch therefore agree to within the sum of the two bounds, not
bit for bit; clipped grads inherit the total's error plus one rounding.

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
from .parameter import is_bfloat16

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]

_FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.float16))


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
    for torch compatibility: the native path is always taken.

    As torch's, this is :func:`get_total_norm` of the grads followed by
    :func:`clip_grads_with_norm_` with that total."""
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=2)
    grads, positions = _grads(parameters)
    total = _total_norm(grads, positions, norm_type, error_if_nonfinite)
    if grads:
        _scale(grads, positions, _clip_coef(total, max_norm))
    return total


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The ``norm_type``-norm of ``tensors`` (an array or an iterable of
    arrays) viewed as one vector: the norm of their norms, as torch's
    ``torch.nn.utils.get_total_norm``.

    Args:
        tensors: float32, float64, float16 or bfloat16 numpy arrays (C or
            Fortran contiguous), or one such array.
        norm_type: the p of the p-norm; ``inf`` (or ``"inf"``) for the max.
        error_if_nonfinite: raise ``RuntimeError`` (torch's message) if the
            total is NaN or infinite.
        foreach: accepted for torch compatibility; the native path is always
            taken.

    Returns:
        A numpy scalar: of the arrays' dtype if they share one, else float64
        if any is float64, else float32; ``np.float32(0.0)`` for no arrays.
        Each array's norm is accumulated in double (csrc/clip_loop.h) and
        rounded to its dtype, so the total agrees with torch's to within the
        tolerance the module's docstring states, not bit for bit.

    Raises:
        RuntimeError: an infinity norm of an empty array, or a non-finite
            total with ``error_if_nonfinite`` (torch's messages).
    """
    tensors = [tensors] if isinstance(tensors, np.ndarray) else list(tensors)
    return _total_norm(tensors, list(range(len(tensors))), norm_type, error_if_nonfinite)


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """Scale the grads of ``parameters`` in place by
    ``min(max_norm / (total_norm + 1e-6), 1)``, as torch's
    ``torch.nn.utils.clip_grads_with_norm_``: :func:`clip_grad_norm_` with a
    total norm computed beforehand (e.g. by :func:`get_total_norm`).

    Args:
        parameters: Parameters (or one Parameter); those without a grad are
            skipped.
        max_norm: the largest total norm to leave unscaled.
        total_norm: the total norm, a numpy scalar or 0-d array of a float
            dtype (torch takes a 0-d Tensor: a Python float is refused).
        foreach: accepted for torch compatibility; the native path is always
            taken.

    The coefficient is computed with torch's ops and roundings in
    ``total_norm``'s dtype (for float16 and bfloat16: in float32, each op
    rounded to the dtype): ``(total_norm + 1e-6)``, its reciprocal, times
    ``max_norm``, clamped at 1.  Every grad is multiplied by it in the grad's
    compute type (float32 for 16-bit grads, rounded once), so given the same
    ``total_norm`` the grads are torch's bit for bit, for every dtype (a
    0-d grad with a float64 total is multiplied in float64, as torch's type
    promotion of two 0-d tensors has it; 16-bit NaNs get the bits of torch's
    vector code).
    """
    if isinstance(parameters, np.ndarray):
        parameters = [parameters]
    grads, positions = _grads(parameters)
    max_norm = float(max_norm)
    total_norm = _as_total_norm(total_norm)
    if grads:
        _scale(grads, positions, _clip_coef(total_norm, max_norm))


def _as_total_norm(total_norm):
    """A 0-d float array of one of the four dtypes (torch takes a 0-d Tensor)."""
    if not isinstance(total_norm, (np.ndarray, np.generic)):
        raise TypeError("total_norm must be a numpy scalar or 0-d array (as torch's must be "
                        f"a Tensor), but got {type(total_norm).__name__}")
    total_norm = np.asarray(total_norm)
    if total_norm.ndim != 0 or not (total_norm.dtype in _FLOAT_DTYPES
                                    or is_bfloat16(total_norm.dtype)):
        raise ValueError("total_norm must be a float32, float64, float16 or bfloat16 scalar, "
                         f"but got an array of dtype {total_norm.dtype} and shape "
                         f"{total_norm.shape}")
    return total_norm


def _total_norm(grads, positions, norm_type, error_if_nonfinite):
    """get_total_norm over grads; positions name them in errors."""
    norm_type = float(norm_type)
    if not grads:
        return np.float32(0.0)
    _check_infinity_norm_sizes(norm_type, (g.size for g in grads))
    dtypes = [g.dtype for g in grads]
    norms = _native.grad_norms(grads, positions, norm_type)
    return _total_from_norms(_common_dtype(dtypes), dtypes, norms, norm_type,
                             error_if_nonfinite)


def _scale(grads, positions, coef):
    """grad *= coef, as torch's ``_foreach_mul_(grads, coef)`` with coef a 0-d
    tensor: in each grad's compute type, except that a 0-d grad times a
    float64 coef is computed in float64 (two 0-d tensors promote), then
    converted to the grad's dtype."""
    promoted = [(g, g.copy()) for g in grads
                if coef.dtype == np.float64 and g.ndim == 0 and g.dtype != np.float64]
    _native.scale_grads(grads, positions, float(coef))
    for grad, before in promoted:
        product = before.astype(np.float64) * coef
        if grad.dtype.itemsize == 2:  # torch's double to 16-bit conversion goes through float
            product = product.astype(np.float32)
        grad[...] = product.astype(grad.dtype)


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
    total = _total_from_norms(dtype, grad_dtypes, norms, norm_type, error_if_nonfinite)
    return total, _clip_coef(total, max_norm)


def _total_from_norms(dtype, grad_dtypes, norms, norm_type, error_if_nonfinite):
    with np.errstate(over="ignore"):  # a norm beyond a 16-bit dtype is inf, as in torch
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
    return total


def _clip_coef(total, max_norm):
    """min(max_norm / (total + 1e-6), 1) as torch computes it on a 0-d
    tensor: ``reciprocal(total + 1e-6) * max_norm`` (Tensor.__rtruediv__),
    clamped at 1 (a NaN stays), each op rounded to total's dtype; for a
    16-bit total each op computes in float32 with the scalars unrounded, as
    torch's opmath does."""
    max_norm = float(max_norm)
    dtype = total.dtype
    compute = np.float32 if dtype.itemsize == 2 else dtype.type
    with np.errstate(all="ignore"):
        shifted = dtype.type(compute(total) + compute(1e-6))
        inverse = dtype.type(compute(1.0) / compute(shifted))
        coef = dtype.type(compute(inverse) * compute(max_norm))
        return np.minimum(coef, dtype.type(1.0))


def _common_dtype(grad_dtypes):
    """torch's promotion of the grads' norms: their dtype if they share one,
    else float64 if any is float64, else float32."""
    dtypes = set(grad_dtypes)
    if len(dtypes) == 1:
        return dtypes.pop()
    return np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp the grads of ``parameters`` in place to [-clip_value, clip_value],
    as torch's clamp: a NaN ``clip_value`` makes every element NaN, and a
    finite one beyond a grad dtype's range raises torch's RuntimeError
    before any grad changes."""
    clip_value = float(clip_value)
    grads, positions = _grads(parameters)
    _check_bound_fits(clip_value, grads)
    _native.clamp_grads(grads, positions, -clip_value, clip_value)


_TORCH_SCALAR_NAMES = {"float32": "float", "float16": "c10::Half", "bfloat16": "c10::BFloat16"}


def _check_bound_fits(value, grads):
    """torch converts a clamp's bound to each grad's dtype and refuses a
    finite one beyond its largest finite value (for the dtypes in the grads'
    order, as torch groups them; float64 takes any float, and a grad of
    another dtype is refused by the native call that names it)."""
    if not np.isfinite(value):
        return
    for dtype in dict.fromkeys(getattr(g, "dtype", None) for g in grads):
        name = getattr(dtype, "name", None)
        if name in _TORCH_SCALAR_NAMES and abs(value) > float(_finfo_max(dtype)):
            raise RuntimeError(f"value cannot be converted to type {_TORCH_SCALAR_NAMES[name]} "
                               f"without overflow")


def _finfo_max(dtype):
    """The largest finite value of a float dtype (bfloat16's from ml_dtypes)."""
    if dtype.name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.finfo(dtype).max
    return np.finfo(dtype).max
