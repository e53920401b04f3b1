"""Where a second thread starts to pay: the default of parallel_threshold().

For one float32 tensor of n elements (momentum, so 20 bytes of traffic per
element), time a step on 1 thread and on 2 threads with the threshold
lowered so that 2 threads are really used, and print both with the traffic
per thread.  The threshold belongs where the 2-thread time first wins.

    python benchmarks/threshold.py
"""
import time

import numpy as np

import fastsgd
from fastsgd import _native


def step_time(n, threads, reps=300):
    fastsgd.set_num_threads(threads)
    p = fastsgd.Parameter(np.ones(n, np.float32))
    p.grad = np.ones(n, np.float32)
    opt = fastsgd.SGD([p], lr=1e-3, momentum=0.9)
    opt.step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    default = _native.parallel_threshold()
    _native.parallel_threshold(1)
    print(f"{'elements':>10} {'bytes/thread':>13} {'1 thread':>10} {'2 threads':>10}  faster")
    try:
        for n in [2 ** k for k in range(10, 21)]:
            one, two = step_time(n, 1), step_time(n, 2)
            print(f"{n:>10} {n * 20 // 2:>13} {one * 1e6:>8.1f}us {two * 1e6:>8.1f}us  "
                  f"{'2 threads' if two < one else '1 thread'}")
    finally:
        _native.parallel_threshold(default)
        print(f"default threshold: {default} bytes per thread")


if __name__ == "__main__":
    main()
