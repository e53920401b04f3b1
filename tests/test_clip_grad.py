"""Gradient clipping against torch.nn.utils: totals and clipped grads within
the documented tolerance (fastsgd/clip_grad.py), value clipping exactly."""
import math
import pathlib

import numpy as np
import pytest

import fastsgd

torch = pytest.importorskip("torch")

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def twins(dtypes, seed=0, scale=1.0, empty=True):
    rng = np.random.default_rng(seed)
    shapes = [(1,), (7,), (1000,), (33, 17), (), (100_003,)] + [(0,)] * empty
    fast, ref = [], []
    for k, shape in enumerate(shapes):
        dtype = dtypes[k % len(dtypes)]
        p = fastsgd.Parameter(rng.standard_normal(shape).astype(dtype))
        p.grad = np.asarray(scale * rng.standard_normal(shape), dtype=dtype)
        t = torch.nn.Parameter(torch.from_numpy(np.array(p)))
        t.grad = torch.from_numpy(p.grad.copy())
        fast.append(p)
        ref.append(t)
    return fast, ref


@pytest.mark.parametrize("dtypes", [(np.float32,), (np.float64,), (np.float32, np.float64)],
                         ids=["f32", "f64", "mixed"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), -float("inf"), 0.0, 3.5, 0.5, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(dtypes, norm_type, max_norm):
    # torch refuses infinity norms over an empty grad (tested below)
    fast, ref = twins(dtypes, empty=not np.isinf(float(norm_type)))
    total = fastsgd.clip_grad_norm_(fast, max_norm, norm_type)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    rtol = max(TOLERANCE[d] for d in dtypes)
    assert total.dtype == ref_total.numpy().dtype
    np.testing.assert_allclose(total, ref_total.numpy(), rtol=rtol)
    for p, t in zip(fast, ref):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=rtol, atol=0)


def exact_norm(grads, p):
    """The p-norm of all elements, from the grads converted to float64 (an
    exactly rounded sum: math.fsum), within a few units of float64."""
    values = np.concatenate([np.abs(np.asarray(g, np.float64)).ravel() for g in grads])
    if p == math.inf:
        return float(values.max())
    if p == -math.inf:
        return float(values.min())
    return math.fsum((values ** p).tolist()) ** (1 / p)


def stated_bounds(grads, p):
    """fastsgd's and torch's bounds on the total's relative error, as
    fastsgd/clip_grad.py states them (plus the reference's few float64 units)."""
    unit = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}
    dtypes = {g.dtype for g in grads}
    n, k, m = max(g.size for g in grads), len(grads), max(1.0, 1.0 / p)
    u = unit[np.dtype(np.float64)] if np.dtype(np.float64) in dtypes else unit[np.dtype(np.float32)]
    mixed = 2.0**-24 if len(dtypes) > 1 else 0.0
    reference = 8 * 2.0**-53
    fast = m * ((n / 8 + 4) * 2.0**-53 + (k + 3) * u) + mixed + reference
    torch_bound = m * (n + k + 3) * max(unit[d] for d in dtypes) + reference
    return fast, torch_bound


@pytest.mark.parametrize("dtypes", [(np.float32,), (np.float64,), (np.float32, np.float64)],
                         ids=["f32", "f64", "mixed"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, 0.5, 7.0, math.inf, -math.inf])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_clip_grad_norm_within_the_stated_bounds_of_the_exact_norm(dtypes, norm_type, scale):
    """The total against an exact reference with the bounds the module states,
    and against torch with the sum of both bounds (torch's float32 grads are
    accumulated in float32: the larger error on big grads)."""
    rng = np.random.default_rng(7)
    sizes = [300_001, 17, 4096, 1, 65_537]
    grads = [(scale * rng.standard_normal(n)).astype(dtypes[i % len(dtypes)])
             for i, n in enumerate(sizes)]
    exact = exact_norm(grads, norm_type)
    fast_bound, torch_bound = stated_bounds(grads, norm_type)
    params = [fastsgd.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    total = fastsgd.clip_grad_norm_(params, 1e-3 * exact, norm_type)
    ref = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype)) for g in grads]
    for t, g in zip(ref, grads):
        t.grad = torch.from_numpy(g.copy())
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1e-3 * exact, norm_type).item()
    assert abs(float(total) - exact) <= fast_bound * exact
    assert abs(ref_total - exact) <= torch_bound * exact
    assert abs(float(total) - ref_total) <= (fast_bound + torch_bound) * exact
    for p, t in zip(params, ref):  # the clipped grads: the totals' error and one rounding
        u = 2.0**-24 if p.grad.dtype == np.float32 else 2.0**-53
        np.testing.assert_allclose(p.grad, t.grad.numpy(),
                                   rtol=fast_bound + torch_bound + 2 * u, atol=0)


def test_the_documented_clipping_bounds_are_the_measured_ones():
    """README and the guide state the bounds this file measures, not older
    tolerances the measurements contradict."""
    root = pathlib.Path(__file__).resolve().parent.parent
    for path in ("README.md", "docs/guide/numpy.md"):
        text = " ".join((root / path).read_text().split())
        assert "1e-12 (float64)" not in text and "1e-5 (float32)" not in text, path
    guide = " ".join((root / "docs/guide/numpy.md").read_text().split())
    assert "`m·((n/8 + 4)·2⁻⁵³ + (k + 3)·u)`" in guide and "`m·(n + k + 3)·u`" in guide
    assert "(n/8 + 4) * 2**-53 + (k + 3) * u" in fastsgd.clip_grad.__doc__


@pytest.mark.parametrize("norm_type", [float("inf"), -float("inf")])
def test_infinity_norms_of_an_empty_grad_fail_as_in_torch(norm_type):
    fast, ref = twins((np.float32,))
    with pytest.raises(RuntimeError) as ours:
        fastsgd.clip_grad_norm_(fast, 1.0, norm_type)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    assert str(ours.value) == str(theirs.value)
    for p, t in zip(fast, ref):  # nothing was scaled
        np.testing.assert_array_equal(p.grad, t.grad.numpy())


def test_a_lone_parameter_and_no_grads():
    p = fastsgd.Parameter(np.ones(4, np.float32))
    p.grad = np.full(4, 3.0, np.float32)
    assert fastsgd.clip_grad_norm_(p, 1.0) == np.float32(6.0)
    np.testing.assert_allclose(p.grad, 3.0 / (6.0 + 1e-6), rtol=1e-6)
    q = fastsgd.Parameter(np.ones(4, np.float32))
    assert fastsgd.clip_grad_norm_([q], 1.0) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        fastsgd.clip_grad_norm_((x for x in []), 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_norms_as_torch(bad):
    fast, ref = twins((np.float32,), seed=1)
    fast[2].grad[5] = bad
    ref[2].grad[5] = bad
    with pytest.raises(RuntimeError) as ours:
        fastsgd.clip_grad_norm_(fast, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    total = fastsgd.clip_grad_norm_(fast, 1.0)  # scaled by the non-finite norm anyway
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    np.testing.assert_array_equal(total, ref_total.numpy())
    for p, t in zip(fast, ref):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_value_is_torchs_clamp_exactly(dtype):
    fast, ref = twins((dtype,), seed=2, scale=3.0)
    fast[1].grad[2] = ref[1].grad[2] = np.nan
    fastsgd.clip_grad_value_(fast, 1.25)
    torch.nn.utils.clip_grad_value_(ref, 1.25)
    for p, t in zip(fast, ref):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip_value", [np.nan, -np.nan, np.inf, -np.inf, 0.0, -1.0, 1e-300])
def test_clip_grad_value_special_bounds_are_torchs_bit_for_bit(dtype, clip_value):
    """A NaN clip_value makes every element that NaN (torch's clamp_min then
    clamp_max, its default foreach path); infinities and negatives as torch."""
    fast, ref = twins((dtype,), seed=4, scale=3.0)
    fast[2].grad[:3] = ref[2].grad[:3] = torch.tensor([np.nan, np.inf, -np.inf])
    fastsgd.clip_grad_value_(fast, clip_value)
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    uint = np.uint32 if dtype == np.float32 else np.uint64
    for p, t in zip(fast, ref):
        np.testing.assert_array_equal(p.grad.view(uint), t.grad.numpy().view(uint))


@pytest.mark.parametrize("clip_value", [
    3.5e38, -3.5e38, 1e300, np.nextafter(float(np.finfo(np.float32).max), np.inf)])
def test_clip_grad_value_beyond_a_dtype_fails_as_torch_before_any_change(clip_value):
    fast, ref = twins((np.float64, np.float32), seed=5)
    before = [p.grad.copy() for p in fast]
    with pytest.raises(RuntimeError) as ours:
        fastsgd.clip_grad_value_(fast, clip_value)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_value_(ref, clip_value)
    assert str(ours.value) == str(theirs.value) == (
        "value cannot be converted to type float without overflow")
    for p, b in zip(fast, before):
        np.testing.assert_array_equal(p.grad, b)
    fastsgd.clip_grad_value_(fast[::2], clip_value)  # float64 grads alone take it
    torch.nn.utils.clip_grad_value_(ref[::2], clip_value)
    for p, t in zip(fast, ref):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())


def test_norms_are_identical_on_every_instruction_set():
    fast, _ = twins((np.float32, np.float64), seed=3)
    grads, positions = [p.grad for p in fast], list(range(len(fast)))
    previous = fastsgd.cpu_capability()
    try:
        results = []
        for capability in fastsgd.available_capabilities():
            fastsgd.set_cpu_capability(capability)
            results.append(fastsgd._native.grad_norms(grads, positions, 2.0))
    finally:
        fastsgd.set_cpu_capability(previous)
    for norms in results:
        np.testing.assert_array_equal(norms, results[0])


def test_bad_grads_are_named():
    p = fastsgd.Parameter(np.ones(4))
    q = fastsgd.Parameter(np.ones(4))
    p.grad, q.grad = np.ones(4), np.ones(8)[::2]
    with pytest.raises(ValueError, match=r"^params\[1\]: grad must be contiguous"):
        fastsgd.clip_grad_norm_([p, q], 1.0)
    fastsgd.Parameter._grad.__set__(q, np.ones(4, np.int64))  # p.grad = g would refuse it
    with pytest.raises(TypeError, match=r"^params\[1\]: grad must be float32, float64, float16 or bfloat16"):
        fastsgd.clip_grad_value_([p, q], 1.0)


STRIDED = [lambda a: a[..., 0], lambda a: a[:, :, 1].T, lambda a: a[::2, ::-1, 2]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_clip_grad_value_of_strided_grads_is_torchs_clamp(dtype):
    """Element-wise: a strided grad is clamped through a dense copy, in place,
    with the bits torch's clamp_ gives (16-bit included)."""
    rng = np.random.default_rng(7)
    bases = [rng.standard_normal((9, 6, 3)).astype(dtype) for _ in STRIDED]
    params = [fastsgd.Parameter(view(b).copy()) for view, b in zip(STRIDED, bases)]
    for p, view, b in zip(params, STRIDED, bases):
        p.grad = view(b)
    expected = [torch.from_numpy(np.ascontiguousarray(p.grad)).clamp_(-0.5, 0.5).numpy()
                for p in params]
    fastsgd.clip_grad_value_(params, 0.5)
    for p, view, b, e in zip(params, STRIDED, bases, expected):
        assert np.shares_memory(p.grad, b)
        np.testing.assert_array_equal(view(b), e)


def test_clip_grad_norm_refuses_strided_grads():
    """torch sums a strided tensor in an order of its own: its norm differs
    from the dense one's in the last bits, so fastsgd refuses rather than
    differ."""
    p = fastsgd.Parameter(np.ones((4, 3)))
    p.grad = np.ones((4, 3, 2))[..., 0]
    with pytest.raises(ValueError, match=r"^params\[0\]: grad must be contiguous \(C or Fortran "
                                         r"order\) for a norm"):
        fastsgd.clip_grad_norm_([p], 1.0)
    np.testing.assert_array_equal(p.grad, 1.0)


def test_strided_grads_that_overlap_are_refused():
    raw = np.ones(6)
    p, q = fastsgd.Parameter(np.ones(3)), fastsgd.Parameter(np.ones((3, 2)))
    p.grad = raw[::2]
    q.grad = np.lib.stride_tricks.as_strided(np.ones(3), (3, 2), (8, 0), writeable=True)
    with pytest.raises(ValueError, match=r"^params\[1\]: grad: unsupported operation: more than "
                                         r"one element of the written-to tensor"):
        fastsgd.clip_grad_value_([p, q], 0.5)
    q = fastsgd.Parameter(np.ones(3))
    q.grad = raw[4::-2]  # p.grad's elements, reversed
    with pytest.raises(ValueError, match=r"^params\[0\]: grad is not contiguous and shares "
                                         r"memory with another grad"):
        fastsgd.clip_grad_value_([p, q], 0.5)
    np.testing.assert_array_equal(raw, 1.0)


@pytest.mark.parametrize("call", [lambda g, pos: fastsgd._native.grad_norms(g, pos, 2.0),
                                  lambda g, pos: fastsgd._native.scale_grads(g, pos, 0.5),
                                  lambda g, pos: fastsgd._native.clamp_grads(g, pos, -1.0, 1.0)],
                         ids=["norms", "scale", "clamp"])
def test_the_native_loops_refuse_positions_of_another_length(call):
    grads = [np.ones(3, np.float32), np.ones(2)]
    with pytest.raises(ValueError, match="got 2 grads and 1 positions"):
        call(grads, [0])


# ------------------------------------------- get_total_norm and clip_grads_with_norm_

ml_dtypes = pytest.importorskip("ml_dtypes")
ALL_DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
# a 16-bit total is rounded to its dtype: one unit in its last place
HALF_TOLERANCE = {np.float16: 2.0 ** -10, ml_dtypes.bfloat16: 2.0 ** -7}


def torch_twin(array):
    array = np.array(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def as_numpy(tensor):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def twins_of(dtypes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = [(1,), (7,), (1000,), (33, 17), (), (100_003,)]
    fast, ref = [], []
    for k, shape in enumerate(shapes):
        dtype = dtypes[k % len(dtypes)]
        p = fastsgd.Parameter(np.zeros(shape, dtype))
        p.grad = np.asarray(scale * rng.standard_normal(shape), np.float32).astype(dtype)
        t = torch.nn.Parameter(torch_twin(p))
        t.grad = torch_twin(p.grad)
        fast.append(p)
        ref.append(t)
    return fast, ref


DTYPE_SETS = [[d] for d in ALL_DTYPES] + [[np.float32, np.float64], [np.float16, np.float32],
                                          [ml_dtypes.bfloat16, np.float16],
                                          [np.float64, ml_dtypes.bfloat16, np.float16]]
DTYPE_IDS = ["f32", "f64", "f16", "bf16", "f32+f64", "f16+f32", "bf16+f16", "f64+bf16+f16"]


@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.5])
def test_get_total_norm_matches_torch(dtypes, norm_type):
    fast, ref = twins_of(dtypes)
    total = fastsgd.get_total_norm([p.grad for p in fast], norm_type)
    ref_total = torch.nn.utils.get_total_norm([t.grad for t in ref], norm_type)
    assert total.dtype == as_numpy(ref_total).dtype
    rtol = max(TOLERANCE.get(d, HALF_TOLERANCE.get(d)) for d in dtypes)
    np.testing.assert_allclose(np.float64(total), as_numpy(ref_total).astype(np.float64),
                               rtol=rtol)


def test_get_total_norm_of_one_array_none_and_non_finite_as_torch():
    g = np.array([3.0, 4.0], np.float32)
    assert fastsgd.get_total_norm(g) == np.float32(5.0)
    assert fastsgd.get_total_norm(iter([g, g]), 1.0, foreach=True) == np.float32(14.0)
    empty = fastsgd.get_total_norm([])
    assert empty.dtype == torch.nn.utils.get_total_norm([]).numpy().dtype and empty == 0.0
    bad = np.array([1.0, np.inf], np.float32)
    with pytest.raises(RuntimeError) as ours:
        fastsgd.get_total_norm([bad], error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.get_total_norm([torch.from_numpy(bad)], error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    assert np.isinf(fastsgd.get_total_norm([bad]))


@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_norm", [0.5, 37.0, 1e6])
def test_clip_grads_with_norm_is_torchs_exactly_given_the_total(dtypes, max_norm):
    fast, ref = twins_of(dtypes, seed=1)
    ref_total = torch.nn.utils.get_total_norm([t.grad for t in ref])
    for total_norm in (as_numpy(ref_total), as_numpy(ref_total) * 3, np.float32(np.nan)):
        fast, ref = twins_of(dtypes, seed=1)
        total = torch_twin(total_norm)
        fastsgd.clip_grads_with_norm_(fast, max_norm, total_norm)
        torch.nn.utils.clip_grads_with_norm_(ref, max_norm, total)
        for p, t in zip(fast, ref):
            theirs = as_numpy(t.grad)
            assert p.grad.dtype == theirs.dtype
            if np.isnan(total_norm) and p.grad.dtype.itemsize == 2:
                # the scale loop gives 16-bit NaNs its vector body's bits
                assert np.isnan(p.grad.astype(np.float32)).all()
                assert np.isnan(theirs.astype(np.float32)).all()
            else:
                assert p.grad.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=DTYPE_IDS)
def test_clip_grad_norm_is_the_two_halves(dtypes):
    fast, _ = twins_of(dtypes, seed=2, scale=3.0)
    split, _ = twins_of(dtypes, seed=2, scale=3.0)
    total = fastsgd.clip_grad_norm_(fast, 1.0)
    split_total = fastsgd.get_total_norm([p.grad for p in split])
    fastsgd.clip_grads_with_norm_(split, 1.0, split_total)
    assert total.dtype == split_total.dtype and total.tobytes() == split_total.tobytes()
    for p, q in zip(fast, split):
        assert p.grad.tobytes() == q.grad.tobytes()


def test_clip_grads_with_norm_arguments():
    p = fastsgd.Parameter(np.ones(2, np.float32))
    p.grad = np.full(2, 4.0, np.float32)
    with pytest.raises(TypeError, match="total_norm must be a numpy scalar or 0-d array"):
        fastsgd.clip_grads_with_norm_(p, 1.0, 8.0)
    with pytest.raises(ValueError, match=r"dtype float32 and shape \(1,\)"):
        fastsgd.clip_grads_with_norm_(p, 1.0, np.ones(1, np.float32))
    with pytest.raises(ValueError, match="dtype int64"):
        fastsgd.clip_grads_with_norm_(p, 1.0, np.int64(8))
    np.testing.assert_array_equal(p.grad, 4.0)
    fastsgd.clip_grads_with_norm_(p, 1.0, np.float32(8.0), foreach=True)
    np.testing.assert_array_equal(p.grad, np.float32(4.0) * (np.float32(1.0) / np.float32(8.0 + 1e-6)))
    fastsgd.clip_grads_with_norm_([fastsgd.Parameter(np.ones(2))], 1.0, np.float32(8.0))  # no grads
