"""Bit-for-bit parity of fastsgd.SGD with torch.optim.SGD(foreach=False) and
with fastsgd.reference, over every combination of the SGD options.

torch fixes its kernels' rounding when it is imported (ATEN_CPU_CAPABILITY):
in this process the fused kernels are compared with torch as it runs here,
and `test_grid_at_torch_default_capability` reruns this file in a child with
torch and fastsgd both at "default" (unfused) rounding.
"""
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import fastsgd
from fastsgd import reference

torch = pytest.importorskip("torch")
torch_functional_sgd = pytest.importorskip("torch.optim.sgd").sgd

TORCH_IS_DEFAULT = torch.backends.cpu.get_cpu_capability() == "DEFAULT"
# The fastsgd kernels that round as torch does in this process.
CAPABILITIES = (["default"] if TORCH_IS_DEFAULT
                else [c for c in fastsgd.available_capabilities() if c != "default"])

SHAPES = [(0,), (1,), (7,), (15,), (16,), (17,), (1000,), (100003,), (3, 5, 7), (2, 0, 3), ()]

OPTIONS = [
    dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
         weight_decay=weight_decay, maximize=maximize)
    for momentum in (0.0, 0.9)
    for dampening in (0.0, 0.3)
    for nesterov in (False, True)
    for weight_decay in (0.0, 1e-3)
    for maximize in (False, True)
    if not (nesterov and (momentum == 0 or dampening != 0))
    and not (momentum == 0 and dampening != 0)
]


def option_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    previous = fastsgd.cpu_capability()
    fastsgd.set_cpu_capability(request.param)
    yield request.param
    fastsgd.set_cpu_capability(previous)


class Twins:
    """The same model as fastsgd, torch and reference parameters."""

    def __init__(self, rng, shapes, dtype):
        self.values = [rng.standard_normal(s).astype(dtype) for s in shapes]
        self.fast = [fastsgd.Parameter(v.copy()) for v in self.values]
        self.ref = [fastsgd.Parameter(v.copy()) for v in self.values]
        self.torch = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in self.values]

    def set_grads(self, rng, present):
        for i, p in enumerate(self.fast):
            if present(i):
                g = rng.standard_normal(p.shape).astype(p.dtype)
                self.fast[i].grad, self.ref[i].grad = g, g.copy()
                self.torch[i].grad = torch.from_numpy(g.copy())
            else:
                self.fast[i].grad = self.ref[i].grad = self.torch[i].grad = None


def assert_same(fast_opt, torch_opt, ref_opt, twins):
    """Params and momentum buffers identical to the last bit."""
    for i, (p, tp, rp) in enumerate(zip(twins.fast, twins.torch, twins.ref)):
        np.testing.assert_array_equal(p, tp.detach().numpy(), err_msg=f"param {i} vs torch")
        np.testing.assert_array_equal(p, rp, err_msg=f"param {i} vs reference")
        buf = fast_opt.state[p].get("momentum_buffer") if p in fast_opt.state else None
        tbuf = torch_opt.state[tp].get("momentum_buffer") if tp in torch_opt.state else None
        rbuf = ref_opt.state[rp].get("momentum_buffer") if rp in ref_opt.state else None
        assert (buf is None) == (tbuf is None) == (rbuf is None), f"buffer {i} presence"
        if buf is not None:
            np.testing.assert_array_equal(buf, tbuf.numpy(), err_msg=f"buffer {i} vs torch")
            np.testing.assert_array_equal(buf, rbuf, err_msg=f"buffer {i} vs reference")
    assert len(fast_opt.state) == len(torch_opt.state) == len(ref_opt.state)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_grid(capability, dtype, options):
    """Two groups (the fine-tuning idiom), grads missing on some steps, lr
    changed between steps, a group added between steps."""
    rng = np.random.default_rng(zlib.crc32(f"{dtype.__name__} {option_id(options)}".encode()))
    lr = 0.05
    base = Twins(rng, SHAPES, dtype)
    head = Twins(rng, [(4, 6), (6,)], dtype)
    late = Twins(rng, [(33,), (5, 2)], dtype)

    def groups(params_base, params_head):
        return [{"params": params_base}, {"params": params_head, "lr": lr * 10}]

    fast_opt = fastsgd.SGD(groups(base.fast, head.fast), lr=lr, **options)
    ref_opt = reference.SGD(groups(base.ref, head.ref), lr=lr, **options)
    torch_opt = torch.optim.SGD(groups(base.torch, head.torch), lr=lr, foreach=False,
                                **options)
    optimizers = (fast_opt, torch_opt, ref_opt)
    models = (base, head, late)

    for step in range(5):
        if step == 2:  # lr changed between steps
            for opt in optimizers:
                opt.param_groups[0]["lr"] = lr * 0.3
        if step == 3:  # a group added between steps
            for opt, params in zip(optimizers, (late.fast, late.torch, late.ref)):
                opt.add_param_group({"params": params, "lr": lr * 2})
        for twins in models:
            # Some grads missing: a param whose grad appears late starts its
            # momentum buffer then.
            twins.set_grads(rng, lambda i, step=step: (i + step) % 3 != 0)
        grads_before = [None if p.grad is None else p.grad.copy() for p in base.fast]
        for opt in optimizers:
            opt.step()
        for twins in models[:2] + ((late,) if step >= 3 else ()):
            assert_same(fast_opt, torch_opt, ref_opt, twins)
        for p, g in zip(base.fast, grads_before):  # p.grad is never modified
            assert (p.grad is None) if g is None else np.array_equal(p.grad, g)


# Strided parameters: (name, base shape, the view).  torch has no negative
# strides: its twin of a reversed view is a contiguous copy (same values).
LAYOUTS = [
    ("transposed", (6, 9), lambda a: a.T),
    ("sliced with a step", (8, 9), lambda a: a[1::3, ::2]),
    ("negative step", (7, 5), lambda a: a[::-2, ::-1]),
    ("[..., 0] of 3-d", (10, 5, 2), lambda a: a[..., 0]),
    ("transposed column of 3-d", (5, 4, 3), lambda a: a[:, :, 1].T),
    ("zero-size", (4, 6), lambda a: a[:0, ::2]),
    ("0-d", (3, 4), lambda a: a[1, 2, ...]),
]
NEGATIVE = {"negative step"}


class StridedTwins:
    """A strided parameter per layout, as fastsgd, reference and torch
    parameters viewing bases of the same values."""

    def __init__(self, rng, dtype):
        self.bases = [rng.standard_normal(shape).astype(dtype) for _, shape, _ in LAYOUTS]
        self.fast_bases = [b.copy() for b in self.bases]
        self.fast = [fastsgd.Parameter(view(b)) for b, (_, _, view) in
                     zip(self.fast_bases, LAYOUTS)]
        self.ref = [fastsgd.Parameter(view(b.copy())) for b, (_, _, view) in
                    zip(self.bases, LAYOUTS)]
        self.torch = [torch.nn.Parameter(_torch_view(b.copy(), name, view))
                      for b, (name, _, view) in zip(self.bases, LAYOUTS)]

    def set_grads(self, rng, step):
        for i, (name, shape, view) in enumerate(LAYOUTS):
            base = rng.standard_normal(shape).astype(self.bases[i].dtype)
            g = view(base)
            if step % 2:  # contiguous grads on odd steps, in the other order if 2-d
                g = np.array(g, order="F" if g.flags.c_contiguous and g.ndim > 1 else "C")
            self.fast[i].grad, self.ref[i].grad = g, g.copy()
            self.torch[i].grad = _torch_view(base, name, view) if step % 2 == 0 else \
                torch.from_numpy(np.array(g))


def _torch_view(base, name, view):
    if name in NEGATIVE:
        return torch.from_numpy(np.ascontiguousarray(view(base)))
    return view(torch.from_numpy(base))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_strided_parameters(capability, dtype, options):
    """Parameters and grads of every layout, stepped in place through
    contiguous copies, equal torch's and the reference's, and nothing else
    of their bases changes."""
    rng = np.random.default_rng(zlib.crc32(f"strided {dtype.__name__} "
                                           f"{option_id(options)}".encode()))
    twins = StridedTwins(rng, dtype)
    # one contiguous parameter beside them, on the fast path
    dense = Twins(rng, [(4, 3)], dtype)
    fast_opt = fastsgd.SGD(twins.fast + dense.fast, lr=0.05, **options)
    ref_opt = reference.SGD(twins.ref + dense.ref, lr=0.05, **options)
    torch_opt = torch.optim.SGD(twins.torch + dense.torch, lr=0.05, foreach=False, **options)
    for step in range(4):
        twins.set_grads(rng, step)
        dense.set_grads(rng, lambda i: True)
        for opt in (fast_opt, torch_opt, ref_opt):
            opt.step()
        assert_same(fast_opt, torch_opt, ref_opt, twins)
        assert_same(fast_opt, torch_opt, ref_opt, dense)
    for p, base, original, (_, _, view) in zip(twins.fast, twins.fast_bases, twins.bases,
                                               LAYOUTS):
        assert p.size == 0 or np.shares_memory(p, base)
        untouched = np.ones(base.shape, bool)
        view(untouched)[...] = False
        np.testing.assert_array_equal(base[untouched], original[untouched])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_matches_torch(capability, dtype):
    rng = np.random.default_rng(3)
    twins = Twins(rng, [(17,), (3, 4)], dtype)
    bufs, tbufs = [None, None], [None, None]
    options = dict(weight_decay=1e-2, momentum=0.8, lr=0.1, dampening=0.1,
                   nesterov=False, maximize=False)
    for _ in range(3):
        twins.set_grads(rng, lambda i: True)
        fastsgd.functional.sgd(twins.fast, [p.grad for p in twins.fast], bufs, **options)
        torch_functional_sgd([p.data for p in twins.torch], [p.grad for p in twins.torch],
                             tbufs, foreach=False, **options)
        for p, tp, b, tb in zip(twins.fast, twins.torch, bufs, tbufs):
            np.testing.assert_array_equal(p, tp.detach().numpy())
            np.testing.assert_array_equal(b, tb.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_strided_matches_torch(capability, dtype):
    rng = np.random.default_rng(6)
    base = rng.standard_normal((6, 8, 2)).astype(dtype)
    params = [fastsgd.Parameter(base.copy()[..., 0].T)]
    tparams = [torch.from_numpy(base.copy())[..., 0].T]
    bufs, tbufs = [None], [None]
    options = dict(weight_decay=1e-2, momentum=0.8, lr=0.1, dampening=0.1,
                   nesterov=False, maximize=False)
    for _ in range(3):
        g = rng.standard_normal((6, 8, 2)).astype(dtype)
        fastsgd.functional.sgd(params, [g[:, :, 1].T], bufs, **options)
        torch_functional_sgd(tparams, [torch.from_numpy(g)[:, :, 1].T], tbufs, foreach=False,
                             **options)
        np.testing.assert_array_equal(params[0], tparams[0].numpy())
        np.testing.assert_array_equal(bufs[0], tbufs[0].numpy())


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_large_staged_copies_match_reference(dtype):
    """Staged tensors large enough for the tiled transposing copy (their
    fastest dimension differs from their copy's), odd sizes, 3-d and
    negative strides: params, grads and buffers as the reference steps them."""
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16 if dtype == "bfloat16"
                     else dtype)
    rng = np.random.default_rng(9)
    views = [(lambda a: a.T, (130, 77)), (lambda a: a[::-1, 1:].T, (99, 141)),
             (lambda a: a.transpose(2, 0, 1)[:, ::2], (9, 70, 33))]

    def values(shape):
        return np.asarray(rng.standard_normal(shape), np.float32).astype(dtype)

    starts = [values(shape) for _, shape in views]
    fast = [fastsgd.Parameter(view(v.copy())) for v, (view, _) in zip(starts, views)]
    ref = [fastsgd.Parameter(view(v.copy())) for v, (view, _) in zip(starts, views)]
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    opts = [fastsgd.SGD(fast, **options), reference.SGD(ref, **options)]
    for step in range(3):
        for p, r in zip(fast, ref):
            g = values(p.shape)   # C order: each parameter's fastest dimension is another
            p.grad, r.grad = (g, g.copy()) if step != 1 else (g.T.copy().T, g.T.copy().T)
        for opt in opts:
            opt.step()
        for p, r in zip(fast, ref):
            np.testing.assert_array_equal(p.view(f"u{dtype.itemsize}"), r.view(f"u{dtype.itemsize}"))
            np.testing.assert_array_equal(opts[0].state[p]["momentum_buffer"],
                                          opts[1].state[r]["momentum_buffer"])


def test_one_native_call_per_group_and_dtype():
    rng = np.random.default_rng(4)
    f32 = [fastsgd.Parameter(rng.standard_normal(5).astype(np.float32)) for _ in range(20)]
    f64 = [fastsgd.Parameter(rng.standard_normal(5)) for _ in range(20)]
    head = [fastsgd.Parameter(rng.standard_normal(5).astype(np.float32)) for _ in range(7)]
    for p in f32 + f64 + head:
        p.grad = np.ones_like(p)
    opt = fastsgd.SGD([{"params": f32 + f64}, {"params": head}], lr=0.1, momentum=0.9)
    before = fastsgd._native.native_call_count()
    opt.step()
    assert fastsgd._native.native_call_count() - before == 3


def test_fortran_ordered_parameter_is_updated_in_place():
    rng = np.random.default_rng(5)
    values = np.asfortranarray(rng.standard_normal((6, 4)))
    p = fastsgd.Parameter(values)
    assert np.shares_memory(p, values)
    twin = fastsgd.Parameter(np.ascontiguousarray(values))
    p.grad = np.asfortranarray(rng.standard_normal((6, 4)))
    twin.grad = np.ascontiguousarray(p.grad)
    for opt in (fastsgd.SGD([p], lr=0.1, momentum=0.9), fastsgd.SGD([twin], lr=0.1, momentum=0.9)):
        opt.step()
        opt.step()
    np.testing.assert_array_equal(p, twin)
    np.testing.assert_array_equal(values, twin)


@pytest.mark.skipif(TORCH_IS_DEFAULT, reason="this is the child run")
def test_grid_at_torch_default_capability():
    """torch at ATEN_CPU_CAPABILITY=default rounds multiply and add separately;
    fastsgd's "default" kernel must match it bit for bit."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", FASTSGD_CPU_CAPABILITY="default")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "test_grid or test_functional"],
        env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_environment_variable_selects_the_kernel():
    code = "import fastsgd; print(fastsgd.cpu_capability())"
    for name in fastsgd.available_capabilities():
        env = dict(os.environ, FASTSGD_CPU_CAPABILITY=name)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == name
    env = dict(os.environ, FASTSGD_CPU_CAPABILITY="sse9")
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "unknown or unsupported CPU capability 'sse9'" in failed.stderr
