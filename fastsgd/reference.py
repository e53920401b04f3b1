"""fastsgd.reference: the SGD step in plain numpy, op by op -- the executable spec.

This is what the native kernel must compute, written for reading, not speed.
Each line is one op of torch's ``_single_tensor_sgd``, and each op rounds
where torch's rounds:

* hyperparameters are first rounded to the array's dtype (ATen's Scalar alpha);
* ``x.add(y, alpha=a)`` is ``madd(y, a, x)``: on CPUs where torch runs its
  AVX2/AVX-512 kernels it is one fused multiply-add (rounded once); at
  ``ATEN_CPU_CAPABILITY=default`` it is a multiply and an add (rounded twice);
* ``buf.mul_(m)`` is a plain multiply, rounded on its own.

numpy has no fused multiply-add, so ``madd`` builds one from error-free
transformations and rounding to odd (Boldo & Melquiond, "Emulation of FMA
and correctly rounded sums: proved algorithms using rounding to odd", IEEE
Trans. Computers 57(4), 2008).  Where an input or the product is not finite,
it returns numpy's ``x + a * y`` (the same IEEE special values as an FMA, but
for a product that overflows only in the unfused evaluation).
"""
import numpy as np

from ._native import cpu_capability
from .sgd import SGD as _NativeSGD

__all__ = ["madd", "rank_ordered_mean", "sgd", "SGD"]


def _two_sum(a, b):
    """s, e with s = fl(a + b) and a + b = s + e exactly (Knuth)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _two_product(a, b):
    """p, e with p = fl(a * b) and a * b = p + e exactly (Dekker, Veltkamp split)."""
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


def _split(a):
    c = a * a.dtype.type(2.0 ** 27 + 1)  # float64 only: 53 = 26 + 27
    hi = c - (c - a)
    return hi, a - hi


def _round_to_odd(s, e):
    """The value s + e (s = fl(s + e)) rounded to odd: when inexact, the
    neighbour of the exact value whose last bit is 1, so that a second,
    narrower rounding cannot mistake it for a tie."""
    bits = s.view(np.uint64 if s.dtype == np.float64 else np.uint32)
    inexact = (e != 0) & np.isfinite(e) & ((bits & 1) == 0)
    toward = np.where(e > 0, np.inf, -np.inf).astype(s.dtype)
    return np.where(inexact, np.nextafter(s, toward), s)


def madd(y, a, x, fma=True):
    """``x + a * y`` in the dtype of x: rounded once if fma, else the product
    is rounded and then the sum, as numpy computes it."""
    x = np.asarray(x)
    y = np.asarray(y, dtype=x.dtype)
    a = x.dtype.type(a)
    unfused = x + a * y
    if not fma:
        return unfused
    with np.errstate(all="ignore"):
        if x.dtype == np.float32:
            # The float64 product of two float32 is exact; the float64 sum,
            # rounded to odd, keeps enough to round to float32 once.
            s, e = _two_sum(y.astype(np.float64) * np.float64(a), x.astype(np.float64))
            fused = _round_to_odd(s, e).astype(np.float32)
        else:
            uh, ul = _two_product(y, np.full_like(y, a))
            th, tl = _two_sum(x, uh)
            fused = th + _round_to_odd(*_two_sum(tl, ul))
        finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(y * a)
    return np.where(finite, fused, unfused)


def rank_ordered_mean(grads):
    """The average of one grad per rank, as fastsgd.distributed computes it.

    ``(((g_0 + g_1) + g_2) + ... + g_{N-1}) / N``: the grads summed in rank
    order, each addition and the final true division rounded in the grads'
    dtype, whatever the number of ranks, the buckets or the MPI library.

    Parameters
    ----------
    grads : sequence of numpy.ndarray
        One grad per rank, in rank order, all of one shape and dtype.

    Returns
    -------
    numpy.ndarray
        A new array of that shape and dtype.
    """
    total = np.array(grads[0])  # a copy, in grads[0]'s memory order
    for grad in grads[1:]:
        np.add(total, grad, out=total)
    return np.true_divide(total, total.dtype.type(len(grads)), out=total)


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
        nesterov, maximize, fma=True):
    """One SGD step of torch's for-loop path, in place, in numpy.

    ``grads[i]`` None skips ``params[i]``; ``momentum_buffers[i]`` None is a
    first step and is replaced by the new buffer.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        t = p.dtype.type
        d = -g if maximize else g
        if weight_decay != 0:
            d = madd(p, t(weight_decay), d, fma)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = np.array(d, copy=True)
                momentum_buffers[i] = buf
            else:
                buf[...] = madd(d, t(1 - dampening), buf * t(momentum), fma)
            d = madd(buf, t(momentum), d, fma) if nesterov else buf
        p[...] = madd(d, t(-lr), p, fma)


class SGD(_NativeSGD):
    """fastsgd.SGD with every step computed by the numpy spec above.

    Same bookkeeping, validation and state as fastsgd.SGD; only the
    arithmetic differs in where it runs.  ``fma`` picks the rounding: by
    default the one of the native kernel in use (fastsgd.cpu_capability()).
    """

    def __init__(self, params, *args, fma=None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.fma = fma

    def step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()
        self._stepper.validate(self.param_groups, self.state)
        fma = self.fma if self.fma is not None else _native_rounding_is_fused()
        for group in self.param_groups:
            params = group["params"]
            grads = [p.grad for p in params]
            buffers = [None] * len(params)
            if group["momentum"] != 0:
                buffers = [self.state[p].get("momentum_buffer") if g is not None else None
                           for p, g in zip(params, grads)]
            sgd(params, grads, buffers, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], weight_decay=group["weight_decay"],
                nesterov=group["nesterov"], maximize=group["maximize"], fma=fma)
            if group["momentum"] != 0:
                for p, g, buf in zip(params, grads, buffers):
                    if g is not None:
                        self.state[p]["momentum_buffer"] = buf
        return loss


def _native_rounding_is_fused():
    return cpu_capability() != "default"
