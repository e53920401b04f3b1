"""float16 and bfloat16: bit-for-bit parity of fastsgd.SGD with torch.optim.SGD(foreach=False)
at torch.set_num_threads(1) and with fastsgd.reference, on every kernel; NaN rules; master
weights and fastsgd.amp.GradScaler against torch training float32 params with
torch.amp.GradScaler("cpu"); clipping, state_dicts and checkpoints of 16-bit parameters.

torch fixes its kernels when it is imported (ATEN_CPU_CAPABILITY): this process compares the
kernels that round as torch does here; `test_grid_at_torch_capability` reruns the grid in
children with torch at "avx2" and at "default", each against the matching fastsgd kernel.
The default run samples the grid; `-m slow` runs all of it.
"""
import itertools
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from test_parity import OPTIONS, option_id

import fastsgd
from fastsgd import _tensor_iterator, reference

torch = pytest.importorskip("torch")
torch_functional_sgd = pytest.importorskip("torch.optim.sgd").sgd
ml_dtypes = pytest.importorskip("ml_dtypes")

TORCH_CAPABILITY = torch.backends.cpu.get_cpu_capability().lower()
# torch's AVX2 and AVX-512 kernels round 16-bit tensors alike, and fastsgd's
# avx2, avx512 and portable kernels all reproduce them; "default" its scalar code.
CAPABILITIES = (["default"] if TORCH_CAPABILITY == "default"
                else [c for c in fastsgd.available_capabilities() if c != "default"])
if os.environ.get("FASTSGD_HALF_TEST_KERNELS"):  # a child of test_grid_at_torch_capability
    CAPABILITIES = os.environ["FASTSGD_HALF_TEST_KERNELS"].split(",")
DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
TORCH_DTYPE = {DTYPES[0]: torch.float16, DTYPES[1]: torch.bfloat16}
# across torch's vector body and its scalar remainder (n % 32)
SHAPES = [(0,), (1,), (7,), (31,), (32,), (33,), (63,), (64,), (65,), (1000,), (100003,),
          (3, 5, 7), (2, 0, 3), ()]

def bits(x):
    """The 16-bit patterns of a numpy array or a torch tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().view(torch.int16).numpy().view(np.uint16)
    return np.asarray(x).view(np.uint16)


def to_torch(array):
    array = np.array(array)  # a contiguous copy, 0-d included
    return torch.from_numpy(array.view(np.int16)).view(TORCH_DTYPE[array.dtype])


def grid_cases():
    """(capability, dtype, options, slow?): the default run keeps every option
    combination on the best kernel and a sample elsewhere."""
    cases = []
    for cap, dtype, options in itertools.product(CAPABILITIES, DTYPES, OPTIONS):
        sampled = cap == CAPABILITIES[0] or zlib.crc32(
            f"{cap}{dtype}{option_id(options)}".encode()) % 4 == 0
        marks = () if sampled else (pytest.mark.slow,)
        cases.append(pytest.param(cap, dtype, options, marks=marks,
                                  id=f"{cap}-{dtype}-{option_id(options)}"))
    return cases


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch's 16-bit results depend on its thread count: the reference is 1.
    Restored after, since other tests compare with torch at its own count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def kernel():
    previous = fastsgd.cpu_capability()

    def use(name):
        fastsgd.set_cpu_capability(name)

    yield use
    fastsgd.set_cpu_capability(previous)


class Twins:
    """The same model as fastsgd, torch and reference parameters."""

    def __init__(self, rng, shapes, dtype):
        self.values = [np.asarray(rng.standard_normal(s), np.float32).astype(dtype)
                       for s in shapes]
        self.fast = [fastsgd.Parameter(v.copy()) for v in self.values]
        self.ref = [fastsgd.Parameter(v.copy()) for v in self.values]
        self.torch = [torch.nn.Parameter(to_torch(v)) for v in self.values]

    def set_grads(self, rng, present):
        for i, p in enumerate(self.fast):
            if present(i):
                g = np.asarray(rng.standard_normal(p.shape) * 4, np.float32).astype(p.dtype)
                self.fast[i].grad, self.ref[i].grad = g, g.copy()
                self.torch[i].grad = to_torch(g)
            else:
                self.fast[i].grad = self.ref[i].grad = self.torch[i].grad = None


def assert_same(fast_opt, torch_opt, ref_opt, twins):
    for i, (p, tp, rp) in enumerate(zip(twins.fast, twins.torch, twins.ref)):
        np.testing.assert_array_equal(bits(p), bits(tp), err_msg=f"param {i} vs torch")
        np.testing.assert_array_equal(bits(p), bits(rp), err_msg=f"param {i} vs reference")
        buf = fast_opt.state[p].get("momentum_buffer") if p in fast_opt.state else None
        tbuf = torch_opt.state[tp].get("momentum_buffer") if tp in torch_opt.state else None
        rbuf = ref_opt.state[rp].get("momentum_buffer") if rp in ref_opt.state else None
        assert (buf is None) == (tbuf is None) == (rbuf is None), f"buffer {i} presence"
        if buf is not None:
            assert buf.dtype == p.dtype
            np.testing.assert_array_equal(bits(buf), bits(tbuf), err_msg=f"buffer {i} vs torch")
            np.testing.assert_array_equal(bits(buf), bits(rbuf), err_msg=f"buffer {i} vs ref")


@pytest.mark.parametrize("cap, dtype, options", grid_cases())
def test_grid(kernel, cap, dtype, options):
    """Two groups, grads missing on some steps, lr changed between steps."""
    kernel(cap)
    rng = np.random.default_rng(zlib.crc32(f"{dtype} {option_id(options)}".encode()))
    lr = 0.05
    base = Twins(rng, SHAPES, dtype)
    head = Twins(rng, [(4, 6), (6,)], dtype)

    def groups(params_base, params_head):
        return [{"params": params_base}, {"params": params_head, "lr": lr * 10}]

    fast_opt = fastsgd.SGD(groups(base.fast, head.fast), lr=lr, **options)
    ref_opt = reference.SGD(groups(base.ref, head.ref), lr=lr, **options)
    torch_opt = torch.optim.SGD(groups(base.torch, head.torch), lr=lr, foreach=False,
                                **options)
    for step in range(4):
        if step == 2:
            for opt in (fast_opt, ref_opt, torch_opt):
                opt.param_groups[0]["lr"] = lr * 0.3
        for twins in (base, head):
            twins.set_grads(rng, lambda i, step=step: (i + step) % 3 != 0)
        for opt in (fast_opt, ref_opt, torch_opt):
            opt.step()
        for twins in (base, head):
            assert_same(fast_opt, torch_opt, ref_opt, twins)


# Strided 16-bit tensors: torch rounds each op's elements as its TensorIterator
# lays that op out (fastsgd/_tensor_iterator.py).  A layout recipe: the view's
# dimensions in memory order (outermost first), a step per dimension, and
# whether it is [..., 0] of a base with one more dimension; or
# ("broadcast", dim), a grad expanded along dim (torch's expand).
def random_recipe(rng, shape):
    order = [int(d) for d in rng.permutation(len(shape))]
    steps = [int(rng.choice([1, 1, 2, 3])) for _ in shape]
    return order, steps, bool(rng.random() < 0.25)


def strided_twins(draw, shape, recipe, copies):
    """`copies` numpy views (with their bases) and a torch view of the same
    values (draw(n): n of them), each over its own base, laid out by recipe."""
    if recipe[0] == "broadcast":
        small = list(shape)
        small[recipe[1]] = 1
        values = draw(int(np.prod(small))).reshape(small)
        bases = [values.copy() for _ in range(copies)]
        # torch's expand keeps the strides of the other size-1 dimensions,
        # where np.broadcast_to sets them to 0 (and torch's roundings see them)
        return ([np.lib.stride_tricks.as_strided(
            b, shape, [0 if d == recipe[1] else s for d, s in enumerate(b.strides)],
            writeable=False) for b in bases], bases, to_torch(values).expand(shape))
    order, steps, pick = recipe
    base_shape = [shape[d] * steps[d] for d in order] + ([2] if pick else [])
    base = draw(int(np.prod(base_shape))).reshape(base_shape)
    bases = [base.copy() for _ in range(copies)]
    return ([view_of(b, recipe) for b in bases], bases,
            view_of(to_torch(base), recipe, torch=True))


def view_of(base, recipe, torch=False):
    order, steps, pick = recipe
    index = tuple(slice(None, None, steps[d]) for d in order) + (..., 0)[:1 + pick]
    inverse = [order.index(d) for d in range(len(order))]
    return base[index].permute(inverse) if torch else base[index].transpose(inverse)


STRIDED_SHAPES = [(5,), (70,), (33, 3), (17, 40), (2, 70), (1, 45), (9, 2, 33), (2, 3, 5, 7),
                  (3, 1, 40), ()]


def strided_cases(count):
    """(dtype, seed, options, slow?): the default run a sample, -m slow all."""
    return [pytest.param(DTYPES[seed % 2], seed, OPTIONS[seed % len(OPTIONS)],
                         marks=() if seed < 24 else (pytest.mark.slow,),
                         id=f"{DTYPES[seed % 2]}-{seed}") for seed in range(count)]


@pytest.mark.parametrize("dtype, seed, options", strided_cases(160))
def test_grid_strided(kernel, dtype, seed, options):
    """Strided params and grads of random layouts (transposed, sliced,
    [..., 0], channels last, broadcast grads), equal torch's and the
    reference's for three steps, and nothing else of their bases changes."""
    kernel(CAPABILITIES[seed % len(CAPABILITIES)])
    rng = np.random.default_rng(seed)

    def normal(n):
        return np.asarray(rng.standard_normal(n) * 4, np.float32).astype(dtype)

    fast, ref, tor, bases = [], [], [], []
    for shape in STRIDED_SHAPES:
        if shape and rng.random() < 0.2:  # channels last: NHWC memory, NCHW view
            shape = (2, 3, 5, 7)
            recipe = ([0, 2, 3, 1], [1, 1, 1, 1], False)
        else:
            recipe = random_recipe(rng, shape)
        (f, r), (base, _), t = strided_twins(
            (lambda n: special_values(dtype, n, rng)) if seed % 5 == 0 else normal,
            shape, recipe, 2)
        fast.append(fastsgd.Parameter(f))
        ref.append(fastsgd.Parameter(r))
        tor.append(t)
        bases.append((base, base.copy(), recipe))
    opts = [fastsgd.SGD(fast, lr=0.05, **options), reference.SGD(ref, lr=0.05, **options),
            torch.optim.SGD(tor, lr=0.05, foreach=False, **options)]
    for _ in range(3):
        for p, r, t, (_, _, param_recipe) in zip(fast, ref, tor, bases):
            shape = p.shape
            kind = rng.choice(["param's", "contiguous", "another", "broadcast"])
            recipe = (param_recipe if kind == "param's" or not shape
                      else ("broadcast", int(rng.integers(len(shape)))) if kind == "broadcast"
                      else (list(range(len(shape))), [1] * len(shape), False)
                      if kind == "contiguous" else random_recipe(rng, shape))
            (p.grad, r.grad), _, t.grad = strided_twins(normal, shape, recipe, 2)
        with np.errstate(all="ignore"):
            for opt in opts:
                opt.step()
        for i, (p, r, t) in enumerate(zip(fast, ref, tor)):
            np.testing.assert_array_equal(bits(p), bits(t), err_msg=f"param {i} vs torch")
            np.testing.assert_array_equal(bits(p), bits(r), err_msg=f"param {i} vs reference")
            if options["momentum"]:
                buf = opts[0].state[p]["momentum_buffer"]
                tbuf = opts[2].state[t]["momentum_buffer"]
                np.testing.assert_array_equal(bits(buf), bits(tbuf), err_msg=f"buffer {i}")
                np.testing.assert_array_equal(bits(buf), bits(opts[1].state[r][
                    "momentum_buffer"]), err_msg=f"buffer {i} vs reference")
    for base, original, recipe in bases:
        untouched = np.ones(base.shape, bool)
        view_of(untouched, recipe)[...] = False
        np.testing.assert_array_equal(bits(base)[untouched], bits(original)[untouched])


def test_tensor_iterator_layouts_match_torch():
    """The model's layouts of the tensors torch allocates (an op's result,
    a clone), against torch's, for views of every recipe."""
    rng = np.random.default_rng(5)
    for _ in range(400):
        shape = tuple(int(n) for n in rng.choice([1, 2, 3, 5], size=rng.integers(1, 5)))
        a, b = (strided_twins(lambda n: np.zeros(n, np.float16), shape,
                              random_recipe(rng, shape), 1)[2] for _ in range(2))
        assert a.add(b).stride() == _tensor_iterator.result_strides(
            shape, [a.stride(), b.stride()]), (shape, a.stride(), b.stride())
        assert a.clone().stride() == _tensor_iterator.clone_strides(shape, a.stride())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_strides_match_reference(kernel, dtype):
    """torch has no negative strides: fastsgd steps such views as the
    reference does, each op laid out by the same model."""
    kernel(CAPABILITIES[0])
    rng = np.random.default_rng(8)
    views = [lambda a: a[::-1], lambda a: a[::-2, ::3].T, lambda a: a[:, ::-1][1:]]
    shapes = [(70,), (66, 99), (5, 40)]
    values = [np.asarray(rng.standard_normal(s), np.float32).astype(dtype) for s in shapes]
    fast = [fastsgd.Parameter(view(v.copy())) for v, view in zip(values, views)]
    ref = [fastsgd.Parameter(view(v.copy())) for v, view in zip(values, views)]
    options = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    opts = [fastsgd.SGD(fast, **options), reference.SGD(ref, **options)]
    for step in range(3):
        for p, r, view, s in zip(fast, ref, views, shapes):
            base = np.asarray(rng.standard_normal(s), np.float32).astype(dtype)
            flip = (lambda a: a[::-1]) if step == 1 else (lambda a: a)
            p.grad, r.grad = flip(view(base)), flip(view(base.copy()))
        for opt in opts:
            opt.step()
        for p, r in zip(fast, ref):
            np.testing.assert_array_equal(bits(p), bits(r))
            np.testing.assert_array_equal(bits(opts[0].state[p]["momentum_buffer"]),
                                          bits(opts[1].state[r]["momentum_buffer"]))


@pytest.mark.skipif(bool(os.environ.get("FASTSGD_HALF_TEST_KERNELS")),
                    reason="this is a child run")
@pytest.mark.parametrize("torch_capability, fastsgd_kernels", [
    ("avx2", ["avx2", "portable"]), ("default", ["default"])])
def test_grid_at_torch_capability(torch_capability, fastsgd_kernels):
    """torch at ATEN_CPU_CAPABILITY=avx2 and =default against the matching
    fastsgd kernels: the grid, the NaN rules and the functional API."""
    if torch_capability == "avx2" and "avx2" not in fastsgd.available_capabilities():
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=torch_capability,
               FASTSGD_HALF_TEST_KERNELS=",".join(fastsgd_kernels))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "test_grid or nan or functional"],
        env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_matches_torch(kernel, dtype):
    kernel(CAPABILITIES[0])
    rng = np.random.default_rng(3)
    twins = Twins(rng, [(47,), (3, 40)], dtype)
    bufs, tbufs = [None, None], [None, None]
    options = dict(weight_decay=1e-2, momentum=0.8, lr=0.1, dampening=0.1,
                   nesterov=False, maximize=False)
    for _ in range(3):
        twins.set_grads(rng, lambda i: True)
        fastsgd.functional.sgd(twins.fast, [p.grad for p in twins.fast], bufs, **options)
        torch_functional_sgd([p.data for p in twins.torch], [p.grad for p in twins.torch],
                            tbufs, foreach=False, **options)
        for p, tp, b, tb in zip(twins.fast, twins.torch, bufs, tbufs):
            np.testing.assert_array_equal(bits(p), bits(tp))
            np.testing.assert_array_equal(bits(b), bits(tb))


def special_values(dtype, n, rng):
    """n 16-bit patterns: normal values, subnormals, the largest finite
    values, infinities, and NaNs of both signs with random payloads, quiet
    and signalling."""
    finite = rng.standard_normal(n).astype(np.float32).astype(dtype).view(np.uint16)
    exponent = 0x7C00 if dtype == np.float16 else 0x7F80
    mantissa = 0x03FF if dtype == np.float16 else 0x007F
    kind = rng.integers(0, 6, n)
    payload = rng.integers(1, mantissa + 1, n).astype(np.uint16)
    sign = (rng.integers(0, 2, n) << 15).astype(np.uint16)
    out = np.select([kind == 0, kind == 1, kind == 2, kind == 3],
                    [payload & mantissa,                       # subnormal
                     np.uint16(exponent - 1),                  # the largest finite
                     np.uint16(exponent),                      # infinity
                     np.uint16(exponent) | payload],           # NaN, any payload
                    finite) | sign
    return out.astype(np.uint16).view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(momentum=0.9, nesterov=True, weight_decay=0.5),
                                     dict(momentum=0.9, dampening=0.25, maximize=True),
                                     dict(weight_decay=2.0)], ids=option_id)
def test_nan_inf_subnormal_bits_match_torch(kernel, dtype, options):
    """Every pattern of special_values, in the vector body and the scalar
    remainder, as param, grad and buffer: bit-identical to torch (NaN
    payloads included)."""
    rng = np.random.default_rng(11)
    for cap in CAPABILITIES:
        kernel(cap)
        values = [special_values(dtype, n, rng) for n in (1, 31, 45, 64, 97, 1000)]
        fast = [fastsgd.Parameter(v.copy()) for v in values]
        ref = [fastsgd.Parameter(v.copy()) for v in values]
        tor = [torch.nn.Parameter(to_torch(v)) for v in values]
        opts = [fastsgd.SGD(fast, lr=0.5, **options), reference.SGD(ref, lr=0.5, **options),
                torch.optim.SGD(tor, lr=0.5, foreach=False, **options)]
        for _ in range(3):
            for p, r, t in zip(fast, ref, tor):
                g = special_values(dtype, p.size, rng)
                p.grad, r.grad, t.grad = g, g.copy(), to_torch(g)
            with np.errstate(all="ignore"):
                for opt in opts:
                    opt.step()
            for p, r, t in zip(fast, ref, tor):
                np.testing.assert_array_equal(bits(p), bits(t), err_msg=cap)
                np.testing.assert_array_equal(bits(p), bits(r), err_msg=cap)
                if "momentum" in options:
                    np.testing.assert_array_equal(bits(opts[0].state[p]["momentum_buffer"]),
                                                  bits(opts[2].state[t]["momentum_buffer"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rules(kernel, dtype):
    """The NaN a step makes of a NaN grad: a float16 NaN keeps its sign (and
    its payload, quieted, except in torch's scalar code at default, which
    gives sign | 0x7E00); a bfloat16 NaN becomes torch's 0xFFFF in the
    vector body and 0x7FC0 in the scalar code, whatever its sign."""
    n = 70  # elements 64..69 are in torch's scalar remainder
    for cap in CAPABILITIES:
        kernel(cap)
        for sign in (0, 0x8000):
            grad_bits = np.full(n, sign | (0x7C00 | 0x0123 if dtype == np.float16
                                           else 0x7F80 | 0x0023), np.uint16)
            p = fastsgd.Parameter(np.ones(n, dtype))
            p.grad = grad_bits.view(dtype)
            fastsgd.SGD([p], lr=0.1).step()
            out = bits(p)
            tail = np.arange(n) >= (64 if cap != "default" else 0)
            assert np.isnan(p.astype(np.float32)).all()
            if dtype == np.float16:
                # p - lr * g: the NaN g propagates through the multiply-add
                assert ((out & 0x8000) == sign).all(), cap
                expected = np.where(tail & (cap == "default"), sign | 0x7E00,
                                    sign | 0x7E00 | 0x0123)
            else:
                expected = np.where(tail, 0x7FC0, 0xFFFF)
            np.testing.assert_array_equal(out, expected.astype(np.uint16), err_msg=cap)


def test_thread_count_changes_no_bit(kernel):
    """A step split over 2 threads (cuts at cache lines, inside tensors)
    gives the bits of 1 thread: each element's rounding depends only on its
    place in its own tensor."""
    if not fastsgd.has_openmp():
        pytest.skip("no OpenMP")
    rng = np.random.default_rng(5)
    previous_threads, previous_threshold = fastsgd.get_num_threads(), \
        fastsgd._native.parallel_threshold()
    try:
        fastsgd._native.parallel_threshold(1024)
        for cap, dtype in itertools.product(fastsgd.available_capabilities(), DTYPES):
            kernel(cap)
            values = [rng.standard_normal(n).astype(np.float32).astype(dtype)
                      for n in (100003, 77, 4099, 33)]
            results = []
            for threads in (1, 2):
                fastsgd.set_num_threads(threads)
                ps = [fastsgd.Parameter(v.copy()) for v in values]
                opt = fastsgd.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
                masters = [fastsgd.Parameter(v.copy()) for v in values]
                mopt = fastsgd.SGD(masters, lr=0.1, momentum=0.9, master_weights=True)
                for step in range(3):
                    for p, m in zip(ps, masters):
                        p.grad = m.grad = np.random.default_rng(step).standard_normal(
                            p.shape).astype(np.float32).astype(dtype)
                    opt.step()
                    mopt.step()
                results.append([bits(p).copy() for p in ps + masters])
            for a, b in zip(*results):
                np.testing.assert_array_equal(a, b, err_msg=f"{cap} {dtype}")
    finally:
        fastsgd.set_num_threads(previous_threads)
        fastsgd._native.parallel_threshold(previous_threshold)


# ------------------------------------------------------------ master weights and GradScaler

def scaled_grads(rng, shapes, dtype, scale, bad_steps, step):
    """16-bit grads of a loss scaled by `scale`, with an inf or a NaN in
    some steps' grads."""
    grads = [np.asarray(rng.standard_normal(s) * scale * 1e-3, np.float32).astype(dtype)
             for s in shapes]
    if step in bad_steps:
        grads[step % len(grads)].reshape(-1)[step % 3] = np.inf if step % 2 else np.nan
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(momentum=0.9, nesterov=True, weight_decay=1e-4),
                                     dict(momentum=0.9, dampening=0.1),
                                     dict(weight_decay=1e-2, maximize=True)], ids=option_id)
def test_master_weights_with_grad_scaler_match_torch(dtype, options):
    """fastsgd: 16-bit params, master weights, GradScaler; torch: float32 params
    fed the same 16-bit grads as float32, torch.amp.GradScaler("cpu").  Masters,
    buffers and the scale sequence are identical, skipped steps included; the
    params are the masters rounded to their dtype."""
    rng = np.random.default_rng(21)
    shapes = [(300,), (7, 9), (33,), ()]
    values = [np.asarray(rng.standard_normal(s), np.float32).astype(dtype) for s in shapes]
    params = [fastsgd.Parameter(v.copy()) for v in values]
    spec = [fastsgd.Parameter(v.copy()) for v in values]
    tparams = [torch.nn.Parameter(torch.from_numpy(v.astype(np.float32))) for v in values]
    opt = fastsgd.SGD(params, lr=0.1, master_weights=True, **options)
    spec_opt = reference.SGD(spec, lr=0.1, master_weights=True, **options)
    topt = torch.optim.SGD(tparams, lr=0.1, foreach=False, **options)
    kwargs = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    scaler, spec_scaler = fastsgd.amp.GradScaler(**kwargs), fastsgd.amp.GradScaler(**kwargs)
    tscaler = torch.amp.GradScaler("cpu", **kwargs)
    bad_steps = {0, 4, 5, 9}
    for step in range(12):
        loss = scaler.scale(np.float32(1.0))
        assert loss == spec_scaler.scale(np.float32(1.0)) == tscaler.scale(torch.ones(())).item()
        grads = scaled_grads(rng, shapes, dtype, float(loss), bad_steps, step)
        for p, s, t, g in zip(params, spec, tparams, grads):
            p.grad, s.grad, t.grad = g, g.copy(), torch.from_numpy(g.astype(np.float32))
        before = [p.copy() for p in params]
        for sc, o in ((scaler, opt), (spec_scaler, spec_opt), (tscaler, topt)):
            sc.step(o)
            sc.update()
        assert scaler.get_scale() == spec_scaler.get_scale() == tscaler.get_scale()
        assert scaler.state_dict() == tscaler.state_dict()
        if step in bad_steps:  # skipped: nothing written, no state created
            for p, b in zip(params, before):
                np.testing.assert_array_equal(bits(p), bits(b))
            if step == 0:
                assert len(opt.state) == 0 and len(topt.state) == 0
            continue
        for p, s, t in zip(params, spec, tparams):
            master = opt.state[p]["master_param"]
            assert master.dtype == np.float32
            np.testing.assert_array_equal(master, t.detach().numpy())
            np.testing.assert_array_equal(master, spec_opt.state[s]["master_param"])
            np.testing.assert_array_equal(bits(p), bits(t.detach().to(TORCH_DTYPE[p.dtype])))
            np.testing.assert_array_equal(bits(p), bits(s))
            if "momentum" in options:
                buf = opt.state[p]["momentum_buffer"]
                assert buf.dtype == np.float32
                np.testing.assert_array_equal(buf, topt.state[t]["momentum_buffer"].numpy())
        for p, g in zip(params, grads):  # the step never writes the grads
            np.testing.assert_array_equal(bits(p.grad), bits(g))


def test_master_weights_without_scaler_match_torch_float32():
    rng = np.random.default_rng(2)
    values = [rng.standard_normal(n).astype(ml_dtypes.bfloat16) for n in (5, 64, 100)]
    params = [fastsgd.Parameter(v.copy()) for v in values]
    tparams = [torch.nn.Parameter(torch.from_numpy(v.astype(np.float32))) for v in values]
    opt = fastsgd.SGD(params, lr=0.05, momentum=0.9, master_weights=True)
    topt = torch.optim.SGD(tparams, lr=0.05, momentum=0.9, foreach=False)
    for _ in range(4):
        for p, t in zip(params, tparams):
            p.grad = rng.standard_normal(p.shape).astype(ml_dtypes.bfloat16)
            t.grad = torch.from_numpy(p.grad.astype(np.float32))
        opt.step()
        topt.step()
    for p, t in zip(params, tparams):
        np.testing.assert_array_equal(opt.state[p]["master_param"], t.detach().numpy())


def test_master_weights_state_dict_and_checkpoint(tmp_path):
    """state_dict carries the float32 masters; a checkpoint keeps them and the
    bfloat16 params; a plain float32 state (no master) loads into a
    master-weights optimizer, whose state stays float32."""
    rng = np.random.default_rng(4)
    p = fastsgd.Parameter(rng.standard_normal(40).astype(ml_dtypes.bfloat16))
    opt = fastsgd.SGD([p], lr=0.1, momentum=0.9, master_weights=True)
    p.grad = np.ones(40, ml_dtypes.bfloat16)
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["master_weights"] is True
    path = tmp_path / "opt.ckpt"
    fastsgd.save({"optimizer": saved, "param": p}, path)
    loaded = fastsgd.load(path)
    assert loaded["param"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bits(loaded["param"]), bits(p))
    twin = fastsgd.Parameter(loaded["param"])
    again = fastsgd.SGD([twin], lr=0.1, momentum=0.9, master_weights=True)
    again.load_state_dict(loaded["optimizer"])
    assert again.state[twin]["master_param"].dtype == np.float32
    np.testing.assert_array_equal(again.state[twin]["master_param"],
                                  opt.state[p]["master_param"])
    twin.grad = p.grad = rng.standard_normal(40).astype(ml_dtypes.bfloat16)
    opt.step()
    again.step()
    np.testing.assert_array_equal(bits(twin), bits(p))
    # a float32 optimizer's state_dict (no master_weights key, no master_param)
    f32 = fastsgd.Parameter(np.asarray(p, np.float32))
    f32_opt = fastsgd.SGD([f32], lr=0.1, momentum=0.9)
    f32.grad = np.ones(40, np.float32)
    f32_opt.step()
    third = fastsgd.SGD([p], lr=0.1, momentum=0.9, master_weights=True)
    third.load_state_dict(f32_opt.state_dict())
    assert third.param_groups[0]["master_weights"] is True
    buf = third.state[p]["momentum_buffer"]
    assert buf.dtype == np.float32
    np.testing.assert_array_equal(buf, f32_opt.state[f32]["momentum_buffer"])
    third.step()  # the master is made from the param on this first master step
    assert third.state[p]["master_param"].dtype == np.float32


def test_grad_scaler_matches_torch_without_master_weights():
    """bfloat16 and float32 params, GradScaler's unscale in place: grads,
    params and the scale as torch's; float16 grads are refused as by torch."""
    rng = np.random.default_rng(8)
    for dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)):
        values = [rng.standard_normal(n).astype(np.float32).astype(dtype) for n in (10, 99)]
        params = [fastsgd.Parameter(v.copy()) for v in values]
        tparams = [torch.nn.Parameter(to_torch(v) if dtype.itemsize == 2
                                      else torch.from_numpy(v.copy())) for v in values]
        opt = fastsgd.SGD(params, lr=0.1, momentum=0.9)
        topt = torch.optim.SGD(tparams, lr=0.1, momentum=0.9, foreach=False)
        kwargs = dict(init_scale=1000.0, growth_factor=1.7, backoff_factor=0.3,
                      growth_interval=2)
        scaler, tscaler = fastsgd.amp.GradScaler(**kwargs), torch.amp.GradScaler("cpu", **kwargs)
        for step in range(8):
            scaler.scale(np.float32(1))
            tscaler.scale(torch.ones(()))
            for p, t in zip(params, tparams):
                g = (rng.standard_normal(p.shape) * 50).astype(np.float32).astype(dtype)
                if step in (1, 2):
                    g[step] = np.inf
                p.grad = g
                t.grad = to_torch(g) if dtype.itemsize == 2 else torch.from_numpy(g.copy())
            scaler.unscale_(opt)
            tscaler.unscale_(topt)
            for p, t in zip(params, tparams):
                got, want = p.grad, t.grad
                if dtype.itemsize == 2:
                    finite = np.isfinite(got.astype(np.float32))
                    np.testing.assert_array_equal(bits(got)[finite], bits(want)[finite])
                else:
                    np.testing.assert_array_equal(got, want.numpy())
            scaler.step(opt)
            tscaler.step(topt)
            scaler.update()
            tscaler.update()
            assert scaler.get_scale() == tscaler.get_scale()
            assert scaler.state_dict() == tscaler.state_dict()
            for p, t in zip(params, tparams):
                np.testing.assert_array_equal(bits(p) if dtype.itemsize == 2 else p,
                                              bits(t) if dtype.itemsize == 2
                                              else t.detach().numpy())
    p = fastsgd.Parameter(np.ones(3, np.float16))
    p.grad = np.ones(3, np.float16)
    scaler = fastsgd.amp.GradScaler()
    scaler.scale(np.float32(1))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
        scaler.unscale_(fastsgd.SGD([p], lr=0.1))


def test_grad_scaler_with_strided_float32_params_and_grads_matches_torch():
    """Strided params and grads (unscaled in place through dense copies, then
    stepped through them): grads, params and the scale as torch's."""
    rng = np.random.default_rng(9)
    views = [lambda a: a[..., 0], lambda a: a[:, :, 1].T]
    bases = [rng.standard_normal((6, 5, 2)).astype(np.float32) for _ in views]
    params = [fastsgd.Parameter(view(b.copy())) for view, b in zip(views, bases)]
    tparams = [torch.nn.Parameter(view(torch.from_numpy(b.copy()))) for view, b in
               zip(views, bases)]
    opt = fastsgd.SGD(params, lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(tparams, lr=0.1, momentum=0.9, foreach=False)
    scaler, tscaler = fastsgd.amp.GradScaler(init_scale=512.0), torch.amp.GradScaler(
        "cpu", init_scale=512.0)
    for step in range(4):
        scaler.scale(np.float32(1))
        tscaler.scale(torch.ones(()))
        for view, p, t in zip(views, params, tparams):
            g = (rng.standard_normal((6, 5, 2)) * 50).astype(np.float32)
            if step == 1:
                g[0, 0, :] = np.inf
            p.grad, t.grad = view(g), view(torch.from_numpy(g.copy()))
        scaler.unscale_(opt)
        tscaler.unscale_(topt)
        for p, t in zip(params, tparams):
            np.testing.assert_array_equal(p.grad, t.grad.numpy())
        scaler.step(opt)
        tscaler.step(topt)
        scaler.update()
        tscaler.update()
        assert scaler.get_scale() == tscaler.get_scale()
        for p, t in zip(params, tparams):
            np.testing.assert_array_equal(p, t.detach().numpy())


def test_grad_scaler_api_and_errors():
    p = fastsgd.Parameter(np.ones(4, ml_dtypes.bfloat16))
    opt = fastsgd.SGD([p], lr=0.1, master_weights=True)
    scaler = fastsgd.amp.GradScaler(init_scale=8.0)
    assert scaler.get_scale() == 8.0 and scaler.is_enabled()
    with pytest.raises(AssertionError, match="Attempted step but _scale is None"):
        scaler.step(opt)
    scaled = scaler.scale([np.ones(2, np.float32), (np.ones(1, np.float16),)])
    assert scaled[0].dtype == np.float32 and scaled[1][0].dtype == np.float16
    assert scaled[0][0] == 8.0 and scaled[1][0][0] == 8.0
    with pytest.raises(ValueError, match="outputs must be a Tensor or an iterable"):
        scaler.scale(1.0)
    p.grad = np.ones(4, ml_dtypes.bfloat16)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: 0.0)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) is being called after step"):
        scaler.unscale_(opt)
    scaler.update(new_scale=3.0)
    assert scaler.get_scale() == 3.0
    torch_scaler = torch.amp.GradScaler("cpu")
    torch_scaler.load_state_dict(scaler.state_dict())
    assert torch_scaler.state_dict() == scaler.state_dict()
    for bad in (dict(growth_factor=1.0), dict(backoff_factor=1.0)):
        with pytest.raises(AssertionError):
            fastsgd.amp.GradScaler(**bad)
    off = fastsgd.amp.GradScaler(enabled=False)
    x = np.ones(2, np.float32)
    assert off.scale(x) is x and off.state_dict() == {} and off.get_scale() == 1.0
    before = p.copy()
    off.step(opt)  # just steps
    assert not np.array_equal(bits(p), bits(before))


def test_skipped_step_creates_no_state_and_writes_nothing():
    p = fastsgd.Parameter(np.ones(100, np.float16))
    opt = fastsgd.SGD([p], lr=0.1, momentum=0.9, master_weights=True)
    scaler = fastsgd.amp.GradScaler()
    scaler.scale(np.float32(1))
    p.grad = np.ones(100, np.float16)
    p.grad[99] = np.inf
    scaler.step(opt)
    scaler.update()
    assert len(opt.state) == 0 and np.all(p == 1) and scaler.get_scale() == 2.0**15
    p.grad[99] = 1
    scaler.scale(np.float32(1))
    scaler.step(opt)
    assert set(opt.state[p]) == {"master_param", "momentum_buffer"}


# ------------------------------------------------------------------------- hostile inputs

def test_bfloat16_grad_on_float16_param_is_refused():
    p = fastsgd.Parameter(np.ones(3, np.float16))
    with pytest.raises(RuntimeError, match="with dtype 'bfloat16' to a parameter with dtype "
                                           "'float16'"):
        p.grad = np.ones(3, ml_dtypes.bfloat16)
    fastsgd.Parameter._grad.__set__(p, np.ones(3, ml_dtypes.bfloat16))  # the step's own rule
    opt = fastsgd.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match=r"grad has dtype bfloat16, but the parameter has "
                                        r"dtype float16"):
        opt.step()
    assert np.all(p == 1) and len(opt.state) == 0


def test_float32_state_loads_into_16_bit_params():
    p = fastsgd.Parameter(np.ones(3, ml_dtypes.bfloat16))
    opt = fastsgd.SGD([p], lr=0.1, momentum=0.9)
    opt.load_state_dict({"state": {0: {"momentum_buffer": np.array([0.9, 1.1, 1e-3],
                                                                     np.float32)}},
                         "param_groups": opt.state_dict()["param_groups"]})
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(buf, np.array([0.9, 1.1, 1e-3], np.float32).astype(
        ml_dtypes.bfloat16))


@pytest.mark.parametrize("dtype, key, value", [
    (np.float16, "lr", 1e5), (np.float16, "weight_decay", 7e4),
    (ml_dtypes.bfloat16, "lr", 1e39)], ids=["f16-lr", "f16-wd", "bf16-lr"])
def test_alpha_beyond_the_dtype_is_torch_error(dtype, key, value):
    """torch refuses an alpha that overflows the dtype; fastsgd too, before
    writing anything."""
    p = fastsgd.Parameter(np.ones(3, dtype))
    p.grad = np.ones(3, dtype)
    opt = fastsgd.SGD([p], lr=0.1, momentum=0.9)
    opt.param_groups[0][key] = value
    name = "c10::Half" if dtype == np.float16 else "c10::BFloat16"
    with pytest.raises(RuntimeError, match=f"value cannot be converted to type {name} "
                                           "without overflow"):
        opt.step()
    t = torch.nn.Parameter(to_torch(np.ones(3, dtype)))
    t.grad = to_torch(np.ones(3, dtype))
    topt = torch.optim.SGD([t], lr=0.1, momentum=0.9, foreach=False)
    topt.param_groups[0][key] = value
    with pytest.raises(RuntimeError, match=f"value cannot be converted to type {name}"):
        topt.step()
    assert np.all(p == 1) and len(opt.state) == 0


def test_max_values_overflow_as_torch(kernel):
    for cap in CAPABILITIES:
        kernel(cap)
        for dtype in DTYPES:
            big = np.full(70, np.finfo(np.float16).max if dtype == np.float16 else 3e38,
                          np.float32).astype(dtype)
            p, t = fastsgd.Parameter(big.copy()), torch.nn.Parameter(to_torch(big))
            p.grad, t.grad = -big, to_torch(-big)
            fastsgd.SGD([p], lr=0.5, momentum=0.9).step()
            torch.optim.SGD([t], lr=0.5, momentum=0.9, foreach=False).step()
            np.testing.assert_array_equal(bits(p), bits(t))
            assert np.isinf(p.astype(np.float32)).all()


@pytest.mark.parametrize("bad, error, message", [
    ("float32 param", TypeError, "master_weights=True needs float16 or bfloat16 parameters"),
    ("master dtype", TypeError, "master_param must be float32 with master weights"),
    ("master shape", ValueError, "master_param has shape \\(4,\\), but the parameter has "
                                 "shape \\(3,\\)"),
    ("buffer dtype", TypeError, "momentum_buffer must be float32 with master weights"),
    ("master aliases grad", ValueError, "master_param or momentum_buffer shares memory"),
])
def test_master_weights_bad_state_is_named(bad, error, message):
    p = fastsgd.Parameter(np.ones(3, np.float32 if bad == "float32 param" else np.float16))
    p.grad = np.ones(3, p.dtype)
    q = fastsgd.Parameter(np.ones(3, np.float16))
    q.grad = np.ones(3, np.float16)
    opt = fastsgd.SGD([q, p], lr=0.1, momentum=0.9, master_weights=True)
    if bad == "master dtype":
        opt.state[p]["master_param"] = np.ones(3, np.float16)
    elif bad == "master shape":
        opt.state[p]["master_param"] = np.ones(4, np.float32)
    elif bad == "buffer dtype":
        opt.state[p].update(master_param=np.ones(3, np.float32),
                            momentum_buffer=np.ones(3, np.float16))
    elif bad == "master aliases grad":
        raw = np.zeros(16, np.uint8)  # grad: bytes 0-5; master: bytes 4-15
        p.grad = raw[:6].view(np.float16)
        opt.state[p]["master_param"] = raw[4:].view(np.float32)
    with pytest.raises(error, match=message):
        opt.step()
    assert np.all(q == 1) and q not in opt.state


def test_without_ml_dtypes_everything_else_works(tmp_path):
    """A process that cannot import ml_dtypes steps float32 and float16, and a
    checkpoint holding bfloat16 is refused by name."""
    path = tmp_path / "bf16.ckpt"
    fastsgd.save({"x": np.ones(2, ml_dtypes.bfloat16)}, path)
    code = f"""
import sys
sys.modules["ml_dtypes"] = None  # import ml_dtypes now raises ImportError
import numpy as np
import fastsgd
for dtype in (np.float32, np.float16):
    p = fastsgd.Parameter(np.ones(3, dtype))
    p.grad = np.ones(3, dtype)
    fastsgd.SGD([p], lr=0.5, momentum=0.9).step()
    assert np.all(p == 0.5), p
try:
    fastsgd.load({str(path)!r})
except fastsgd.CheckpointError as e:
    assert "need ml_dtypes" in str(e), e
else:
    raise AssertionError("loaded")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ------------------------------------------------------------------ clipping, checkpoints

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clipping_16_bit_grads_matches_torch(dtype):
    rng = np.random.default_rng(9)
    grads = [rng.standard_normal(n).astype(np.float32).astype(dtype) for n in (100, 7, 1000)]
    params = [fastsgd.Parameter(np.zeros(g.shape, dtype)) for g in grads]
    tparams = [torch.nn.Parameter(to_torch(np.zeros(g.shape, dtype))) for g in grads]
    for p, t, g in zip(params, tparams, grads):
        p.grad, t.grad = g.copy(), to_torch(g)
    total = fastsgd.clip_grad_norm_(params, 1.0)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, 1.0, foreach=False)
    assert total.dtype == dtype
    eps = float(np.finfo(np.float16).eps if dtype == np.float16 else 2.0**-7)
    assert abs(float(total) - ttotal.item()) <= 2 * eps * abs(ttotal.item())
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p.grad.astype(np.float32), t.grad.float().numpy(),
                                   rtol=4 * eps, atol=1e-6)
    fastsgd.clip_grad_value_(params, 0.01)
    torch.nn.utils.clip_grad_value_(tparams, 0.01, foreach=False)
    for p, t in zip(params, tparams):
        np.testing.assert_array_equal(bits(p.grad), bits(t.grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_value_nan_rules_and_bounds_of_16_bit_grads(kernel, dtype):
    """NaN elements as torch's clamp gives them (its vector body rounds them,
    its scalar remainder keeps their bits), a NaN clip_value everywhere (torch's
    default foreach path), and a bound beyond the dtype refused as torch does."""
    rng = np.random.default_rng(11)
    nan_bits = {np.dtype(np.float16): [0x7C01, 0xFE05, 0x7E00],
                np.dtype(ml_dtypes.bfloat16): [0x7F81, 0xFFC3, 0x7FC0]}[dtype]
    for capability in CAPABILITIES:
        kernel(capability)
        for clip_value in [1.0, np.inf, -np.inf, 0.0, np.nan, -np.nan]:
            grads = [rng.standard_normal(n).astype(np.float32).astype(dtype) for n in (100, 7, 64)]
            for g in grads:
                g.view(np.uint16)[rng.choice(g.size, 5)] = rng.choice(nan_bits, 5)
            params = [fastsgd.Parameter(np.zeros(g.shape, dtype)) for g in grads]
            tparams = [torch.nn.Parameter(to_torch(np.zeros(g.shape, dtype))) for g in grads]
            for p, t, g in zip(params, tparams, grads):
                p.grad, t.grad = g.copy(), to_torch(g)
            fastsgd.clip_grad_value_(params, clip_value)
            torch.nn.utils.clip_grad_value_(tparams, clip_value)
            for p, t in zip(params, tparams):
                np.testing.assert_array_equal(bits(p.grad), bits(t.grad), err_msg=str(clip_value))
    too_big = float(np.nextafter(float(ml_dtypes.finfo(dtype).max), np.inf))
    with pytest.raises(RuntimeError) as ours:
        fastsgd.clip_grad_value_(params, too_big)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_value_(tparams, too_big)
    assert str(ours.value) == str(theirs.value)
    for p, t in zip(params, tparams):
        np.testing.assert_array_equal(bits(p.grad), bits(t.grad))


def test_checkpoint_keeps_16_bit_state(tmp_path):
    p = fastsgd.Parameter(np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3))
    h = fastsgd.Parameter(np.arange(4, dtype=np.float16))
    opt = fastsgd.SGD([p, h], lr=0.1, momentum=0.9)
    p.grad, h.grad = np.ones((2, 3), ml_dtypes.bfloat16), np.ones(4, np.float16)
    opt.step()
    fastsgd.save({"opt": opt.state_dict(), "p": p, "scalar": p[0, 1]}, tmp_path / "c")
    back = fastsgd.load(tmp_path / "c")
    assert back["p"].dtype == ml_dtypes.bfloat16 and isinstance(back["p"], fastsgd.Parameter)
    assert type(back["scalar"]) is ml_dtypes.bfloat16
    for i, arr in ((0, p), (1, h)):
        buf = back["opt"]["state"][i]["momentum_buffer"]
        assert buf.dtype == arr.dtype
        np.testing.assert_array_equal(bits(buf), bits(opt.state[arr]["momentum_buffer"]))


def test_rooflines_of_16_bit_steps():
    """The benchmark's rooflines take bfloat16 Parameters (reading their
    objects, too) and master weights."""
    params = [fastsgd.Parameter(np.ones(40, ml_dtypes.bfloat16)) for _ in range(3)]
    for p in params:
        p.grad = np.ones(40, ml_dtypes.bfloat16)
    buffers = [np.zeros(40, ml_dtypes.bfloat16) for _ in params]
    fastsgd._native.Roofline(params, [p.grad for p in params], buffers, True)()
    masters = [np.ones(40, np.float32) for _ in params]
    fastsgd._native.Roofline(params, [p.grad for p in params],
                             [np.zeros(40, np.float32) for _ in params], masters=masters)()
    assert all(np.isfinite(p.astype(np.float32)).all() for p in params)
