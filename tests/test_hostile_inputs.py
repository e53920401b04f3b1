"""Hostile inputs: each case runs in its own process, so that a crash (a
segfault, an abort) fails that case instead of killing the test run.

A case either expects a clear Python exception that names the input
(``param_groups[g]['params'][i]`` or ``param_groups[g]['<option>']``) and
checks that nothing was written anywhere -- no parameter, grad, momentum
buffer or option changed, no state entry added -- or expects the result of
torch 2.13's ``torch.optim.SGD(foreach=False)`` run the same way in the same
process, bit for bit (NaN payloads and signs included: torch and fastsgd run
the same IEEE operations on the same hardware; see XFAIL for the exception).

Every case starts from PRELUDE: a 2-group optimizer (float32, then float64;
shapes (5,), (2, 3), () and (0,); the float64 (2, 3) is in Fortran order),
lr 0.1 / 0.05, momentum 0.9, one step taken so that buffers exist, fresh
grads set.  The cases are started when the module's first test runs, one per
core at a time, each in a fresh process forked from a server (see the
runner below); `python tests/test_hostile_inputs.py NAME` prints a case's
whole program, to run alone with `python -c`.
"""
import json
import os
import queue
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

SENTINEL = "CASE-OK"
TIMEOUT = 60

PRELUDE = r'''
import copy
import re
import sys
import warnings

import numpy as np

import fastsgd
from fastsgd import Parameter

rng = np.random.default_rng(12345)
SHAPES = [(5,), (2, 3), (), (0,)]


def arr(shape, dtype, order="C"):
    return np.asarray(rng.standard_normal(shape), dtype=dtype, order=order)


def use_two_threads():
    """Step on 2 threads whatever the size, so that a race would show."""
    from fastsgd import _native
    fastsgd.set_num_threads(2)
    _native.parallel_threshold(1024)


def new_grads(params):
    for p in params:
        p.grad = arr(p.shape, p.dtype, "F" if p.flags.f_contiguous and p.ndim > 1 else "C")


def make_opt(**options):
    groups = [[Parameter(arr(s, np.float32)) for s in SHAPES],
              [Parameter(arr(s, np.float64, "F")) for s in SHAPES]]
    kwargs = dict(lr=0.1, momentum=0.9)
    kwargs.update(options)
    o = fastsgd.SGD([{"params": groups[0]}, {"params": groups[1], "lr": 0.05}], **kwargs)
    new_grads(groups[0] + groups[1])
    o.step()
    new_grads(groups[0] + groups[1])
    return o, groups


opt, (P0, P1) = make_opt()

# p.grad = g refuses a grad of the wrong type, dtype or shape at assignment
# (tests/test_grad_assignment.py); a step still checks, for a grad changed
# after assignment (or written to the slot): writing the raw slot stands for it.
set_grad_unchecked = Parameter._grad.__set__


def W(g, i):
    """Regex: a message that starts by naming param_groups[g]['params'][i]."""
    return "^" + re.escape(f"param_groups[{g}]['params'][{i}]: ")


def WO(g, key):
    """Regex: a message that starts by naming the option param_groups[g][key]."""
    return "^" + re.escape(f"param_groups[{g}]['{key}']")


def _copy(x):
    if isinstance(x, np.ndarray):
        return ("array", type(x).__name__, x.dtype.str, x.shape, x.strides,
                x.flags.writeable, x.tobytes(order="A"))
    return ("object", type(x).__name__, repr(x))


def snapshot(o=None):
    """Copies of every parameter, grad, momentum buffer and option, and the
    state's entries."""
    o = opt if o is None else o
    items = []
    for g, group in enumerate(o.param_groups):
        if not isinstance(group, dict):
            items.append((g, "group", repr(group)))
            continue
        items.append((g, "options", sorted((k, repr(v)) for k, v in group.items()
                                           if k != "params")))
        for i, p in enumerate(group.get("params", [])):
            items.append((g, i, "param", _copy(p)))
            items.append((g, i, "grad", _copy(getattr(p, "grad", None))))
    state = o.state
    if isinstance(state, dict):
        items.append(("state", "len", len(state)))
        for k, v in list(state.items()):
            value = (sorted((kk, _copy(vv)) for kk, vv in v.items())
                     if isinstance(v, dict) else _copy(v))
            items.append(("state", id(k), type(v).__name__, value))
    else:
        items.append(("state", repr(state)))
    return items


def assert_untouched(before, o=None):
    after = snapshot(o)
    assert len(after) == len(before), f"{len(before)} snapshot items became {len(after)}"
    for a, b in zip(after, before):
        assert a == b, f"written: {b[:3]} changed\n  before {b}\n  after  {a}"


def expect_error(exc_type, pattern, o=None, call=None):
    """Run o.step() (or call()), expect exc_type with a message matching
    pattern, and check that nothing changed."""
    o = opt if o is None else o
    before = snapshot(o)
    try:
        (call or o.step)()
    except BaseException as e:
        if type(e) is not exc_type:
            raise AssertionError(f"expected {exc_type.__name__}, got "
                                 f"{type(e).__name__}: {e}") from e
        message = str(e.args[0]) if type(e) is KeyError and e.args else str(e)
        if not re.search(pattern, message):
            raise AssertionError(f"message {message!r} does not match {pattern!r}") from e
        error = e
    else:
        raise AssertionError(f"expected {exc_type.__name__}, but nothing was raised")
    assert_untouched(before, o)
    return error


# ----------------------------------------------------------- torch twins

def _t(x):
    import torch
    return torch.from_numpy(np.array(x, copy=True))


def twin(o=None):
    """torch.optim.SGD(foreach=False) over copies of o's parameters, grads,
    options and momentum buffers; returns (torch optimizer, {id(p): tensor})."""
    import torch
    o = opt if o is None else o
    tmap, groups = {}, []
    for group in o.param_groups:
        tgroup = {k: v for k, v in group.items() if k != "params"}
        tgroup.update(foreach=False, fused=None)
        tparams = []
        for p in group["params"]:
            if id(p) not in tmap:
                tp = torch.nn.Parameter(_t(p))
                if isinstance(p.grad, np.ndarray):
                    tp.grad = _t(p.grad)
                tmap[id(p)] = tp
            tparams.append(tmap[id(p)])
        tgroup["params"] = tparams
        groups.append(tgroup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = torch.optim.SGD(groups, lr=0.1, foreach=False)
    for group in o.param_groups:
        for p in group["params"]:
            if p in o.state and "momentum_buffer" in o.state[p]:
                buf = o.state[p]["momentum_buffer"]
                t.state[tmap[id(p)]]["momentum_buffer"] = None if buf is None else _t(buf)
    return t, tmap


def _bits(x):
    x = np.ascontiguousarray(x)
    return x.view({4: np.uint32, 8: np.uint64}[x.dtype.itemsize]) if x.size else x


def assert_same(o, t, tmap, nan_bits=True):
    """Every parameter and momentum buffer of o equals torch's, bit for bit
    (with nan_bits=False, any NaN equals any NaN)."""
    for g, group in enumerate(o.param_groups):
        for i, p in enumerate(group["params"]):
            tp = tmap[id(p)]
            for what, ours, theirs in [
                    ("param", p, tp.detach()),
                    ("momentum_buffer", o.state.get(p, {}).get("momentum_buffer"),
                     t.state.get(tp, {}).get("momentum_buffer"))]:
                if theirs is None:
                    assert ours is None, f"[{g}][{i}] {what}: torch has none"
                    continue
                theirs = theirs.numpy()
                assert ours is not None, f"[{g}][{i}] {what}: fastsgd has none"
                assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, \
                    f"[{g}][{i}] {what}: {ours.shape} {ours.dtype} vs {theirs.shape} {theirs.dtype}"
                same = (np.array_equal(_bits(ours), _bits(theirs)) if nan_bits else
                        np.array_equal(ours, theirs, equal_nan=True))
                if not same:
                    raise AssertionError(f"[{g}][{i}] {what} differs from torch:\n"
                                         f"  fastsgd {np.asarray(ours)!r}\n  torch   {theirs!r}")


def step_both(o, t, tmap, steps=1, nan_bits=True):
    """Step o and its torch twin `steps` times (fresh, equal grads after the
    first) and compare after each."""
    for k in range(steps):
        if k:
            params = [p for g in o.param_groups for p in g["params"]]
            new_grads(params)
            for p in params:
                tmap[id(p)].grad = _t(p.grad)
        o.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.step()
        assert_same(o, t, tmap, nan_bits)


def check_like_torch(o=None, steps=2, nan_bits=True, **options):
    """Set options in every group of o, then step o and its torch twin."""
    o = opt if o is None else o
    for group in o.param_groups:
        group.update(options)
    t, tmap = twin(o)
    step_both(o, t, tmap, steps, nan_bits)
'''


def case(src):
    return textwrap.dedent(src).strip("\n")


CASES = {}
XFAIL = {}  # name: reason -- known bugs not fixed here; strict: an XPASS fails the run


def add(name, src):
    assert name not in CASES, name
    CASES[name] = case(src)


# ------------------------------------------------------------ grad dtypes

for _dtype in ["np.int64", "np.int32", "np.bool_", "np.complex128",
               "np.complex64", "object", "np.longdouble"]:
    add(f"grad_dtype_{_dtype.replace('np.', '').strip('_')}", f"""
        set_grad_unchecked(P1[0], np.ones(P1[0].shape, dtype={_dtype}))
        expect_error(TypeError, W(1, 0) + "grad must be float32, float64, float16 or bfloat16, but got ")
    """)

add("grad_float64_on_float32_param", """
    set_grad_unchecked(P0[1], P0[1].grad.astype(np.float64))
    expect_error(TypeError, W(0, 1) + re.escape("grad has dtype float64, but the parameter "
                                                "has dtype float32"))
""")
add("grad_float32_on_float64_param", """
    set_grad_unchecked(P1[2], np.ones((), np.float32))
    expect_error(TypeError, W(1, 2) + "grad has dtype float32, but the parameter has dtype float64")
""")
add("grad_byte_swapped", """
    set_grad_unchecked(P1[0], P1[0].grad.astype(P1[0].dtype.newbyteorder()))
    expect_error(ValueError, W(1, 0) + "grad must be aligned and in native byte order")
""")
add("grad_misaligned", """
    raw = np.zeros(5 * 8 + 1, np.uint8)
    P1[0].grad = raw[1:].view(np.float64)
    assert not P1[0].grad.flags.aligned
    expect_error(ValueError, W(1, 0) + "grad must be aligned and in native byte order")
""")

# ----------------------------------------------------------- param dtypes

for _dtype in ["np.int64", "np.uint16", "np.complex128", "np.bool_"]:
    add(f"param_dtype_{_dtype.replace('np.', '').strip('_')}", f"""
        # Parameter() refuses these; a view can still make one.
        p = np.zeros(4, {_dtype}).view(Parameter)
        p.grad = np.zeros(4, {_dtype})
        opt.param_groups[1]["params"].append(p)
        expect_error(TypeError, W(1, 4) + "parameter must be float32, float64, float16 or bfloat16, but got ")
    """)

add("param_byte_swapped", """
    p = np.zeros(4, ">f8" if sys.byteorder == "little" else "<f8").view(Parameter)
    p.grad = np.zeros(4, p.dtype)
    opt.param_groups[1]["params"].insert(0, p)
    expect_error(ValueError, W(1, 0) + "parameter must be aligned and in native byte order")
""")
add("param_plain_ndarray", """
    a = np.zeros(3)
    opt.param_groups[1]["params"].append(a)
    expect_error(TypeError, W(1, 4) + "optimizer can only optimize Parameters, but got ndarray")
""")
add("param_none_in_params", """
    opt.param_groups[0]["params"].insert(2, None)
    expect_error(TypeError, W(0, 2) + "optimizer can only optimize Parameters, but got NoneType")
""")

# ---------------------------------------------------------------- shapes

add("grad_too_long", """
    set_grad_unchecked(P1[0], np.zeros(6))
    expect_error(ValueError, W(1, 0) + re.escape("grad has shape (6,), but the parameter has shape (5,)"))
""")
add("grad_transposed_shape", """
    set_grad_unchecked(P0[1], np.zeros((3, 2), np.float32))
    expect_error(ValueError, W(0, 1) + re.escape("grad has shape (3, 2), but the parameter has shape (2, 3)"))
""")
add("grad_extra_axis", """
    set_grad_unchecked(P1[0], P1[0].grad[None, :])
    expect_error(ValueError, W(1, 0) + re.escape("grad has shape (1, 5), but the parameter has shape (5,)"))
""")
add("grad_flattened", """
    set_grad_unchecked(P1[1], np.zeros(6))
    expect_error(ValueError, W(1, 1) + re.escape("grad has shape (6,), but the parameter has shape (2, 3)"))
""")
add("grad_one_element_for_0d_param", """
    set_grad_unchecked(P1[2], np.zeros(1))
    expect_error(ValueError, W(1, 2) + re.escape("grad has shape (1,), but the parameter has shape ()"))
""")
add("grad_size0_other_shape", """
    set_grad_unchecked(P1[3], np.zeros((0, 1)))
    expect_error(ValueError, W(1, 3) + re.escape("grad has shape (0, 1), but the parameter has shape (0,)"))
""")
add("grad_empty_for_nonempty_param", """
    set_grad_unchecked(P1[0], np.zeros(0))
    expect_error(ValueError, W(1, 0) + re.escape("grad has shape (0,), but the parameter has shape (5,)"))
""")

# ------------------------------------------- grads that are not arrays

for _name, _value, _type in [("list", "P1[0].grad.tolist()", "list"),
                             ("tuple", "tuple(P1[0].grad.tolist())", "tuple"),
                             ("python_float", "1.5", "float"),
                             ("numpy_scalar", "np.float64(1.5)", "float64"),
                             ("memoryview", "memoryview(P1[0].grad)", "memoryview"),
                             ("string", "'grad'", "str")]:
    add(f"grad_is_{_name}", f"""
        set_grad_unchecked(P1[0], {_value})
        expect_error(TypeError, W(1, 0) + "grad must be a numpy array, but got {_type}$")
    """)

add("grad_python_scalar_on_0d_param", """
    set_grad_unchecked(P0[2], 0.5)
    expect_error(TypeError, W(0, 2) + "grad must be a numpy array, but got float")
""")
add("grad_0d_array_on_0d_param_like_torch", """
    P0[2].grad = np.array(0.5, np.float32)
    P1[2].grad = np.array(-2.0)
    check_like_torch()
""")
add("grad_0d_array_on_1d_param", """
    set_grad_unchecked(P1[0], np.array(0.5))
    expect_error(ValueError, W(1, 0) + re.escape("grad has shape (), but the parameter has shape (5,)"))
""")
add("grad_none_skips_the_param_like_torch", """
    P0[0].grad = None
    P1[1].grad = None
    before0, before1 = np.array(P0[0]), np.array(P1[1])
    check_like_torch(steps=1)
    assert np.array_equal(P0[0], before0) and np.array_equal(P1[1], before1)
""")
add("grad_matrix_subclass_like_torch", """
    P0[1].grad = np.asmatrix(P0[1].grad)
    check_like_torch(steps=1)
""")

# ------------------------------------------------------------- read-only

add("param_read_only", """
    P1[3].flags.writeable = False   # even a size-0 parameter
    expect_error(ValueError, W(1, 3) + "parameter is read-only")
""")
add("grad_read_only_like_torch", """
    for p in P0 + P1:
        p.grad.flags.writeable = False
    check_like_torch()
""")
add("buffer_read_only", """
    opt.state[P1[2]]["momentum_buffer"].flags.writeable = False
    expect_error(ValueError, W(1, 2) + "momentum_buffer is read-only")
""")
add("grad_broadcast_view_like_torch", """
    P1[1].grad = np.broadcast_to(np.ones(3), (2, 3))   # read, never written: may overlap itself
    check_like_torch()
""")

# --------------------------------------- non-contiguous and negative strides
# Stepped through contiguous copies (plan.pyx), in place: the parameter and its
# buffer are the caller's arrays after the step.

add("param_strided_view_like_torch", """
    base = np.zeros(10)
    p = Parameter(base[::2])
    p.grad = np.arange(5.0)
    opt.param_groups[1]["params"].append(p)
    check_like_torch(steps=3)
    assert np.shares_memory(p, base) and not base[1::2].any()
""")
add("param_negative_stride_like_torch", """
    base = np.arange(5.0)
    p = Parameter(base[::-1])
    p.grad = np.ones(5)
    opt.param_groups[1]["params"].append(p)
    check_like_torch(steps=3)
    assert np.shares_memory(p, base)
""")
add("param_column_of_3d_like_torch", """
    base = arr((4, 3, 2), np.float32)
    p = Parameter(base[..., 0])
    p.grad = arr((4, 3), np.float32)
    opt.param_groups[0]["params"].append(p)
    check_like_torch(steps=3)
    assert np.array_equal(p, base[..., 0])
    buf = opt.state[p]["momentum_buffer"]
    assert buf.shape == (4, 3) and (buf.flags.c_contiguous or buf.flags.f_contiguous)
""")
add("params_interleaved_like_torch", """
    # columns 0 and 1 of one matrix: their spans meet, their elements do not
    base = arr((6, 2), np.float32)
    a, b = Parameter(base[:, 0]), Parameter(base[:, 1])
    a.grad, b.grad = arr(6, np.float32), arr(6, np.float32)
    opt.param_groups[0]["params"] += [a, b]
    check_like_torch(steps=3)
""")
add("grad_negative_stride_like_torch", """
    P1[0].grad = P1[0].grad[::-1]
    check_like_torch()
""")
add("grad_strided_like_torch", """
    P0[0].grad = arr(10, np.float32)[::2]
    check_like_torch()
""")
add("grad_column_of_2d_like_torch", """
    P1[1].grad = arr((2, 6), np.float64, "F")[:, ::2]
    check_like_torch()
""")
add("grad_c_order_for_fortran_param_like_torch", """
    P1[1].grad = np.ascontiguousarray(P1[1].grad)
    check_like_torch()
""")
add("grad_fortran_order_for_c_param_like_torch", """
    P0[1].grad = np.asfortranarray(P0[1].grad)
    check_like_torch()
""")
add("buffer_negative_stride_like_torch", """
    buf = opt.state[P0[0]]["momentum_buffer"][::-1].copy()[::-1]
    opt.state[P0[0]]["momentum_buffer"] = buf
    check_like_torch()
    assert opt.state[P0[0]]["momentum_buffer"] is buf
""")
add("buffer_wrong_order_like_torch", """
    buf = np.ascontiguousarray(opt.state[P1[1]]["momentum_buffer"])
    opt.state[P1[1]]["momentum_buffer"] = buf
    check_like_torch()
    assert opt.state[P1[1]]["momentum_buffer"] is buf
""")

# ----------------------------------------------------- memory that overlaps
OVERLAP = ("unsupported operation: more than one element of the written-to tensor refers to a "
           "single memory location. Please clone() the tensor before performing the operation.")

add("param_zero_stride_refused", f"""
    raw = np.zeros(3)
    p = np.lib.stride_tricks.as_strided(raw, (2, 3), (0, 8), writeable=True).view(Parameter)
    p.grad = np.ones((2, 3))
    opt.param_groups[1]["params"].append(p)
    expect_error(ValueError, W(1, 4) + re.escape("parameter: {OVERLAP}"))
""")
add("param_overlapping_strides_refused", f"""
    raw = np.zeros(10)
    p = np.lib.stride_tricks.as_strided(raw, (4, 3), (16, 8), writeable=True).view(Parameter)
    p.grad = np.ones((4, 3))
    opt.param_groups[1]["params"].append(p)
    expect_error(ValueError, W(1, 4) + re.escape("parameter: {OVERLAP}"))
""")
add("buffer_overlapping_itself_refused", f"""
    raw = np.zeros(1, np.float32)
    opt.state[P0[0]]["momentum_buffer"] = np.lib.stride_tricks.as_strided(
        raw, (5,), (0,), writeable=True)
    expect_error(ValueError, W(0, 0) + re.escape("momentum_buffer: {OVERLAP}"))
""")
add("strided_params_sharing_memory_refused", """
    base = np.zeros((6, 4))
    a, b = Parameter(base[:, ::2]), Parameter(base[::2, ::2])   # b's elements are a's
    a.grad, b.grad = np.ones((6, 2)), np.ones((3, 2))
    opt.param_groups[1]["params"] += [a, b]
    expect_error(ValueError, W(1, 5) + "is stepped through contiguous copies")
""")
add("strided_param_listed_twice_refused", """
    p = Parameter(np.zeros((6, 4))[:, ::2])
    p.grad = np.ones((6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.param_groups[1]["params"] += [p, p]
    expect_error(ValueError, W(1, 5) + "is stepped through contiguous copies")
""")
add("strided_grad_is_another_param_refused", """
    p = Parameter(np.zeros((5, 2))[:, 0])
    p.grad = P1[0][::-1]   # reversed: staged, and it is a parameter of the group
    opt.param_groups[1]["params"].append(p)
    expect_error(ValueError, W(1, 4) + "is stepped through contiguous copies")
""")
add("strided_param_base_resize_refused_by_numpy", """
    base = np.zeros(12)
    p = Parameter(base[::3])
    p.grad = np.ones(4)
    opt.param_groups[1]["params"].append(p)
    try:
        base.resize(100)   # refcheck: the view p references base
        raise AssertionError("resized")
    except ValueError:
        pass
    check_like_torch()
""")
add("strided_read_only_views_refused", """
    p = np.broadcast_to(np.zeros(3), (2, 3)).view(Parameter)
    p.grad = np.ones((2, 3))
    opt.param_groups[1]["params"].append(p)
    expect_error(ValueError, W(1, 4) + "parameter is read-only")
    q = np.zeros(10)[::2]
    q.flags.writeable = False
    opt.param_groups[1]["params"][4] = q.view(Parameter)
    opt.param_groups[1]["params"][4].grad = np.ones(5)
    expect_error(ValueError, W(1, 4) + "parameter is read-only")
""")
add("fortran_param_and_grad_like_torch", """
    # The float64 (2, 3) parameter and its grad and buffer are Fortran-ordered.
    assert P1[1].flags.f_contiguous and not P1[1].flags.c_contiguous
    check_like_torch(steps=3)
""")

# ------------------------------------------------- zero-size and 0-d params

add("size0_and_0d_params_like_torch", """
    ps = [Parameter(arr(s, dt)) for s in [(), (0,), (0, 3), (3, 0, 2), ()]
          for dt in (np.float32, np.float64)]
    new_grads(ps)
    o = fastsgd.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    t, tmap = twin(o)
    step_both(o, t, tmap, steps=3)
    assert all(o.state[p]["momentum_buffer"].shape == p.shape for p in ps)
""")
add("only_size0_params_first_step", """
    ps = [Parameter(np.zeros((0, 4), np.float32)), Parameter(np.zeros(0))]
    new_grads(ps)
    o = fastsgd.SGD(ps, lr=0.1, momentum=0.5)
    t, tmap = twin(o)
    step_both(o, t, tmap, steps=2)
""")
add("size0_grad_shared_with_buffer", """
    # Zero bytes overlap nothing: a size-0 grad may be any size-0 array.
    P1[3].grad = opt.state[P1[3]]["momentum_buffer"]
    check_like_torch(steps=1)
""")
add("empty_params_list_after_construction", """
    opt.param_groups[1]["params"] = []
    before = [np.array(p) for p in P1]
    t, tmap = twin()
    step_both(opt, t, tmap, steps=2)
    assert all(np.array_equal(p, b) for p, b in zip(P1, before))
""")

# ---------------------------------------------------------------- aliasing

add("grad_is_the_param_like_torch", """
    # p.grad = p raises, as torch's tensor.grad = tensor does; a step given
    # the parameter itself as its grad steps it as torch steps a tensor
    # whose grad shares all its memory.
    import torch
    o, groups = make_opt(weight_decay=0.01, nesterov=True)
    ps = groups[0] + groups[1]
    t, tmap = twin(o)
    for p in ps:
        try:
            p.grad = p
        except RuntimeError as e:
            assert str(e) == "can't assign a Parameter as its own grad", e
        else:
            raise AssertionError("a Parameter was assigned as its own grad")
        set_grad_unchecked(p, p)
        tmap[id(p)].grad = tmap[id(p)].detach()
    for _ in range(3):
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
add("grad_is_a_view_of_the_param_like_torch", """
    import torch
    ps = P0 + P1
    t, tmap = twin()
    for p in ps:
        p.grad = p.view(np.ndarray)[...]
        tmap[id(p)].grad = tmap[id(p)].detach().view(tmap[id(p)].shape)
    for _ in range(2):
        opt.step(); t.step()
        assert_same(opt, t, tmap)
""")
add("grad_partially_overlaps_param", """
    raw = np.arange(6.0)
    p = Parameter(raw[:5])
    p.grad = raw[1:]
    opt.param_groups[1]["params"][0] = p
    expect_error(ValueError, W(1, 0) + "grad partially overlaps the parameter's memory")
""")
add("grad_is_reshaped_param", """
    set_grad_unchecked(P1[1], P1[1].reshape(-1, order="F"))
    expect_error(ValueError, W(1, 1) + re.escape("grad has shape (6,)"))
""")
add("grad_shared_by_two_params_like_torch", """
    import torch
    a, b = Parameter(arr(7, np.float32)), Parameter(arr(7, np.float32))
    o = fastsgd.SGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.1)
    t, tmap = twin(o)
    for _ in range(3):
        g = arr(7, np.float32)
        a.grad = b.grad = g
        tg = _t(g)
        tmap[id(a)].grad = tmap[id(b)].grad = tg
        o.step(); t.step()
        assert_same(o, t, tmap)
        assert np.array_equal(a.grad, tg.numpy()), "a grad was written"
""")
add("param_twice_in_a_group_like_torch", """
    import torch
    a, b = Parameter(arr(5, np.float32)), Parameter(arr(3, np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = fastsgd.SGD([a, b, a], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    assert any("duplicate parameters" in str(w.message) for w in caught)
    new_grads([a, b])
    t, tmap = twin(o)
    step_both(o, t, tmap, steps=3)   # the first step creates a's buffer twice
""")
add("param_in_two_groups_like_torch", """
    import torch
    # add_param_group refuses this; editing param_groups does not.
    t, tmap = twin()
    opt.param_groups[1]["params"].append(P0[0])
    t.param_groups[1]["params"].append(tmap[id(P0[0])])
    step_both(opt, t, tmap, steps=2)
""")
add("param_in_two_groups_first_step_like_torch", """
    import torch
    a, b = Parameter(arr(5, np.float64)), Parameter(arr(3, np.float64))
    o = fastsgd.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, momentum=0.9)
    new_grads([a, b])
    t, tmap = twin(o)
    o.param_groups[1]["params"].append(a)
    t.param_groups[1]["params"].append(tmap[id(a)])
    step_both(o, t, tmap, steps=3)
""")
add("two_params_share_memory_like_torch", """
    import torch
    a = Parameter(arr(6, np.float64))
    b = Parameter(a)             # shares a's memory, as nn.Parameter(t) shares t's
    assert b is not a and np.shares_memory(a, b)
    o = fastsgd.SGD([a, b], lr=0.1, momentum=0.9)
    ta = torch.nn.Parameter(_t(a)); tb = torch.nn.Parameter(ta.detach())
    t = torch.optim.SGD([ta, tb], lr=0.1, momentum=0.9, foreach=False)
    tmap = {id(a): ta, id(b): tb}
    for _ in range(3):
        g1, g2 = arr(6, np.float64), arr(6, np.float64)
        a.grad, b.grad, ta.grad, tb.grad = g1, g2, _t(g1), _t(g2)
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
add("grad_is_another_param_like_torch", """
    import torch
    a, b, c = (Parameter(arr(9, np.float32)) for _ in range(3))
    o = fastsgd.SGD([a, b, c], lr=0.1, momentum=0.9)
    t, tmap = twin(o)
    ta, tb, tc = (tmap[id(x)] for x in (a, b, c))
    for _ in range(3):
        g = arr(9, np.float32)
        # b reads a after a's update, c reads b before b's update (torch's order)
        a.grad, b.grad, c.grad = g, a, b
        ta.grad, tb.grad, tc.grad = _t(g), ta.detach(), tb.detach()
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
add("params_of_two_dtypes_share_memory", """
    # A group steps its float32 and float64 tensors in separate passes, so it
    # cannot keep torch's order when they share memory: refused, by name.
    a = Parameter(arr(4, np.float64))
    b = Parameter(a.view(np.float32))   # the same 32 bytes, read as float32
    o = fastsgd.SGD([a, b], lr=0.1)
    a.grad, b.grad = np.full(4, 1e-3), np.full(8, 1e-3, np.float32)
    before = a.copy()
    try:
        o.step()
    except ValueError as e:
        assert str(e).startswith("param_groups[0]['params'][1]: shares memory with a "
                                 "parameter of another dtype"), e
    else:
        raise AssertionError("no error")
    assert np.array_equal(a, before)
""")
add("grad_is_another_param_large_two_threads_like_torch", """
    import torch
    use_two_threads()
    n = 1 << 20
    a, b = Parameter(arr(n, np.float32)), Parameter(arr(n, np.float32))
    o = fastsgd.SGD([a, b], lr=0.5, momentum=0.9)
    t, tmap = twin(o)
    ta, tb = tmap[id(a)], tmap[id(b)]
    for _ in range(3):
        g = arr(n, np.float32)
        a.grad, b.grad = g, a     # b's step reads a after a's update
        ta.grad, tb.grad = _t(g), ta.detach()
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
# Before the fix, a grad sharing memory with another tensor's parameter or
# buffer was read by one thread while another wrote it (a race: these cases
# failed most runs).
add("grad_is_another_params_buffer_large_two_threads_like_torch", """
    import torch
    use_two_threads()
    n = 1 << 19
    a, b = Parameter(arr(n, np.float64)), Parameter(arr(n, np.float64))
    o = fastsgd.SGD([a, b], lr=0.5, momentum=0.9)
    new_grads([a, b])
    t, tmap = twin(o)
    step_both(o, t, tmap)
    ta, tb = tmap[id(a)], tmap[id(b)]
    for _ in range(3):
        a.grad = arr(n, np.float64)
        b.grad = o.state[a]["momentum_buffer"][...]       # a view of a's buffer
        ta.grad, tb.grad = _t(a.grad), t.state[ta]["momentum_buffer"]
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
add("functional_grad_is_another_param_large_two_threads_like_torch", """
    import torch
    use_two_threads()
    n = 1 << 20
    a, b = Parameter(arr(n, np.float32)), Parameter(arr(n, np.float32))
    from torch.optim.sgd import sgd as torch_sgd
    ta, tb = _t(a), _t(b)
    g = arr(n, np.float32)
    bufs, tbufs = [None, None], [None, None]
    for _ in range(3):
        fastsgd.functional.sgd([a, b], [g, a], bufs, weight_decay=0.0, momentum=0.9,
                               lr=0.5, dampening=0.0, nesterov=False, maximize=False)
        torch_sgd([ta, tb], [_t(g), ta], tbufs, weight_decay=0.0, momentum=0.9,
                            lr=0.5, dampening=0.0, nesterov=False, maximize=False,
                            foreach=False)
        assert np.array_equal(_bits(a), _bits(ta.numpy())) and np.array_equal(_bits(b), _bits(tb.numpy()))
""")
add("grad_becomes_a_params_memory_large_two_threads_like_torch", """
    import torch
    use_two_threads()
    n = 1 << 20
    a = Parameter(arr(n, np.float32))
    g = arr(n, np.float32)
    o = fastsgd.SGD([a], lr=0.5)
    t, tmap = twin(o)
    ta = tmap[id(a)]
    tg = _t(g)
    a.grad, ta.grad = g, tg
    for _ in range(2):        # g is found to share memory with no parameter
        o.step(); t.step()
        assert_same(o, t, tmap)
    c = Parameter(g)          # now a parameter stepped before a views g
    tc = torch.nn.Parameter(tg)
    tmap[id(c)] = tc
    c.grad = arr(n, np.float32)
    tc.grad = _t(c.grad)
    o.param_groups[0]["params"] = [c, a]
    t.param_groups[0]["params"] = [tc, ta]
    for _ in range(2):
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
add("grad_is_its_param_large_two_threads_like_torch", """
    import torch
    use_two_threads()
    block = arr(3 << 18, np.float32)
    ps = [Parameter(block[k << 18:(k + 1) << 18]) for k in range(3)]   # views of one block
    o = fastsgd.SGD(ps, lr=0.25, momentum=0.9, weight_decay=0.1)
    t, tmap = twin(o)
    for p in ps:
        set_grad_unchecked(p, p)  # p.grad = p raises, as in torch
        tmap[id(p)].grad = tmap[id(p)].detach()
    for _ in range(3):
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
add("grad_is_another_params_buffer_like_torch", """
    import torch
    a, b = Parameter(arr(8, np.float64)), Parameter(arr(8, np.float64))
    o = fastsgd.SGD([a, b], lr=0.1, momentum=0.9)
    new_grads([a, b])
    t, tmap = twin(o)
    step_both(o, t, tmap)
    ta, tb = tmap[id(a)], tmap[id(b)]
    for _ in range(2):
        a.grad = arr(8, np.float64)
        b.grad = o.state[a]["momentum_buffer"]
        ta.grad, tb.grad = _t(a.grad), t.state[ta]["momentum_buffer"]
        o.step(); t.step()
        assert_same(o, t, tmap)
""")
add("buffer_shared_by_two_params_like_torch", """
    import torch
    a, b = Parameter(arr(4, np.float32)), Parameter(arr(4, np.float32))
    o = fastsgd.SGD([a, b], lr=0.1, momentum=0.9)
    new_grads([a, b]); o.step(); new_grads([a, b])
    o.state[b]["momentum_buffer"] = o.state[a]["momentum_buffer"]
    t, tmap = twin(o)
    ta, tb = tmap[id(a)], tmap[id(b)]
    t.state[tb]["momentum_buffer"] = t.state[ta]["momentum_buffer"]
    step_both(o, t, tmap, steps=3)
    assert o.state[a]["momentum_buffer"] is o.state[b]["momentum_buffer"]
""")
add("buffer_is_another_param_like_torch", """
    import torch
    a, b = Parameter(arr(4, np.float64)), Parameter(arr(4, np.float64))
    o = fastsgd.SGD([a, b], lr=0.1, momentum=0.9)
    new_grads([a, b]); o.step(); new_grads([a, b])
    o.state[b]["momentum_buffer"] = a.view(np.ndarray)
    t, tmap = twin(o)
    ta, tb = tmap[id(a)], tmap[id(b)]
    t.state[tb]["momentum_buffer"] = ta.detach()
    step_both(o, t, tmap, steps=2)
""")
add("buffer_is_the_grad", """
    opt.state[P0[1]]["momentum_buffer"] = P0[1].grad
    expect_error(ValueError, W(0, 1) + "momentum_buffer shares memory with the parameter or its grad")
""")
add("buffer_is_the_param", """
    opt.state[P1[0]]["momentum_buffer"] = P1[0].view(np.ndarray)
    expect_error(ValueError, W(1, 0) + "momentum_buffer shares memory with the parameter or its grad")
""")
add("buffer_overlaps_grad_partially", """
    raw = np.zeros(8)
    P1[0].grad = raw[:5]
    opt.state[P1[0]]["momentum_buffer"] = raw[3:]
    expect_error(ValueError, W(1, 0) + "momentum_buffer shares memory with the parameter or its grad")
""")

# ----------------------------------------------------------- NaN and Inf

_POSITIONS = {"first": "0", "middle": "p.size // 2", "last": "p.size - 1"}
for _pos, _index in _POSITIONS.items():
    add(f"nan_param_{_pos}_like_torch", f"""
        for p in (P0[0], P1[1]):
            p.reshape(-1, order="A")[{_index}] = np.nan
        check_like_torch(steps=2)
    """)
    add(f"inf_grad_{_pos}_like_torch", f"""
        for p, sign in ((P0[1], 1), (P1[0], -1)):
            p.grad.reshape(-1, order="A")[{_index}] = sign * np.inf
        check_like_torch(steps=2)
    """)
    add(f"nan_buffer_{_pos}_like_torch", f"""
        for p in (P0[0], P1[1]):
            opt.state[p]["momentum_buffer"].reshape(-1, order="A")[{_index}] = np.nan
        check_like_torch(steps=2)
    """)
add("nan_payloads_and_signs_like_torch", """
    # quiet NaNs with payloads and either sign, in param, grad and buffer
    p, q = P0[0], P1[0]
    p.view(np.uint32)[:3] = [0x7FC00123, 0xFFC00456, 0x7FC00001]
    p.grad.view(np.uint32)[1:4] = [0xFFC0BEEF, 0x7FC0CAFE, 0xFFC00002]
    opt.state[q]["momentum_buffer"].view(np.uint64)[2:] = [
        0x7FF8000000000ABC, 0xFFF8000000000DEF, 0x7FF8000000000001]
    q.grad.view(np.uint64)[:2] = [0xFFF8000000000777, 0x7FF8000000000888]
    check_like_torch(steps=2, weight_decay=0.01, nesterov=True)
""")
for _options in ("maximize=True", "maximize=True, weight_decay=0.01, nesterov=True"):
    add(f"nan_grads_negated_by_maximize_like_torch[{_options}]", f"""
        # torch negates the grad on its own (-NaN), then multiply-adds: a
        # compiler folding the negation into the FMA would keep the sign.
        for p in (P0[0], P1[0]):
            p.grad.reshape(-1)[[0, p.size // 2, p.size - 1]] = np.nan
        P0[0].grad.view(np.uint32)[1] = 0xFFC0BEEF
        check_like_torch(steps=2, {_options})
    """)
add("inf_minus_inf_makes_nan_like_torch", """
    P1[0][:] = [np.inf, -np.inf, np.inf, 1.0, -np.inf]
    P1[0].grad[:] = [np.inf, -np.inf, -np.inf, np.inf, np.nan]
    P0[2][...] = np.inf
    P0[2].grad[...] = np.inf
    check_like_torch(steps=2, weight_decay=0.5)
""")
add("nan_in_0d_param_like_torch", """
    P1[2][...] = np.nan
    P0[2].grad[...] = -np.inf
    check_like_torch(steps=2)
""")
add("overflow_to_inf_like_torch", """
    P0[0][:] = np.finfo(np.float32).max
    P0[0].grad[:] = -np.finfo(np.float32).max
    opt.param_groups[0]["lr"] = 10.0
    check_like_torch(steps=2)
""")

# --------------------------------------- hyperparameters edited after construction

for _key, _value, _type in [("lr", "'fast'", "str"), ("lr", "None", "NoneType"),
                            ("lr", "[0.1]", "list"),
                            ("lr", "np.ones(2)", "ndarray"),
                            ("momentum", "'0.9x'", "str"),
                            ("dampening", "{}", "dict"),
                            ("weight_decay", "object()", "object"),
                            ("lr", "'0.1'", "str"),
                            ("momentum", "b'0.9'", "bytes")]:
    add(f"{_key}_is_{_type}_{len(CASES)}", f"""
        opt.param_groups[1]["{_key}"] = {_value}
        expect_error(TypeError, WO(1, "{_key}") + " must be a real number, but got {_type}$")
    """)

add("lr_huge_int", """
    opt.param_groups[1]["lr"] = 10 ** 400
    expect_error(OverflowError, WO(1, "lr") + " is out of the range of torch's integer scalars")
""")
add("lr_is_complex", """
    opt.param_groups[1]["lr"] = 1j
    expect_error(RuntimeError, WO(1, "lr") + " must be a real number, but got complex$")
""")
add("momentum_missing", """
    del opt.param_groups[1]["momentum"]
    expect_error(KeyError, WO(1, "momentum") + " is missing")
""")
add("nesterov_ambiguous_array", """
    opt.param_groups[0]["nesterov"] = np.array([True, False])
    expect_error(ValueError, WO(0, "nesterov") + " must be a bool: The truth value")
""")
add("differentiable_true_in_group", """
    opt.param_groups[1]["differentiable"] = True
    expect_error(RuntimeError, "no autograd")
""")
for _key in ["lr", "momentum", "dampening", "weight_decay"]:
    add(f"{_key}_nan_like_torch", f"""
        opt.param_groups[1]["{_key}"] = float("nan")
        opt.param_groups[0]["{_key}"] = np.float32("nan")
        check_like_torch(steps=2)
    """)
add("lr_nan_sign_bit_like_torch", """
    # A NaN lr gives NaN parameters; torch's have the sign of -lr.
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = float("nan")
    check_like_torch(steps=1)
""")
add("lr_inf_like_torch", """
    opt.param_groups[1]["lr"] = float("inf")
    opt.param_groups[0]["lr"] = -float("inf")
    check_like_torch(steps=1)
""")
add("negative_hyperparameters_like_torch", """
    # The constructor's checks do not run again: torch steps with them.
    for g in opt.param_groups:
        g.update(lr=-0.1, momentum=-0.5, weight_decay=-0.01, dampening=-1.0)
    check_like_torch(steps=2)
""")
add("hyperparameters_of_other_types_like_torch", """
    # bool, int, numpy scalars: real numbers torch accepts too.
    opt.param_groups[0].update(lr=True, momentum=np.float64(0.5), dampening=np.int64(0),
                               weight_decay=1)
    opt.param_groups[1].update(lr=np.float32(0.25), momentum=1, nesterov=1, maximize="yes")
    check_like_torch(steps=2)
""")

# ----------------------------------------------------------- tampered state

add("buffer_wrong_shape", """
    opt.state[P0[1]]["momentum_buffer"] = np.zeros(6, np.float32)
    expect_error(ValueError, W(0, 1) + re.escape(
        "momentum_buffer has shape (6,), but the parameter has shape (2, 3)"))
""")
add("buffer_wrong_dtype", """
    opt.state[P0[0]]["momentum_buffer"] = opt.state[P0[0]]["momentum_buffer"].astype(np.float64)
    expect_error(TypeError, W(0, 0)
                 + "momentum_buffer has dtype float64, but the parameter has dtype float32")
""")
add("buffer_int_dtype", """
    opt.state[P1[2]]["momentum_buffer"] = np.zeros((), np.int64)
    expect_error(TypeError, W(1, 2) + "momentum_buffer must be float32, float64, float16 "
                                      "or bfloat16, but got int64")
""")
add("buffer_is_a_list", """
    opt.state[P1[0]]["momentum_buffer"] = [0.0] * 5
    expect_error(TypeError, W(1, 0) + "momentum_buffer must be a numpy array, but got list")
""")
add("buffer_is_a_python_float_for_0d", """
    opt.state[P0[2]]["momentum_buffer"] = 0.0
    expect_error(TypeError, W(0, 2) + "momentum_buffer must be a numpy array, but got float")
""")
add("buffer_none_is_a_first_step_like_torch", """
    opt.state[P0[0]]["momentum_buffer"] = None
    opt.state[P1[1]]["momentum_buffer"] = None
    check_like_torch(steps=2)
""")
add("buffer_key_deleted_like_torch", """
    del opt.state[P1[0]]["momentum_buffer"]
    opt.state[P0[1]].clear()
    check_like_torch(steps=2)
""")
add("param_state_plain_dict_like_torch", """
    opt.state[P1[0]] = dict(opt.state[P1[0]])
    opt.state[P1[1]] = {}
    check_like_torch(steps=2)
""")
add("param_state_not_a_dict", """
    opt.state[P1[1]] = [opt.state[P1[1]]["momentum_buffer"]]
    expect_error(TypeError, W(1, 1) + "optimizer.state of the parameter must be a dict, but got list")
""")
add("param_state_none", """
    opt.state[P0[3]] = None
    expect_error(TypeError, W(0, 3) + "optimizer.state of the parameter must be a dict, but got NoneType")
""")
add("optimizer_state_plain_dict_like_torch", """
    opt.state = {p: dict(s) for p, s in opt.state.items()}
    check_like_torch(steps=2)
""")
add("optimizer_state_not_a_dict", """
    opt.state = list(opt.state.items())
    expect_error(TypeError, "^optimizer.state must be a dict, but got list")
""")
add("param_group_not_a_dict", """
    opt.param_groups[1] = list(opt.param_groups[1].items())
    expect_error(TypeError, re.escape("param_groups[1] must be a dict, but got list"))
""")
add("params_tuple_after_construction_like_torch", """
    opt.param_groups[1]["params"] = tuple(opt.param_groups[1]["params"])
    check_like_torch(steps=2)
""")
add("grad_property_empties_the_params_list_mid_step", """
    # Python code run by a step (here a .grad property) empties the group's
    # list: the step updates the parameters it began with, as cached.
    from fastsgd import reference

    class EmptiesItsGroup(Parameter):
        @property
        def grad(self):
            group["params"].clear()
            return np.zeros_like(self)

        @grad.setter
        def grad(self, value):
            pass

    params = [Parameter(arr((4,), np.float32)) for _ in range(3000)]
    new_grads(params)
    o = fastsgd.SGD(params[:1] + [EmptiesItsGroup(arr((4,), np.float32))] + params[1:], lr=0.1)
    group = o.param_groups[0]
    expected = [p.copy() for p in params]
    reference.sgd(expected, [p.grad for p in params], [None] * len(params), lr=0.1,
                  momentum=0, dampening=0, weight_decay=0, nesterov=False, maximize=False,
                  fma=fastsgd.cpu_capability() != "default")
    o.step()
    assert group["params"] == []
    for p, e in zip(params, expected):
        assert np.array_equal(p, e)
""")
add("option_conversion_empties_param_groups_mid_step", """
    class EmptiesTheGroups:
        def __float__(self):
            opt.param_groups.clear()
            return 0.1

    before = [p.copy() for p in P0 + P1]
    opt.param_groups[0]["lr"] = EmptiesTheGroups()
    try:
        opt.step()
    except RuntimeError as e:
        assert str(e) == "optimizer.param_groups lost groups during step()", e
    else:
        raise AssertionError("no error")
    assert all(np.array_equal(p, b) for p, b in zip(P0 + P1, before))
""")
add("array_function_cannot_make_the_new_buffer", """
    # A first momentum step makes its buffer without numpy's dispatch: a
    # subclass's __array_function__ answering np.empty_like with a wrong
    # array (or None, or changing the parameter's dtype) is never called.
    from fastsgd.functional import sgd

    class WrongEmptyLike(np.ndarray):
        def __array_function__(self, func, types, args, kwargs):
            return np.empty(1)

    class NoEmptyLike(Parameter):
        def __array_function__(self, func, types, args, kwargs):
            if func is np.empty_like:
                return None
            return super().__array_function__(func, types, args, kwargs)

    class RetypesItself(np.ndarray):
        def __array_function__(self, func, types, args, kwargs):
            self.dtype = np.float64  # the same bytes, half the elements
            return np.empty(self.shape, np.float64)

    n = 1 << 20
    for p, g in [(np.zeros(n).view(WrongEmptyLike), np.ones(n)),
                 (np.zeros(n, np.float32).view(RetypesItself), np.ones(n, np.float32))]:
        bufs = [None]
        sgd([p], [g], bufs, weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0,
            nesterov=False, maximize=False)
        p = p.view(np.ndarray)  # checked without the subclass's dispatch
        assert type(bufs[0]) is np.ndarray and bufs[0].shape == (n,) and p.shape == (n,)
        assert np.all(bufs[0] == 1) and np.all(p == p.dtype.type(-0.1))
    p = NoEmptyLike(np.zeros(1000))
    p.grad = np.ones(1000)
    o = fastsgd.SGD([p], lr=0.1, momentum=0.9)
    o.step()
    assert type(o.state[p]["momentum_buffer"]) is np.ndarray and np.all(p == -0.1)
""")
add("hash_raising_once_leaves_no_half_built_cache", """
    class HashFailsOnce(Parameter):
        fail = False

        def __hash__(self):
            if HashFailsOnce.fail:
                HashFailsOnce.fail = False
                raise KeyError("hash failed once")
            return object.__hash__(self)

    p = HashFailsOnce(arr((5,), np.float64))
    opt.param_groups[1]["params"].append(p)
    new_grads([p])
    HashFailsOnce.fail = True  # the step rebuilds the plan's cache, which raises
    expect_error(KeyError, "hash failed once")
    check_like_torch(steps=2)  # the cache is rebuilt from scratch
""")
add("state_dict_key_eq_drops_the_state_mid_lookup", """
    # A key of a parameter's (plain dict) state whose __eq__ runs during the
    # momentum_buffer lookup deletes that state: the step holds the dict, so
    # the buffer (large: freeing it would unmap it) stays where it is.
    class DropsTheState:
        armed = False

        def __hash__(self):
            return hash("momentum_buffer")

        def __eq__(self, other):
            if DropsTheState.armed:
                DropsTheState.armed = False
                del o.state[p]
            return False

    n = 1 << 22
    p = Parameter(np.zeros(n))
    p.grad = np.ones(n)
    o = fastsgd.SGD([p], lr=0.1, momentum=0.9)
    o.state[p] = {DropsTheState(): 0, "momentum_buffer": np.zeros(n)}
    DropsTheState.armed = True
    o.step()
    assert p not in o.state and np.all(p == -0.1)
""")
add("step_within_a_step_raises", """
    stepping = []

    class StepsWhenRead(Parameter):
        @property
        def grad(self):
            if stepping:  # not when snapshot() reads it
                opt.step()

        @grad.setter
        def grad(self, value):
            pass

    def step():
        stepping.append(True)
        try:
            opt.step()
        finally:
            stepping.clear()

    opt.param_groups[0]["params"].append(StepsWhenRead(arr((3,), np.float32)))
    expect_error(RuntimeError, re.escape("step() called during a step of the same optimizer"),
                 call=step)
""")
# A step holds every array it points into twice: numpy's resize(refcheck=True)
# moves the memory of an array with at most 2 references.  Each case drops
# every other reference to an array the step has staged (large: its old
# memory is unmapped), then resizes it; numpy must refuse.
RESIZE_PRELUDE = """
    N = 1 << 22
    RESIZE_REFUSED = "cannot resize an array that references or is referenced"
    resize = []  # a callable that the next .grad read (or hash) pops and calls

    class ResizesWhenRead(Parameter):
        @property
        def grad(self):
            if resize:
                resize.pop()()
            return self.__dict__.get("_grad")

        @grad.setter
        def grad(self, value):
            self.__dict__["_grad"] = value

    big = Parameter(np.zeros(N))
    big.grad = np.ones(N)
    later = ResizesWhenRead(np.zeros(4))
    later.grad = np.ones(4)

    def expect_resize_refused(step):
        try:
            step()
        except ValueError as e:
            assert str(e).startswith(RESIZE_REFUSED), e
        else:
            raise AssertionError("numpy resized an array the step had staged")
"""
add("momentum_buffer_resized_by_a_later_tensor", RESIZE_PRELUDE + """
    o = fastsgd.SGD([big, later], lr=0.1, momentum=0.9)
    o.step()
    before = big.copy()
    resize.append(lambda: o.state[big].pop("momentum_buffer").resize((1,), refcheck=True))
    expect_resize_refused(o.step)
    assert np.array_equal(big, before)  # raised while staging
""")
add("param_resized_by_a_later_tensor", RESIZE_PRELUDE + """
    big = big.copy()  # a Parameter that owns its memory
    big.grad = np.ones(N)
    o = fastsgd.SGD([big, later], lr=0.1)
    del big
    resize.append(lambda: o.param_groups[0]["params"].pop(0).resize((1,), refcheck=True))
    expect_resize_refused(o.step)
""")
add("grad_resized_by_a_later_tensor", RESIZE_PRELUDE + """
    o = fastsgd.SGD([big, later], lr=0.1)

    def drop_the_grad_and_resize_it():
        grads = [big.grad]
        big.grad = None
        grads.pop().resize((1,), refcheck=True)

    resize.append(drop_the_grad_and_resize_it)
    expect_resize_refused(o.step)
""")
add("momentum_buffer_resized_by_an_earlier_groups_commit", RESIZE_PRELUDE + """
    # A step runs group 0 and commits it (storing p's new buffer hashes p)
    # before group 1 runs: the last hash of p in a step is that commit's.
    hashes = []

    class CountsItsHashes(Parameter):
        def __hash__(self):
            hashes.append(1)
            if len(hashes) == resize_at:
                resize.pop()()
            return object.__hash__(self)

    resize_at = 0
    p = CountsItsHashes(np.zeros(4))
    p.grad = np.ones(4)
    o = fastsgd.SGD([{"params": [p]}, {"params": [big]}], lr=0.1, momentum=0.9)
    o.step()
    o.state[p].clear()  # p takes a first step again, so its commit stores a buffer
    hashes.clear()
    o.step()
    resize_at = len(hashes)
    o.state[p].clear()
    hashes.clear()
    resize.append(lambda: o.state[big].pop("momentum_buffer").resize((1,), refcheck=True))
    expect_resize_refused(o.step)  # raises from group 0's commit: group 0 has run, group 1 has not
""")
add("momentum_buffer_resized_by_another_thread", RESIZE_PRELUDE + """
    # No subclass: another thread pops the buffer and resizes it while the
    # kernel runs with the GIL released.  A race: it tries for a while.
    import threading
    import time

    o = fastsgd.SGD([big], lr=1e-6, momentum=0.9)
    done = []

    def meddle():
        while not done:
            bufs = [o.state[big].pop("momentum_buffer", None)]
            try:
                bufs.pop().resize((1,), refcheck=True)
            except (ValueError, AttributeError):  # refused, or no buffer yet
                pass

    thread = threading.Thread(target=meddle)
    thread.start()
    deadline = time.time() + 1.5
    while time.time() < deadline:
        o.step()
    done.append(1)
    thread.join()
""")
add("buffer_swapped_unbound_is_unseen_but_safe", """
    # docs/guide/input-rules.md: dict's methods called unbound go unseen; the step keeps the
    # buffer it cached, which it still holds a reference to.
    opt.step()   # a step that finds the state as the last one left it
    old = opt.state[P1[0]]["momentum_buffer"]
    dict.__setitem__(opt.state[P1[0]], "momentum_buffer", np.zeros(99))
    old_copy = old.copy()
    opt.step()
    assert not np.array_equal(old, old_copy)
""")

# ------------------------------------------------------ malformed state_dicts

add("state_dict_buffer_wrong_shape_rejected_at_step", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["state"][1]["momentum_buffer"] = np.zeros(7, np.float32)
    opt.load_state_dict(sd)
    expect_error(ValueError, W(0, 1) + re.escape("momentum_buffer has shape (7,)"))
""")
add("state_dict_buffer_list_rejected_at_step", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["state"][4]["momentum_buffer"] = [1.0, 2.0, 3.0, 4.0, 5.0]
    opt.load_state_dict(sd)
    expect_error(TypeError, W(1, 0) + "momentum_buffer must be a numpy array, but got list")
""")
add("state_dict_buffer_other_dtype_is_cast_like_torch", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["state"][0]["momentum_buffer"] = np.arange(5, dtype=np.int64)
    sd["state"][5]["momentum_buffer"] = np.ones((2, 3), np.float16)
    opt.load_state_dict(sd)
    assert opt.state[P0[0]]["momentum_buffer"].dtype == np.float32
    assert opt.state[P1[1]]["momentum_buffer"].flags.f_contiguous
    check_like_torch(steps=2)
""")
add("state_dict_buffer_none_like_torch", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["state"][1]["momentum_buffer"] = None
    opt.load_state_dict(sd)
    check_like_torch(steps=2)
""")
add("state_dict_unknown_key_is_kept_like_torch", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["state"][99] = {"momentum_buffer": np.zeros(3)}
    opt.load_state_dict(sd)
    assert 99 in opt.state
    t, tmap = twin()
    opt.step()
    t.step()
    assert_same(opt, t, tmap)
""")
add("state_dict_lr_string_rejected_at_step", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["param_groups"][0]["lr"] = "0.1"
    opt.load_state_dict(sd)
    expect_error(TypeError, WO(0, "lr") + " must be a real number")
""")
add("state_dict_missing_momentum_rejected_at_step", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    del sd["param_groups"][1]["momentum"]
    opt.load_state_dict(sd)
    expect_error(KeyError, WO(1, "momentum") + " is missing")
""")
add("state_dict_wrong_group_count", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["param_groups"].pop()
    expect_error(ValueError, "different number of parameter groups",
                 call=lambda: opt.load_state_dict(sd))
""")
add("state_dict_wrong_group_size", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["param_groups"][1]["params"].pop()
    expect_error(ValueError, "doesn't match the size of optimizer's group",
                 call=lambda: opt.load_state_dict(sd))
""")
add("state_dict_missing_state", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    del sd["state"]
    expect_error(KeyError, "state", call=lambda: opt.load_state_dict(sd))
""")
add("state_dict_uncastable_buffer_leaves_optimizer_untouched", """
    sd = copy.deepcopy(opt.state_dict())   # its entries are the live state
    sd["state"][0]["momentum_buffer"] = np.array(["a", "b", "c", "d", "e"])
    expect_error(ValueError, "could not convert", call=lambda: opt.load_state_dict(sd))
    check_like_torch(steps=1)   # still steps, with its own state
""")


# ------------------------------------------------------------------- runner
#
# Importing torch and constructing its first optimizer (which imports
# torch._dynamo) take about 4 s, too much to pay once per case.  So each case
# runs in a process forked from a server process that has imported numpy,
# fastsgd and torch and done nothing else (no step, no thread): every case
# starts from that same pristine interpreter, shares no state with any other
# case, and a crash kills only its own process (its exit code is then minus
# the signal number).  One server per core runs the cases one after another.

SERVER = r"""
import json, os, signal, sys, time, traceback
import numpy, fastsgd, torch, torch._dynamo, torch.optim

def run_child(request):
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(null, 0); os.dup2(out, 1); os.dup2(err, 2)
        with open(request["source"]) as f:
            code = compile(f.read(), request["name"], "exec")
        exec(code, {"__name__": "__case__"})
    except BaseException:
        traceback.print_exc()
        status = 1
    else:
        status = 0
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(status)

while True:
    line = sys.stdin.readline()
    if not line:
        break
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run_child(request)
    deadline = time.monotonic() + request["timeout"]
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.002)
    sys.stdout.write(json.dumps({"exitcode": os.waitstatus_to_exitcode(status),
                                 "timed_out": timed_out}) + "\n")
    sys.stdout.flush()
"""


def source(name):
    """The whole program of a case, as its process runs it."""
    return PRELUDE + "\n" + CASES[name] + f"\nprint({SENTINEL!r})\n"


class _Server:
    def __init__(self, tmpdir, index):
        self.tmpdir = tmpdir
        self.log = os.path.join(tmpdir, f"server{index}.err")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True)

    def run(self, name):
        paths = {k: os.path.join(self.tmpdir, f"{name}.{k}") for k in ("py", "out", "err")}
        with open(paths["py"], "w") as f:
            f.write(source(name))
        request = {"name": name, "source": paths["py"], "out": paths["out"],
                   "err": paths["err"], "timeout": TIMEOUT}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        except OSError:
            reply = ""
        outputs = []
        for path in (paths["out"], paths["err"]):
            try:
                with open(path, errors="replace") as f:
                    outputs.append(f.read())
            except OSError:
                outputs.append("")
        if not reply:
            with open(self.log, errors="replace") as f:
                return None, outputs[0], outputs[1] + "\n(case server died)\n" + f.read()
        reply = json.loads(reply)
        if reply["timed_out"]:
            outputs[1] += f"\n(killed after {TIMEOUT} s)"
        return reply["exitcode"], outputs[0], outputs[1]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


_futures = {}


@pytest.fixture(scope="module", autouse=True)
def _run_selected_cases(request, tmp_path_factory):
    """Start every selected case now, one server per core."""
    tmpdir = str(tmp_path_factory.mktemp("hostile"))
    names = [item.callspec.params["name"] for item in request.session.items
             if item.module is sys.modules[__name__] and hasattr(item, "callspec")]
    nservers = max(1, min(os.cpu_count() or 1, len(names)))
    servers = queue.Queue()
    for i in range(nservers):
        servers.put(_Server(tmpdir, i))

    def run(name):
        server = servers.get()
        try:
            return server.run(name)
        finally:
            servers.put(server)

    pool = ThreadPoolExecutor(max_workers=nservers)
    for name in names:
        _futures[name] = pool.submit(run, name)
    yield
    pool.shutdown(wait=True, cancel_futures=True)
    _futures.clear()
    while not servers.empty():
        servers.get().close()


def test_at_least_60_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name]))
    if name in XFAIL else name for name in CASES])
def test_hostile_input(name):
    returncode, stdout, stderr = _futures[name].result()
    signal = f" (killed by signal {-returncode})" if returncode and returncode < 0 else ""
    assert returncode == 0 and SENTINEL in stdout, (
        f"case {name}: exit code {returncode}{signal}"
        f"\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")


if __name__ == "__main__":
    # python tests/test_hostile_inputs.py NAME  prints a case's program, to
    # run on its own: python -c "$(python tests/test_hostile_inputs.py NAME)"
    print(source(sys.argv[1]) if len(sys.argv) > 1 else "\n".join(CASES))
