"""Threads and instruction sets change the speed of a step, never its numbers."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastsgd
from fastsgd import reference


@pytest.fixture
def restore_threads():
    before = fastsgd.get_num_threads()
    yield
    fastsgd.set_num_threads(before)


def misaligned_model(rng, dtype):
    """Tensors of awkward sizes, viewing one block at offsets that are not on
    cache lines, large enough in total for a step to use several threads."""
    sizes = [1, 7, 300_001, 15, 16, 17, 129, 250_000, 3, 0, 64_000, 5]
    block = rng.standard_normal(sum(sizes) + 3 * len(sizes)).astype(dtype)
    params, start = [], 1
    for n in sizes:
        params.append(fastsgd.Parameter(block[start:start + n]))
        start += n + 3
    return params


def train(params, rng, steps=3, **options):
    opt = fastsgd.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, **options)
    for _ in range(steps):
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_any_thread_count_gives_the_same_bits(dtype, restore_threads):
    results = []
    for threads in (1, 2, 3, 4, 7):
        fastsgd.set_num_threads(threads)
        params = misaligned_model(np.random.default_rng(0), dtype)
        opt = train(params, np.random.default_rng(1), nesterov=True)
        results.append([np.array(p) for p in params] +
                       [np.array(opt.state[p]["momentum_buffer"]) for p in params])
    ref_params = misaligned_model(np.random.default_rng(0), dtype)
    ref = reference.SGD(ref_params, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    rng = np.random.default_rng(1)
    for _ in range(3):
        for p in ref_params:
            p.grad = rng.standard_normal(p.shape).astype(p.dtype)
        ref.step()
    expected = [np.array(p) for p in ref_params] + \
               [np.array(ref.state[p]["momentum_buffer"]) for p in ref_params]
    for got in results:
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_a_parameter_twice_in_a_group_steps_twice_in_order_like_torch(restore_threads):
    torch = pytest.importorskip("torch")
    fastsgd.set_num_threads(2)
    values = np.random.default_rng(2).standard_normal(400_000).astype(np.float32)
    grad = np.random.default_rng(3).standard_normal(400_000).astype(np.float32)
    p = fastsgd.Parameter(values.copy())
    tp = torch.nn.Parameter(torch.from_numpy(values.copy()))
    with pytest.warns(UserWarning):
        opt = fastsgd.SGD([p, p], lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning):
        topt = torch.optim.SGD([tp, tp], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(3):
        p.grad, tp.grad = grad, torch.from_numpy(grad.copy())
        opt.step()
        topt.step()
        np.testing.assert_array_equal(p, tp.detach().numpy())
        np.testing.assert_array_equal(opt.state[p]["momentum_buffer"],
                                      topt.state[tp]["momentum_buffer"].numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_instruction_set_matches_the_portable_kernel(dtype):
    fused = [c for c in fastsgd.available_capabilities() if c != "default"]
    assert "portable" in fused
    results = {}
    previous = fastsgd.cpu_capability()
    try:
        for capability in fused:
            fastsgd.set_cpu_capability(capability)
            params = misaligned_model(np.random.default_rng(4), dtype)
            train(params, np.random.default_rng(5), dampening=0.2, maximize=True)
            results[capability] = [np.array(p) for p in params]
    finally:
        fastsgd.set_cpu_capability(previous)
    for capability, arrays in results.items():
        for a, b in zip(arrays, results["portable"]):
            np.testing.assert_array_equal(a, b, err_msg=capability)


def test_thread_count_controls(restore_threads):
    fastsgd.set_num_threads(3)
    assert fastsgd.get_num_threads() == (3 if fastsgd.has_openmp() else 1)
    with pytest.raises(ValueError, match="at least 1"):
        fastsgd.set_num_threads(0)


@pytest.mark.skipif(not fastsgd.has_openmp(), reason="built without OpenMP")
def test_omp_num_threads_and_threadpoolctl_are_honoured():
    code = ("import fastsgd, threadpoolctl; print(fastsgd.get_num_threads());"
            "info = [i for i in threadpoolctl.threadpool_info() if i['user_api'] == 'openmp'];"
            "print(any(i['num_threads'] == 3 for i in info));"
            "ctl = threadpoolctl.ThreadpoolController();"
            "ctl.limit(limits=1, user_api='openmp');"
            "print(fastsgd.get_num_threads())")
    env = dict(os.environ, OMP_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["3", "True", "1"]
