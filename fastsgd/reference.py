"""fastsgd.reference: the SGD step in plain numpy, op by op -- the executable spec.

This is what the native kernel must compute, written for reading, not speed.
Each line is one op of torch's ``_single_tensor_sgd``, and each op rounds
where torch's rounds:

* hyperparameters are first rounded to the array's dtype (ATen's Scalar alpha);
* ``x.add(y, alpha=a)`` is ``madd(y, a, x)``: on CPUs where torch runs its
  AVX2/AVX-512 kernels it is one fused multiply-add (rounded once); at
  ``ATEN_CPU_CAPABILITY=default`` it is a multiply and an add (rounded twice);
* ``buf.mul_(m)`` is a plain multiply, rounded on its own.

float16 and bfloat16 arrays (``Half16``): every op computes in float32 and
rounds its result to the dtype, to nearest even.  ``x.add(y, alpha=a)``
takes ``a`` rounded to the dtype (double -> float32 -> dtype); ``buf.mul_(m)``
takes ``m`` as a float32.  torch's AVX2/AVX-512 kernels compute each tensor
in a vector body and its last ``n % 32`` elements in scalar code (a strided
tensor's elements as fastsgd._tensor_iterator lays each op out), which
differ: the body fuses the multiply-add, the scalar code rounds the product
to the dtype first; the body gives a bfloat16 NaN the bits 0xFFFF, the
scalar code 0x7FC0; a float16 NaN keeps its sign and payload, quieted; with
x and y both NaN, the body keeps y's NaN, the scalar code x's.  At
``ATEN_CPU_CAPABILITY=default`` every element rounds as the scalar code
(product and sum separately; a float16 NaN becomes sign | 0x7E00), but the
body, torch's generic vector code computing ``y * a + x``, keeps y's NaN.

Master weights (``masters``): the 16-bit grad, widened to float32 (and
multiplied by GradScaler's float32 inverse scale), steps the float32 master
with float32's rules; the parameter is the master rounded to its dtype as
torch's float32-to-16-bit copy rounds (the vector body's NaN rule, or at
default the scalar code's, for every element).

numpy has no fused multiply-add, so ``madd`` builds one from error-free
transformations and rounding to odd (Boldo & Melquiond, "Emulation of FMA
and correctly rounded sums: proved algorithms using rounding to odd", IEEE
Trans. Computers 57(4), 2008).  float32 is computed in float64, exactly, special
values included.  For float64, where an input or the product is not finite,
it returns numpy's ``x + a * y`` (the same IEEE special values as an FMA, but
for a product that overflows only in the unfused evaluation).
"""
import numpy as np

from . import _tensor_iterator
from ._native import cpu_capability
from .parameter import is_bfloat16
from .sgd import SGD as _NativeSGD

__all__ = ["Half16", "lerp", "madd", "rank_ordered_mean", "running_mean", "sgd", "SGD"]


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
            # The float64 product of two float32 is exact and cannot
            # overflow; the float64 sum, rounded to odd, keeps enough to
            # round to float32 once.  Infinities and NaNs come out as an
            # FMA's (x's NaN first, as x + a * y).
            s, e = _two_sum(x.astype(np.float64), y.astype(np.float64) * np.float64(a))
            return _round_to_odd(s, e).astype(np.float32)
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
    # float16 and bfloat16 divide in float32, rounded once to their dtype (torch's opmath)
    divisor = np.float32 if total.dtype.itemsize == 2 else total.dtype.type
    return np.true_divide(total, divisor(len(grads)), out=total)


def lerp(start, end, weight, fma=True):
    """torch's ``start.lerp(end, weight)`` with a Python-number weight, as a
    new array (fastsgd.swa_utils' multi-tensor averaging).

    The weight is rounded to the compute type (float32 for float16 and
    bfloat16, whose elements are widened exactly); with ``|w| < 0.5`` the
    result is ``start + w * (end - start)``, else ``end + (w - 1) * (end -
    start)``, a multiply-add rounded once if ``fma`` (torch's AVX2/AVX-512
    kernels), twice if not (ATEN_CPU_CAPABILITY=default), then rounded to
    the dtype.  NaN payloads of 16-bit results are not specified.
    """
    start = np.asarray(start)
    compute = np.float32 if start.dtype.itemsize == 2 else start.dtype.type
    s, e, w = start.astype(compute), np.asarray(end).astype(compute), compute(weight)
    small = abs(w) < compute(0.5)
    with np.errstate(all="ignore"):
        d = e - s
        result = madd(d, w if small else w - compute(1), s if small else e, fma)
    return np.asarray(result).astype(start.dtype)


def running_mean(averaged, current, count):
    """``averaged + (current - averaged) / count`` as torch computes it on
    tensors of the arrays' dtype: three ops, each rounded to the dtype
    (float16 and bfloat16 computed in float32, ``count`` a float32)."""
    averaged = np.asarray(averaged)
    dtype = averaged.dtype
    compute = np.float32 if dtype.itemsize == 2 else dtype.type

    def rounded(x):
        return np.asarray(x).astype(dtype).astype(compute)

    a, c = averaged.astype(compute), np.asarray(current).astype(compute)
    with np.errstate(all="ignore"):
        return (a + rounded(rounded(c - a) / compute(count))).astype(dtype)


class Float:
    """The ops of torch's for-loop SGD on a float32 or float64 array (one
    code path: ``vector``, where the op's vector body computes, is unused)."""

    def __init__(self, dtype, fma):
        self.t = np.dtype(dtype).type
        self.fma = fma

    def neg(self, x, vector=None):
        return -x

    def add(self, x, y, alpha, vector=None):
        """x.add(y, alpha=alpha); with x and y both NaN, y's NaN (quieted)."""
        y = np.asarray(y)
        with np.errstate(invalid="ignore"):
            return np.where(np.isnan(y), y + self.t(0), madd(y, self.t(alpha), x, self.fma))

    def mul(self, x, m, vector=None):
        """x.mul(m)"""
        return x * self.t(m)


class Half16:
    """The ops of torch's for-loop SGD on float16 or bfloat16 arrays (see the
    module's docstring): float32 arithmetic, then a rounding to the dtype,
    per op.  Each op takes ``vector``, where torch's vector body computes it
    (elsewhere its scalar code does): for contiguous arrays all but the last
    ``n % 32`` elements in memory order, for strided ones as
    fastsgd._tensor_iterator lays the op out.  ``vectorized``: torch's
    AVX2/AVX-512 kernels; else ATEN_CPU_CAPABILITY=default, whose body rounds
    as the scalar code but keeps NaNs as the vector body."""

    def __init__(self, dtype, vectorized):
        self.dtype = np.dtype(dtype)
        self.vectorized = vectorized

    def widen(self, x):
        """Exactly, to float32."""
        bits = np.asarray(x).view(np.uint16)
        if is_bfloat16(self.dtype):
            return np.asarray(bits.astype(np.uint32) << 16).view(np.float32)
        return bits.view(np.float16).astype(np.float32)

    def round(self, x, scalar):
        """float32 x to the dtype, to nearest even, with the NaN bits of
        torch's scalar code where `scalar`, else of its vector body."""
        x = np.asarray(x, np.float32)
        u = x.view(np.uint32)
        sign = ((u >> 16) & 0x8000).astype(np.uint16)
        if is_bfloat16(self.dtype):
            bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            nan_bits = np.where(scalar, np.uint16(0x7FC0), np.uint16(0xFFFF))
        else:
            with np.errstate(over="ignore"):
                bits = x.astype(np.float16).view(np.uint16)
            payload = ((u >> 13) & 0x3FF).astype(np.uint16)
            quieted = sign | np.uint16(0x7E00) | payload   # F16C's VCVTPS2PH
            nan_bits = np.where(np.asarray(scalar) & (not self.vectorized),
                                sign | np.uint16(0x7E00), quieted)
        return np.where(np.isnan(x), nan_bits, bits).view(self.dtype)

    def alpha(self, a):
        """A Python float as torch's Scalar alpha: double -> float32 -> dtype."""
        return self.widen(self.round(np.float32(a), scalar=True))

    def neg(self, x, vector):
        """-x: the sign bit flipped in the vector body, through float32 in
        the scalar code."""
        scalar = ~vector | (not self.vectorized)
        flipped = (np.asarray(x).view(np.uint16) ^ np.uint16(0x8000)).view(self.dtype)
        return np.where(scalar, self.round(-self.widen(x), scalar), flipped)

    def add(self, x, y, alpha, vector):
        """x.add(y, alpha=alpha): one fused multiply-add in the vector body
        (at default: unfused); in the scalar code the product is rounded to
        the dtype first.  With x and y both NaN, the body keeps y's NaN, the
        scalar code x's."""
        scalar = ~vector | (not self.vectorized)
        a = self.alpha(alpha)
        wx, wy = self.widen(x), self.widen(y)
        with np.errstate(all="ignore"):
            product = self.widen(self.round(wy * a, scalar))
            if self.vectorized:
                body = self.round(np.where(np.isnan(wy), wy, madd(wy, a, wx)), scalar)
            else:
                body = self.round(np.where(np.isnan(product), product, wx + product), scalar)
            tail = self.round(np.where(np.isnan(wx), wx, wx + product), scalar)
        return np.where(vector, body, tail)

    def mul(self, x, m, vector):
        """x.mul(m), m a float32 (not rounded to the dtype)."""
        with np.errstate(all="ignore"):
            return self.round(self.widen(x) * np.float32(m), ~vector | (not self.vectorized))


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
        nesterov, maximize, fma=True, masters=None, inv_scale=None) -> None:
    """One SGD step of torch's for-loop path, in place, in numpy.

    ``grads[i]`` None skips ``params[i]``; ``momentum_buffers[i]`` None is a
    first step and is replaced by the new buffer (for a 16-bit parameter,
    laid out as torch lays out its clone of the step's gradient).  ``fma``:
    torch's vectorised rounding (AVX2/AVX-512), else
    ATEN_CPU_CAPABILITY=default's.

    ``masters``: master weights of 16-bit params: ``masters[i]`` is the
    float32 master of ``params[i]`` (None on its first step: it is made from
    the param, and replaced); the buffers are float32; each grad is widened
    and multiplied by ``inv_scale`` (GradScaler's, a float32; 1 if None).
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        ops: Float | Half16
        buf = momentum_buffers[i] if momentum != 0 else None
        modes = new_buf = None
        if masters is not None:
            half = Half16(p.dtype, fma)
            if masters[i] is None:
                masters[i] = half.widen(p).copy()
            ops, target = Float(np.float32, fma), masters[i]
            g = half.widen(g) * np.float32(1.0 if inv_scale is None else inv_scale)
        elif p.dtype.itemsize == 2:
            ops, target = Half16(p.dtype, fma), p
            strides = [None if a is None else _tensor_iterator.element_strides(a)
                       for a in (p, g, buf)]
            modes = _tensor_iterator.step_modes(
                p.shape, *strides, maximize=maximize, weight_decay=weight_decay != 0,
                momentum=momentum != 0, nesterov=nesterov)
            if momentum != 0 and buf is None:
                new_buf = _tensor_iterator.first_buffer_strides(
                    p.shape, *strides[:2], maximize=maximize, weight_decay=weight_decay != 0)
        else:
            ops, target = Float(p.dtype, fma), p
        def vector(op, modes=modes):
            return None if modes is None else (modes & op) != 0

        d = ops.neg(g, vector(_tensor_iterator.NEG)) if maximize else g
        if weight_decay != 0:
            d = ops.add(d, target, weight_decay, vector(_tensor_iterator.WEIGHT_DECAY))
        if momentum != 0:
            if buf is None:
                buf = (np.array(d, copy=True) if new_buf is None
                       else _tensor_iterator.empty_strided(p.shape, new_buf, p.dtype))
                buf[...] = d
                momentum_buffers[i] = buf
            else:
                buf[...] = ops.add(ops.mul(buf, momentum, vector(_tensor_iterator.MUL)), d,
                                   1 - dampening, vector(_tensor_iterator.BUF))
            d = (ops.add(d, buf, momentum, vector(_tensor_iterator.NESTEROV)) if nesterov
                 else buf)
        target[...] = ops.add(target, d, -lr, vector(_tensor_iterator.PARAM))
        if masters is not None:  # torch's copy of the float32 params back
            p[...] = half.round(target, scalar=np.full(p.shape, not fma))


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
        inv_scale = None
        if self._stepper.amp_unscale:  # GradScaler's request, with master weights
            inv_scale = self._stepper.amp_inv_scale
            grads = [p.grad for group in self.param_groups for p in group["params"]
                     if p.grad is not None]
            self._stepper.amp_skipped = not all(np.isfinite(g.astype(np.float32)).all()
                                                for g in grads)
            if self._stepper.amp_skipped:
                return loss
        for group in self.param_groups:
            params = group["params"]
            grads = [p.grad for p in params]
            buffers = [None] * len(params)
            if group["momentum"] != 0:
                buffers = [self.state[p].get("momentum_buffer") if g is not None else None
                           for p, g in zip(params, grads)]
            masters = None
            if group.get("master_weights"):
                masters = [self.state[p].get("master_param") if g is not None else None
                           for p, g in zip(params, grads)]
            sgd(params, grads, buffers, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], weight_decay=group["weight_decay"],
                nesterov=group["nesterov"], maximize=group["maximize"], fma=fma,
                masters=masters, inv_scale=inv_scale)
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is not None and group["momentum"] != 0:
                    self.state[p]["momentum_buffer"] = buffers[i]
                if g is not None and masters is not None:
                    self.state[p]["master_param"] = masters[i]
        return loss


def _native_rounding_is_fused():
    return cpu_capability() != "default"
