"""No leaks: long runs keep memory flat, and steps (good or rejected) leave
every array's reference count as it was."""
import sys
import tracemalloc

import numpy as np
import pytest

import fastsgd

# p.grad = g refuses a wrong shape; the step's own rejection (a grad changed
# after assignment) is reached by writing the raw slot.
set_grad_unchecked = fastsgd.Parameter._grad.__set__


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def small_model():
    rng = np.random.default_rng(0)
    params = [fastsgd.Parameter(rng.standard_normal(n).astype(np.float32)) for n in (3, 100, 7)]
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    opt = fastsgd.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}],
                      lr=1e-4, momentum=0.9)
    return opt, params


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_hundred_thousand_steps_with_a_thousand_rejections_keep_memory_flat():
    opt, params = small_model()
    good, bad = params[2].grad, np.zeros(8, np.float32)

    def run(steps):
        for i in range(steps):
            if i % 100 == 0:
                set_grad_unchecked(params[2], bad)
                with pytest.raises(ValueError):
                    opt.step()
                params[2].grad = good
            opt.step()

    run(2_000)  # warm up caches, free lists and the plan
    rss_before = rss_bytes()
    tracemalloc.start()
    try:
        traced_before = tracemalloc.get_traced_memory()[0]
        run(100_000)  # includes 1,000 rejected steps
        traced_growth = tracemalloc.get_traced_memory()[0] - traced_before
    finally:
        tracemalloc.stop()
    assert traced_growth < 64 * 1024
    assert rss_bytes() - rss_before < 1024 * 1024


def test_reference_counts_are_unchanged_by_good_and_rejected_steps():
    opt, params = small_model()
    opt.step()
    opt.step()  # the step after the buffers' first caches them
    buffers = [opt.state[p]["momentum_buffer"] for p in params]
    grads = [p.grad for p in params]

    def counts():
        return [sys.getrefcount(x) for x in params + grads + buffers]

    before = counts()
    opt.step()
    assert counts() == before
    set_grad_unchecked(params[1], np.zeros(5, np.float32))  # rejected: wrong shape
    with pytest.raises(ValueError):
        opt.step()
    params[1].grad = grads[1]
    assert counts() == before
    fastsgd.functional.sgd(params, grads, buffers, weight_decay=0, momentum=0.9, lr=0.1,
                           dampening=0, nesterov=False, maximize=False)
    assert counts() == before
