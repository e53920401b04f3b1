"""The benchmark command runs and reports what it measured (no timing is
asserted: speed lives in benchmarks/)."""
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastsgd
from fastsgd import bench

needs_openmp = pytest.mark.skipif(not fastsgd.has_openmp(), reason="built without OpenMP")


def test_resnet50_shapes_are_torchvisions():
    shapes = bench.resnet50_shapes()
    assert len(shapes) == 161
    assert sum(int(np.prod(s)) for s in shapes) == 25_557_032


def test_bench_command_prints_a_table_and_writes_json_and_a_chart(tmp_path):
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "fastsgd", "bench", "--workloads", "W4", "--threads", "1",
         "--budget", "0.02", "--json", str(out), "--png", str(chart)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| W4 one tensor of 100, f32 | 1 |" in result.stdout
    assert "[1/1] W4 1T: fastsgd" in result.stderr  # progress
    data = json.loads(out.read_text())
    peers = {r["peer"] for r in data["results"]}
    assert {"fastsgd", "roofline", "reference"} <= peers
    assert all(r["seconds"] > 0 and r["gb_per_s"] > 0 for r in data["results"])
    if bench.cpu_ticks() is not None:  # Linux: the host's share of the run is recorded
        assert all(0 <= r["host_steal"] <= 1 for r in data["results"])
    assert data["machine"]["kernel"] == fastsgd.cpu_capability()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_makes_the_same_traffic_as_a_step():
    """The roofline's stream loop reads param, grad, buffer and writes param,
    buffer: each pass adds grad to the buffer and the buffer to the param."""
    p = fastsgd.Parameter(np.zeros(1000, np.float32))
    g = np.full(1000, 2.0, np.float32)
    b = np.ones(1000, np.float32)
    roofline = fastsgd._native.Roofline([p], [g], [b])
    roofline()
    assert np.all(b == 3.0) and np.all(p == 3.0)


@pytest.mark.parametrize("count", [2, 2048], ids=["on the calling thread", "on 2 threads"])
def test_the_roofline_reading_objects_finds_the_arrays_from_the_objects_each_pass(count):
    before = fastsgd.get_num_threads()
    fastsgd.set_num_threads(2)
    try:
        params = [fastsgd.Parameter(np.zeros(3 + i % 5, np.float32)) for i in range(count)]
        grads = [np.full(p.shape, 2.0, np.float32) for p in params]
        bufs = [np.ones(p.shape, np.float32) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        roofline = fastsgd._native.Roofline(params, grads, bufs, read_objects=True)
        roofline()
        assert all(np.all(b == 3.0) and np.all(p == 3.0) for p, b in zip(params, bufs))
        # It reads the grads each pass, and refuses one it does not hold.
        params[-1].grad = params[-1].grad.copy()
        with pytest.raises(ValueError, match=re.escape(f"params[{count - 1}].grad changed")):
            roofline()
        assert all(np.all(p == 3.0) for p in params)
    finally:
        fastsgd.set_num_threads(before)


def test_the_roofline_reading_objects_needs_parameters_of_one_dtype_with_their_grads():
    p32, p64 = fastsgd.Parameter(np.zeros(4, np.float32)), fastsgd.Parameter(np.zeros(4))
    g32, g64 = np.ones(4, np.float32), np.ones(4)
    p32.grad, p64.grad = g32, g64
    refused = [([p32, p64], [g32, g64]),  # two dtypes
               ([p32], [g32.copy()]),  # not the parameter's grad
               ([np.zeros(4, np.float32)], [g32]),  # not a Parameter
               ([fastsgd.Parameter(np.zeros(4, np.float32))], [None])]  # no grad
    for params, grads in refused:
        with pytest.raises(ValueError, match="reading objects needs Parameters"):
            fastsgd._native.Roofline(params, grads, [], read_objects=True)


def timed_steps(events, names):
    """Steps long enough to be timed one call per sample, not in a batch."""
    return [lambda name=name: (events.append(name), time.sleep(2e-3)) for name in names]


def test_every_sample_starts_after_the_flush_and_each_round_takes_a_new_order():
    events, names = [], "abcd"
    bench.measure_together(timed_steps(events, names), budget_s=0.0, min_rounds=15,
                           before_sample=lambda k: events.append(f"flush for {names[k]}"))
    # every call, the first of each step (which sizes its batch) too,
    # follows the flush for it
    calls = events[1::2]
    assert events[::2] == [f"flush for {name}" for name in calls]
    assert calls[:4] == list(names)
    rounds = [calls[k:k + 4] for k in range(4, len(calls), 4)]
    assert len(rounds) == 15 and all(sorted(r) == list(names) for r in rounds)
    # no step mostly follows the same one (rounds that only started one
    # step further on kept each after the same one in 3 rounds of 4)
    order = calls[4:]
    pairs = collections.Counter(zip(order, order[1:]))
    assert max(pairs.values()) <= 15 * 2 // 3


def test_steps_sampled_back_to_back_run_one_after_another_in_each_round():
    events, names = [], "abcde"
    bench.measure_together(timed_steps(events, names), budget_s=0.0, min_rounds=15,
                           back_to_back=[1, 3, 4])
    rounds = [events[k:k + 5] for k in range(5, len(events), 5)]
    assert len(rounds) == 15 and all(sorted(r) == list(names) for r in rounds)
    blocks = ["".join(name for name in r if name in "bde") for r in rounds]
    assert all("".join(r).find(block) >= 0 for r, block in zip(rounds, blocks))
    assert len(set(blocks)) > 1 and len({r.index("a") for r in rounds}) > 1  # new orders


@needs_openmp  # to step on 2 threads
def test_a_workloads_thread_counts_are_sampled_in_the_same_rounds(monkeypatch):
    """Each sample runs at its own thread count, set before the flush and
    the timed call; every round has both."""
    calls = []
    monkeypatch.setattr(bench, "CacheFlush", lambda: lambda: calls.append("flush"))
    monkeypatch.setitem(bench.PEERS, "probe", lambda workload, threads, model: (
        lambda: (calls.append(fastsgd.get_num_threads()), time.sleep(2e-3))))
    results = bench.run(["W2"], threads=(1, 2), peers=["probe"], budget_s=0.0, progress=None)
    assert [(r["peer"], r["threads"]) for r in results] == [("probe", 1), ("probe", 2)]
    assert calls[::2] == ["flush"] * (len(calls) // 2)
    samples = calls[1::2]
    assert len(samples) == 2 * (1 + 15)  # sizing, then 15 rounds
    assert all(sorted(samples[k:k + 2]) == [1, 2] for k in range(0, len(samples), 2))


@needs_openmp  # to step on 2 threads
def test_a_warm_sample_follows_a_step_of_the_same_peer(monkeypatch):
    calls = []
    monkeypatch.setitem(bench.PEERS, "probe", lambda workload, threads, model: (
        lambda: (calls.append(fastsgd.get_num_threads()), time.sleep(2e-3))))
    bench.run(["W4"], threads=(1, 2), peers=["probe"], budget_s=0.0, progress=None)
    # each sample: the warming step, then the timed one, at one thread count
    pairs = [calls[k:k + 2] for k in range(0, len(calls), 2)]
    assert len(pairs) == 2 * (1 + 15)
    assert all(pair in ([1, 1], [2, 2]) for pair in pairs)


def test_the_flush_streams_twice_the_last_level_cache():
    assert bench.last_level_cache_bytes() >= 1 << 20
    flush = bench.CacheFlush()
    assert flush.array.nbytes == 2 * bench.last_level_cache_bytes() // 8 * 8
    flush()
    assert flush.array[0] == 1.0


def test_the_pytest_benchmark_suite_runs():
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(root / "benchmarks"), "-q", "-k", "W4",
         "--benchmark-disable", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


def test_the_limits_table_sets_fastsgd_scaling_beside_the_rooflines():
    seconds = {("fastsgd", 1): 4.0, ("fastsgd", 2): 3.2, ("roofline", 1): 3.0,
               ("roofline", 2): 2.0, ("torch fused", 1): 30.0, ("torch fused", 2): 10.0,
               ("torch for-loop", 1): 12.0,
               ("roofline reading objects", 1): 3.75, ("roofline reading objects", 2): 2.5}
    results = [{"workload": "W2", "peer": p, "threads": t, "seconds": s}
               for (p, t), s in seconds.items()]
    lines = bench.limits_table(results).splitlines()
    # at best: 4 / (2.5 + (4 - 3.75) / 2), from the roofline reading objects
    assert lines[2] == "| W2 | 1.25 | 1.52 | 1.50 | 10.00 | 5.00 | 8.00 | 4.00 | 4.00 | - |"
    # without it, from the plain roofline: 4 / (2 + (4 - 3) / 2)
    plain = [r for r in results if r["peer"] != "roofline reading objects"]
    assert bench.limits_table(plain).splitlines()[2] == (
        "| W2 | 1.25 | 1.60 | 1.50 | 10.00 | 5.00 | - | - | 4.00 | - |")
    assert bench.limits_table([r for r in results if r["threads"] == 1]) == ""


def test_ratios_pair_the_samples_of_each_round():
    """A slow stretch that hits one round hits every peer's sample in it:
    the share of the roofline is the median of the rounds' shares, not the
    ratio of two medians drawn from different rounds."""
    rounds = {("fastsgd", 1): [1.0, 2.0, 10.0], ("roofline", 1): [0.9, 3.0, 9.0],
              ("fastsgd", 2): [0.5, 1.0, 5.0], ("roofline", 2): [0.45, 1.5, 4.5]}
    results = [{"workload": "W3", "peer": p, "threads": t, "seconds": sorted(r)[1],
                "gb_per_s": 1.0, "rounds": r} for (p, t), r in rounds.items()]
    results.append({"workload": "W3", "peer": "reference", "threads": 1, "seconds": 8.0,
                    "gb_per_s": 1.0, "rounds": None})  # sampled alone: medians
    rows = bench.table(results).splitlines()[2:]
    assert rows[0].startswith("| W3 one tensor of 50M, f32 | 1 | 2000.00 ms |")
    assert "| 90% | - |" in rows[0] and rows[0].endswith("| 4.00 |")
    assert "| 90% | - |" in rows[1] and rows[1].endswith("| 8.00 |")
    # fastsgd 2 threads vs 1: 2.0 in each round
    assert bench.limits_table(results).splitlines()[2].startswith("| W3 | 2.00 |")


def test_the_targets_peers_get_more_rounds_of_their_own(monkeypatch):
    order = []
    monkeypatch.setattr(bench, "CacheFlush", lambda: lambda: None)
    for name in ("fastsgd", "torch for-loop"):
        monkeypatch.setitem(bench.PEERS, name, lambda workload, threads, model, name=name: (
            lambda: order.append(name)))
    results = bench.run(["W2"], threads=(1,), peers=["fastsgd", "torch for-loop"],
                        budget_s=0.0, progress=None)
    assert {r["peer"]: len(r["rounds"]) for r in results} == {
        "fastsgd": 15 + bench._TARGET_ROUNDS, "torch for-loop": 15}
    # the rounds of both peers come first, then fastsgd's own
    last_shared = max(i for i, name in enumerate(order) if name == "torch for-loop")
    assert order[last_shared + 1:].count("fastsgd") >= bench._TARGET_ROUNDS


def test_a_peer_sampled_in_fewer_rounds_pairs_over_the_shared_first_rounds():
    results = [{"workload": "W3", "peer": "fastsgd", "threads": 1, "seconds": 3.0,
                "rounds": [1.0, 2.0, 3.0, 100.0, 100.0]},
               {"workload": "W3", "peer": "torch for-loop", "threads": 1, "seconds": 4.0,
                "rounds": [2.0, 4.0, 6.0]}]
    assert bench._Paired(results).ratio(("W3", "torch for-loop", 1), ("W3", "fastsgd", 1)) == 2.0


def test_steal_share_is_the_stolen_part_of_the_cpu_time_between_two_readings():
    assert bench.steal_share((10, 1000), (60, 1200)) == 0.25
    assert bench.steal_share(None, (60, 1200)) is None
    assert bench.steal_share((10, 1000), (10, 1000)) is None  # no time passed


def test_half_precision_peers_step_the_same_numbers():
    """The 16-bit and master-weights workloads' peers run, and fastsgd's
    master-weights step with GradScaler leaves the 16-bit params torch's
    chain (float32 params, GradScaler, fused SGD, copy back) leaves."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    for dtype in ("float16", "bfloat16"):
        workload = bench.Workload("T", "test", [(33,), (4, 5)], dtype, master_weights=True)
        model = bench.Model(*bench._model(workload))
        fast = bench.PEERS["fastsgd"](workload, 1, model)
        roofline = bench.PEERS["roofline"](workload, 1, model)
        chain_model = bench.Model(*bench._model(workload))
        chain = bench.PEERS["torch chain"](workload, 1, chain_model)
        assert bench.PEERS["torch fused"](workload, 1, model) is None
        for _ in range(2):
            fast()
            chain()
        params = model.fastsgd_optimizer.param_groups[0]["params"]
        copies = chain.halves
        for p, h in zip(params, copies):
            np.testing.assert_array_equal(np.asarray(p).view(np.uint16),
                                          h.view(torch.int16).numpy().view(np.uint16))
        roofline()
        plain = bench.Workload("T", "test", [(33,), (4, 5)], dtype)
        for peer in ("fastsgd", "fastsgd f32", "torch for-loop", "torch foreach", "reference"):
            bench.PEERS[peer](plain, 1, bench.Model(*bench._model(plain)))()


def test_the_torch_workloads_peers_run_and_get_new_grads_before_each_sample():
    torch = pytest.importorskip("torch")
    import fastsgd.torch

    workload = bench.Workload("T", "test", [(33,), (4, 5)], torch=True, new_grads=True)
    steps = {peer: bench.PEERS[peer](workload, 1, bench.Model(*bench._model(workload)))
             for peer in bench.PEERS}
    assert {p for p, step in steps.items() if step is not None} == {
        "fastsgd", "fastsgd on numpy", "fastsgd on 4 KiB pages", "fastsgd on numpy in torch's step",
        "torch for-loop", "torch foreach", "torch fused", "torch API floor"}
    wrapped = steps["fastsgd on numpy in torch's step"]
    assert isinstance(wrapped.__self__, torch.optim.Optimizer)
    assert getattr(type(wrapped.__self__).step, "hooked", False)  # torch's step wrapper
    fast = steps["fastsgd"]
    assert isinstance(fast.step.__self__, fastsgd.torch.SGD)
    params = fast.step.__self__.param_groups[0]["params"]
    before = [p.grad for p in params]
    fast.before_sample()
    assert all(p.grad is not g and torch.equal(p.grad, g) for p, g in zip(params, before))
    fast()


def test_fastsgd_on_numpy_steps_the_adapters_memory_on_the_torch_workloads():
    """So that their ratio is the adapter's cost, not where each one's memory lies."""
    pytest.importorskip("torch")
    workload = bench.Workload("T", "test", [(33,), (4, 5)], torch=True)
    model = bench.Model(*bench._model(workload))
    adapter = bench.PEERS["fastsgd"](workload, 1, model).__self__
    numpy_opt = bench.PEERS["fastsgd on numpy"](workload, 1, model).__self__
    for t, p in zip(adapter.param_groups[0]["params"], numpy_opt.param_groups[0]["params"]):
        for ours, theirs in ((t.detach().numpy(), p), (t.grad.numpy(), p.grad),
                             (adapter.state[t]["momentum_buffer"].numpy(),
                              numpy_opt.state[p]["momentum_buffer"])):
            assert np.shares_memory(ours, theirs) and ours.shape == theirs.shape
    # without the adapter it steps the workload's arrays
    alone = bench.Model(*bench._model(workload))
    numpy_opt = bench.PEERS["fastsgd on numpy"](workload, 1, alone).__self__
    assert all(np.shares_memory(p, v)
               for p, v in zip(numpy_opt.param_groups[0]["params"], alone.values))


def test_the_torch_api_floor_reads_the_grads_and_bumps_versions_without_stepping():
    torch = pytest.importorskip("torch")
    from fastsgd import _native

    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(5)
    before = [(p.detach().clone(), p._version) for p in params]
    _native.TorchApiFloor(params, torch.autograd.graph.increment_version)()
    assert all(torch.equal(p, value) and p._version == version + 1
               for p, (value, version) in zip(params, before))
