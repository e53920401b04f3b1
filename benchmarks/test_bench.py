"""pytest-benchmark view of the workloads of `python -m fastsgd bench`.

    python -m pytest benchmarks/ --benchmark-group-by=group

Each workload and thread count is one group, so pytest-benchmark's table sets
fastsgd beside the roofline, torch's three implementations and the numpy
reference.  Steps run back to back here (warm caches); the comparison command
flushes the cache before each sample.  Speed targets are judged from ratios
within one run (see docs/performance.md), never asserted here.
"""
import pytest

from fastsgd.bench import PEERS, WORKLOADS, Model, _dtype, _model


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_step(benchmark, workload, peer, threads):
    if _dtype(workload.dtype) is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    step = PEERS[peer](workload, threads, Model(*_model(workload)))
    if step is None:
        pytest.skip(f"{peer} does not run here at {threads} thread(s)")
    benchmark.group = f"{workload.name} {workload.description}, {threads} thread(s)"
    benchmark.extra_info["bytes_per_step"] = workload.bytes_per_step
    benchmark(step)
