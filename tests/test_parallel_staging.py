"""A group of many tensors is staged (read, checked and gathered into the
kernel's pointer lists) on several threads.  That path must give the bits,
errors and reference counts of the calling thread's, and hand a group back
to the calling thread whenever one of its tensors needs more than the
steady state."""
import re
import sys

import numpy as np
import pytest

import fastsgd
from fastsgd import _native, reference

pytestmark = pytest.mark.skipif(not fastsgd.has_openmp(), reason="built without OpenMP")

MANY = 3000  # 2 threads share staging from 1,024 tensors on
OPTIONS = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


@pytest.fixture(autouse=True)
def two_threads():
    before = fastsgd.get_num_threads()
    fastsgd.set_num_threads(2)
    yield
    fastsgd.set_num_threads(before)


def twins(seed=0):
    """The same MANY tensors (float32 and float64 interleaved, empty, 1-D,
    2-D in C and Fortran order) under fastsgd.SGD and reference.SGD."""
    rng = np.random.default_rng(seed)
    values = []
    for i in range(MANY):
        dtype = np.float64 if i % 3 == 0 else np.float32
        if i % 5:
            value = rng.standard_normal(int(rng.integers(0, 40)))
        else:
            value = rng.standard_normal((3, int(rng.integers(1, 9))))
            value = np.asfortranarray(value) if i % 10 == 0 else value
        values.append(value.astype(dtype, order="A"))
    fast = [fastsgd.Parameter(v.copy(order="A")) for v in values]
    ref = [fastsgd.Parameter(v.copy(order="A")) for v in values]
    return fastsgd.SGD(fast, **OPTIONS), fast, reference.SGD(ref, **OPTIONS), ref


def grad_like(rng, p):
    g = np.empty_like(p, subok=False)  # in p's memory order
    g[...] = rng.standard_normal(p.shape)
    return g


def set_grads(rng, *param_lists, none_every=0):
    grads = [grad_like(rng, p) for p in param_lists[0]]
    for params in param_lists:
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if none_every and i % none_every == 0 else g.copy(order="A")


def assert_same(opt, fast, ref_opt, ref):
    for a, b in zip(fast, ref):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(opt.state[a]["momentum_buffer"],
                                      ref_opt.state[b]["momentum_buffer"])


def test_staging_threads_give_the_reference_bits():
    opt, fast, ref_opt, ref = twins()
    rng = np.random.default_rng(1)
    threaded = []
    for step in range(4):
        set_grads(rng, fast, ref, none_every=7 if step == 2 else 0)
        before = _native.parallel_staging_count()
        opt.step()
        threaded.append(_native.parallel_staging_count() - before)
        ref_opt.step()
    # The first step creates the buffers on the calling thread; the
    # steady-state steps (one with missing grads) are staged on two.
    assert threaded == [0, 1, 1, 1]
    assert_same(opt, fast, ref_opt, ref)


def test_a_tensor_off_the_steady_state_sends_the_group_back_to_the_calling_thread():
    opt, fast, ref_opt, ref = twins()
    rng = np.random.default_rng(2)
    set_grads(rng, fast, ref)
    opt.step()
    ref_opt.step()
    for o, params in ((opt, fast), (ref_opt, ref)):  # a plain dict: looked up per step
        o.state[params[-1]] = {"momentum_buffer": np.full(params[-1].shape, 0.5,
                                                          params[-1].dtype)}
    for _ in range(2):
        set_grads(rng, fast, ref)
        before = _native.parallel_staging_count()
        opt.step()
        assert _native.parallel_staging_count() == before
        ref_opt.step()
    assert_same(opt, fast, ref_opt, ref)


@pytest.mark.parametrize("position", [5, MANY - 5], ids=["first thread", "second thread"])
def test_a_bad_grad_found_by_a_staging_thread_is_named_and_nothing_is_written(position):
    opt, fast, _, _ = twins()
    rng = np.random.default_rng(3)
    for _ in range(2):
        set_grads(rng, fast)
        opt.step()
    buffers = [opt.state[p]["momentum_buffer"] for p in fast]
    saved = [a.copy(order="A") for a in fast + buffers]
    bad = fast[position]
    # p.grad = g refuses it; the step's own rule, for a grad changed after
    # assignment, is reached by writing the raw slot
    fastsgd.Parameter._grad.__set__(bad, np.zeros(bad.size + 1, bad.dtype))
    where = re.escape(f"param_groups[0]['params'][{position}]: grad has shape")
    with pytest.raises(ValueError, match=where):
        opt.step()
    for a, b in zip(fast + buffers, saved):
        assert a.tobytes(order="A") == b.tobytes(order="A")


def one_dtype_group(count=2048):
    rng = np.random.default_rng(7)
    fast = [fastsgd.Parameter(rng.standard_normal(256).astype(np.float32)) for _ in range(count)]
    return fastsgd.SGD(fast, **OPTIONS), fast


@pytest.mark.parametrize("layout", ["mixed dtypes", "one dtype", "one grad for all",
                                    "one grad for all and a first step"])
def test_staging_threads_leave_reference_counts_as_they_were(layout):
    """The staging threads hold each grad they stage, atomically (one grad
    object may be every parameter's); whatever the path, the step lets go
    of each exactly once.  A first step (a tensor without buffer yet)
    sends the group back to the calling thread after the threads held
    every other grad."""
    if layout == "mixed dtypes":
        opt, fast, _, _ = twins()
    else:
        opt, fast = one_dtype_group()
    rng = np.random.default_rng(4)
    shared = rng.standard_normal(256).astype(np.float32)
    first_step = layout.endswith("a first step")
    for _ in range(2):
        set_grads(rng, fast)
        if layout.startswith("one grad for all"):
            for p in fast:
                p.grad = shared
        if first_step:
            fast[-1].grad = None
        opt.step()
    if first_step:
        fast[-1].grad = shared
    grads = [p.grad for p in fast]
    stepped = [p for p in fast if p in opt.state]  # the first step adds a state entry
    buffers = [opt.state[p]["momentum_buffer"] for p in stepped]

    def counts():
        return [sys.getrefcount(x) for x in stepped + grads + buffers]

    before, stagings = counts(), _native.parallel_staging_count()
    steps = 1 if first_step else 3
    for _ in range(steps):
        opt.step()
    assert _native.parallel_staging_count() == stagings + (0 if first_step else steps)
    assert counts() == before


class GradArray(np.ndarray):
    """An ndarray subclass: a grad the rules accept like any array."""


@pytest.mark.parametrize("position", [5, MANY - 5], ids=["first thread", "second thread"])
def test_odd_grads_read_by_a_staging_thread_are_refused_or_stepped_like_the_reference(position):
    opt, fast, ref_opt, ref = twins()
    rng = np.random.default_rng(5)
    for _ in range(2):
        set_grads(rng, fast, ref)
        opt.step()
        ref_opt.step()
    set_grads(rng, fast, ref)
    fast[position].grad = fast[position].grad.view(GradArray)
    opt.step()
    ref_opt.step()
    assert_same(opt, fast, ref_opt, ref)
    fastsgd.Parameter._grad.__set__(fast[position], fast[position].grad.tolist())
    with pytest.raises(TypeError, match=re.escape(
            f"param_groups[0]['params'][{position}]: grad must be a numpy array, but got list")):
        opt.step()


@pytest.mark.parametrize("source", ["parameter", "momentum buffer"])
def test_a_grad_that_is_another_tensors_memory_is_read_in_order(source):
    """Tensor `cut` starts the second thread's span; its grad is what the
    first thread writes last.  Read in the group's order, as torch does, it
    is the updated value; a concurrent read would find the old one."""
    count, cut = 2048, 1024
    rng = np.random.default_rng(6)
    values = [rng.standard_normal(256).astype(np.float32) for _ in range(count)]
    fast = [fastsgd.Parameter(v.copy()) for v in values]
    ref = [fastsgd.Parameter(v.copy()) for v in values]
    opt, ref_opt = fastsgd.SGD(fast, **OPTIONS), reference.SGD(ref, **OPTIONS)
    for step in range(3):
        set_grads(rng, fast, ref)
        if step:  # the buffers exist from the first step on
            for o, params in ((opt, fast), (ref_opt, ref)):
                earlier = params[cut - 1]
                memory = earlier if source == "parameter" else o.state[earlier]["momentum_buffer"]
                params[cut].grad = memory.view(np.ndarray)
        before = _native.parallel_staging_count()
        opt.step()
        assert _native.parallel_staging_count() == before + (step > 0)
        ref_opt.step()
        assert_same(opt, fast, ref_opt, ref)
