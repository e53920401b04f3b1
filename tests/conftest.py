import os
import sys

import pytest

# torch brings its own OpenMP runtime; with both spinning after their
# parallel regions, 2 cores run 4 busy threads and the suite crawls.  Set
# before either runtime loads (each reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


@pytest.fixture(autouse=True)
def _restore_thread_counts():
    """Give fastsgd and torch back their thread counts after each test: a
    test that changes them (a benchmark peer sets both) must not change the
    numbers of the tests after it (torch's norms depend on its threads)."""
    import fastsgd

    torch = sys.modules.get("torch")
    threads = fastsgd.get_num_threads()
    # torch's default when a test imports it first: one thread per core here
    torch_threads = torch.get_num_threads() if torch else os.cpu_count()
    yield
    fastsgd.set_num_threads(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(torch_threads)


@pytest.fixture(params=["exchange API", "Python API"])
def tensor_reads(request):
    """fastsgd.torch.SGD reading tensors through DLPack's C exchange API (the
    torch the tests pin has it) and through torch's Python API (older torch)."""
    from fastsgd._native.tensors import _set_exchange_api

    assert _set_exchange_api(request.param == "exchange API") == (
        request.param == "exchange API")
    yield request.param
    _set_exchange_api(True)
