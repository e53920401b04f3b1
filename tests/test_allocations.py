"""A steady-state step allocates nothing, and its overhead does not grow."""
import numpy as np

import fastsgd
from fastsgd.bench import traced_memory


def test_steady_state_step_allocates_nothing():
    rng = np.random.default_rng(0)
    params = [fastsgd.Parameter(rng.standard_normal(n).astype(np.float32))
              for n in (3, 1000, 70_000)] + [fastsgd.Parameter(rng.standard_normal(50))]
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)
    opt = fastsgd.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}],
                      lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for _ in range(3):  # first step creates buffers, the next rebuilds the plan
        opt.step()
    # get_traced_memory's own result is traced too: compare against a loop
    # of no steps, which pays the same.
    assert _traced_growth_and_peak(opt, 1000) == _traced_growth_and_peak(opt, 0)


def test_steady_state_step_of_many_tensors_on_two_threads_allocates_nothing():
    """The group is staged on two threads (see test_parallel_staging.py)."""
    rng = np.random.default_rng(1)
    params = [fastsgd.Parameter(rng.standard_normal(16).astype(np.float32))
              for _ in range(2000)]
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)
    opt = fastsgd.SGD(params, lr=0.01, momentum=0.9)
    threads = fastsgd.get_num_threads()
    fastsgd.set_num_threads(2)
    try:
        for _ in range(3):
            opt.step()
        assert _traced_growth_and_peak(opt, 200) == _traced_growth_and_peak(opt, 0)
    finally:
        fastsgd.set_num_threads(threads)


def test_steady_state_step_of_strided_tensors_allocates_nothing():
    """Staged tensors (plan.pyx) reuse the copies their plan keeps: a strided
    parameter, a grad in the other order than its parameter, a contiguous
    parameter beside them."""
    rng = np.random.default_rng(2)
    strided = fastsgd.Parameter(rng.standard_normal((30, 20, 3))[..., 1])
    transposed = fastsgd.Parameter(rng.standard_normal((20, 30)).T)
    dense = fastsgd.Parameter(rng.standard_normal(40))
    strided.grad = rng.standard_normal((30, 20, 2))[..., 0]
    transposed.grad = rng.standard_normal((30, 20))  # C order for a Fortran-ordered parameter
    dense.grad = rng.standard_normal(40)
    opt = fastsgd.SGD([strided, transposed, dense], lr=0.01, momentum=0.9)
    for _ in range(3):
        opt.step()
    assert _traced_growth_and_peak(opt, 200) == _traced_growth_and_peak(opt, 0)


def _traced_growth_and_peak(opt, n):
    """(memory kept, memory peaked above the start) over n steps."""
    return traced_memory(opt.step, n)
