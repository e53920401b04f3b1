"""Steps from several Python threads, and from a forked child."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastsgd


def make_optimizer(seed, n=300_000):
    rng = np.random.default_rng(seed)
    params = [fastsgd.Parameter(rng.standard_normal(n).astype(np.float32)),
              fastsgd.Parameter(rng.standard_normal(17))]
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)
    return fastsgd.SGD(params, lr=0.01, momentum=0.9, nesterov=True), params


def snapshot(opt, params):
    return [np.array(p) for p in params] + [np.array(opt.state[p]["momentum_buffer"]) for p in params]


def test_eight_threads_stepping_eight_optimizers_match_serial_runs():
    serial = []
    for seed in range(8):
        opt, params = make_optimizer(seed)
        for _ in range(20):
            opt.step()
        serial.append(snapshot(opt, params))

    models = [make_optimizer(seed) for seed in range(8)]
    barrier = threading.Barrier(8)

    def train(opt):
        barrier.wait()
        for _ in range(20):
            opt.step()

    threads = [threading.Thread(target=train, args=(opt,)) for opt, _ in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (opt, params), expected in zip(models, serial):
        for a, b in zip(snapshot(opt, params), expected):
            np.testing.assert_array_equal(a, b)


def test_two_threads_stepping_one_optimizer_take_turns():
    """Each step is atomic: 2 threads x 25 steps equal 50 serial steps."""
    reference_opt, reference_params = make_optimizer(9)
    for _ in range(50):
        reference_opt.step()
    opt, params = make_optimizer(9)
    barrier = threading.Barrier(2)

    def train():
        barrier.wait()
        for _ in range(25):
            opt.step()

    threads = [threading.Thread(target=train) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(snapshot(opt, params), snapshot(reference_opt, reference_params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.skipif(not fastsgd.has_openmp(), reason="built without OpenMP")
def test_child_forked_after_the_parent_used_threads_steps_without_hanging():
    code = """if True:
        import os, numpy as np, fastsgd
        fastsgd.set_num_threads(2)
        p = fastsgd.Parameter(np.ones(4_000_000, np.float32)); p.grad = np.ones_like(p)
        opt = fastsgd.SGD([p], lr=0.5)
        opt.step()  # the parent's OpenMP pool is running now
        pid = os.fork()
        if pid == 0:
            opt.step()
            ok = float(p.min()) == float(p.max()) == 0.0 and fastsgd.get_num_threads() == 1
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        opt.step()  # the parent keeps its threads
        assert fastsgd.get_num_threads() == 2 and float(p[0]) == 0.0
        print("child exit", os.waitstatus_to_exitcode(status))
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "child exit 0" in result.stdout
