"""What a strided parameter costs: fastsgd against torch's for-loop SGD on the same layouts.

Each row steps one 2,048 x 2,048 parameter (momentum, nesterov, weight decay;
a C-contiguous grad) on 1 thread, contiguous and in strided layouts, with the
caches flushed before every step; it prints medians of individually timed
steps and torch's time over fastsgd's.  The tables in
docs/guide/input-rules.md come from it.

    python benchmarks/strided.py
"""
import statistics
import time

import ml_dtypes
import numpy as np
import torch

import fastsgd

N = 2048
LAYOUTS = [
    ("contiguous", (N, N), lambda a: a),
    ("`base[:, ::2]` of 2,048 x 4,096", (N, 2 * N), lambda a: a[:, ::2]),
    ("`[..., 0]` of 2,048 x 2,048 x 2", (N, N, 2), lambda a: a[..., 0]),
    ("transposed", (N, N), lambda a: a.T),
]
DTYPES = [("float32", np.float32, torch.float32), ("float16", np.float16, torch.float16),
          ("bfloat16", ml_dtypes.bfloat16, torch.bfloat16)]
OPTIONS = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)


def median_step(opt, steps=15):
    flush = np.zeros(64 << 20, np.uint8)  # larger than the last-level cache
    opt.step()
    times = []
    for _ in range(steps):
        flush += 1
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    torch.set_num_threads(1)
    fastsgd.set_num_threads(1)
    print(f"kernel {fastsgd.cpu_capability()}, 1 thread")
    print("| parameter | fastsgd | torch for-loop | x vs torch |\n|---|---|---|---|")
    for name, np_dtype, torch_dtype in DTYPES:
        for layout, base_shape, view in LAYOUTS:
            p = fastsgd.Parameter(view(np.zeros(base_shape, np_dtype)))
            p.grad = np.full(p.shape, 1e-3, np_dtype)
            ours = median_step(fastsgd.SGD([p], **OPTIONS))
            t = view(torch.zeros(base_shape, dtype=torch_dtype))
            t.grad = torch.full(t.shape, 1e-3, dtype=torch_dtype)
            theirs = median_step(torch.optim.SGD([t], foreach=False, **OPTIONS))
            print(f"| {name} {layout} | {ours * 1e3:.1f} ms | {theirs * 1e3:.1f} ms | "
                  f"{theirs / ours:.2f} |")


if __name__ == "__main__":
    main()
