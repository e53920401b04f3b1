"""Runs every path of the native step (each kernel the CPU and valgrind run, all
four dtypes, first and later steps, missing grads, rejections, looked-up buffers,
the functional API, the rooflines, gradient clipping, weight averaging, master weights with and
without GradScaler, its unscale, strided tensors stepped through their copies, and a group
staged on two threads) for the
memory checkers in tests/test_memory_checkers.py.  The grads a step must reject
are written to the raw _grad slot: p.grad = g refuses them before any step."""
import warnings

import ml_dtypes
import numpy as np

import fastsgd
from fastsgd import _native

rng = np.random.default_rng(0)
for cap in fastsgd.available_capabilities():
    if cap == "avx512":
        continue  # valgrind does not emulate AVX-512
    fastsgd.set_cpu_capability(cap)
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        params = [fastsgd.Parameter(rng.standard_normal(n).astype(dtype)) for n in (0, 1, 7, 17, 1000)]
        params.append(fastsgd.Parameter(np.asfortranarray(rng.standard_normal((5, 3)).astype(dtype))))
        params.append(fastsgd.Parameter(np.float64(1.5).astype(dtype).reshape(())))
        for opts in (dict(momentum=0.9, nesterov=True, weight_decay=0.1),
                     dict(momentum=0.9, dampening=0.2, maximize=True), dict()):
            opt = fastsgd.SGD([{"params": params[:4]}, {"params": params[4:], "lr": 0.5}], lr=0.1, **opts)
            for step in range(3):
                for i, p in enumerate(params):
                    p.grad = None if (i + step) % 4 == 0 else np.empty_like(p, subok=False)
                    if p.grad is not None:
                        p.grad[...] = rng.standard_normal(p.shape)
                opt.step()
            fastsgd.Parameter._grad.__set__(params[3], np.zeros(18, dtype))  # a step's rejection
            try:
                opt.step()
            except ValueError:
                pass
            opt.state[params[4]] = {"momentum_buffer": np.zeros(1000, dtype)}
            params[3].grad = np.zeros(17, dtype)
            opt.step()
        bufs = [None] * len(params)
        fastsgd.functional.sgd(params, [np.ones_like(p, subok=False) for p in params], bufs,
                               weight_decay=0.0, momentum=0.5, lr=0.1, dampening=0.0,
                               nesterov=False, maximize=False)
        _native.Roofline(params, [np.ones_like(p, subok=False) for p in params], bufs)()
        for p in params:
            p.grad = np.full_like(p, 0.5, subok=False)
        for norm_type in (2.0, 1.0, 0.0, 3.5):
            fastsgd.clip_grad_norm_(params, 0.1, norm_type)
        for norm_type in (float("inf"), -float("inf")):  # params[0] is empty
            fastsgd.clip_grad_norm_(params[1:], 0.1, norm_type)
        fastsgd.clip_grad_value_(params, 0.01)
        for kwargs in ({}, {"multi_avg_fn": fastsgd.swa_utils.get_ema_multi_avg_fn(0.9)}):
            averages = fastsgd.swa_utils.AveragedModel(params, **kwargs)
            for _ in range(3):
                averages.update_parameters(params)
        try:
            _native.lerp_arrays(params[1:3], [params[1], params[1]], 0.5)
        except ValueError:
            pass
        scaler = fastsgd.amp.GradScaler()
        scaler.scale(np.float32(1))
        if dtype != np.float16:  # torch refuses to unscale float16 grads in place
            scaler.unscale_(fastsgd.SGD(params, lr=0.1))
    # Master weights: first and later steps, GradScaler's checked steps (one
    # skipped), the roofline of a master-weights step.
    for dtype in (np.float16, ml_dtypes.bfloat16):
        halves = [fastsgd.Parameter(rng.standard_normal(n).astype(dtype)) for n in (0, 1, 33, 1000)]
        halves.append(fastsgd.Parameter(np.asfortranarray(rng.standard_normal((5, 7)).astype(dtype))))
        for opts in (dict(momentum=0.9, nesterov=True, weight_decay=0.1), dict(maximize=True)):
            opt = fastsgd.SGD(halves, lr=0.1, master_weights=True, **opts)
            scaler = fastsgd.amp.GradScaler(init_scale=4.0)
            for step in range(4):
                for p in halves:
                    p.grad = np.ones_like(p, subok=False)
                if step == 2:
                    halves[3].grad[5] = np.inf
                if step:
                    scaler.scale(np.float32(1))
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
            fastsgd.Parameter._grad.__set__(halves[2], np.ones(3, dtype))  # a rejection
            try:
                opt.step()
            except ValueError:
                pass
        masters = [opt.state[p]["master_param"] for p in halves]
        for p in halves:
            p.grad = np.ones_like(p, subok=False)
        _native.Roofline(halves, [p.grad for p in halves],
                         [np.zeros_like(m) for m in masters], masters=masters)()
# Strided params, grads and buffers, stepped through cached contiguous copies
# (16-bit ones with their per-element op bits): first and later steps, a
# loaded strided buffer, the element-wise clipping and unscale of strided
# grads, and the refusals (self-overlap, shared memory).
for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
    base = rng.standard_normal((6, 10, 2)).astype(dtype)
    strided = [fastsgd.Parameter(base[..., 0]), fastsgd.Parameter(base[::2, ::-3, 1]),
               fastsgd.Parameter(rng.standard_normal((7, 5)).astype(dtype).T),
               fastsgd.Parameter(np.zeros((0, 4), dtype)[:, ::2]),
               fastsgd.Parameter(rng.standard_normal((3, 70)).astype(dtype)[:, 1:]),
               # large enough for the tiled copy (a grad in the other order, step 1)
               fastsgd.Parameter(rng.standard_normal((90, 100)).astype(dtype)[::-1, ::2])]
    opt = fastsgd.SGD(strided, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    for step in range(3):
        for p in strided:
            p.grad = np.ones(p.shape[::-1], dtype).T if step == 1 else np.ones_like(p, subok=False)
        opt.step()
    opt.state[strided[2]] = {"momentum_buffer": np.zeros((5, 7), dtype)}  # C order, param F
    opt.step()
    fastsgd.clip_grad_value_(strided, 0.5)
    if np.dtype(dtype).itemsize >= 4:  # 16-bit grads unscale only beside master weights
        scaler = fastsgd.amp.GradScaler()
        scaler.scale(np.float32(1))
        scaler.unscale_(fastsgd.SGD(strided, lr=0.1))
    overlapping = fastsgd.Parameter(np.lib.stride_tricks.as_strided(
        np.zeros(4, dtype), shape=(3, 2), strides=(np.dtype(dtype).itemsize,) * 2))
    overlapping.grad = np.ones((3, 2), dtype)
    for bad in ([overlapping], [strided[0], strided[0]]):
        try:
            with warnings.catch_warnings():  # torch's warning of a duplicate parameter
                warnings.simplefilter("ignore", UserWarning)
                fastsgd.SGD(bad, lr=0.1).step()
        except ValueError:
            pass
# A group staged on 2 threads: steady-state steps, a missing grad, a rejection
# found by either thread, and a plain-dict state sending it back to one thread.
fastsgd.set_num_threads(2)
many = [fastsgd.Parameter(rng.standard_normal(n % 9).astype(np.float32 if n % 3 else np.float64))
        for n in range(1200)]
opt = fastsgd.SGD(many, lr=0.1, momentum=0.9)
for step in range(4):
    for i, p in enumerate(many):
        p.grad = None if step == 2 and i % 5 == 0 else np.ones_like(p, subok=False)
    opt.step()
for bad in (3, 1100):
    fastsgd.Parameter._grad.__set__(many[bad], np.zeros(20, many[bad].dtype))
    try:
        opt.step()
    except ValueError:
        pass
    many[bad].grad = np.ones_like(many[bad], subok=False)
opt.state[many[7]] = {"momentum_buffer": np.zeros_like(many[7], subok=False)}
opt.step()
# One dtype on 2 threads (its entries staged in place), every parameter
# sharing one grad object (held atomically by both threads).
one_dtype = [fastsgd.Parameter(rng.standard_normal(8).astype(np.float32)) for _ in range(1200)]
shared = np.ones(8, np.float32)
for p in one_dtype:
    p.grad = shared
opt_one = fastsgd.SGD(one_dtype, lr=0.1, momentum=0.9)
for _ in range(3):
    opt_one.step()
# The roofline reading objects, on 2 threads, and refusing a changed grad.
same_dtype = [p for p in many if p.dtype == np.float32]
roofline = _native.Roofline(same_dtype, [p.grad for p in same_dtype],
                            [opt.state[p]["momentum_buffer"] for p in same_dtype], True)
roofline()
same_dtype[-1].grad = same_dtype[-1].grad.copy()
try:
    roofline()
except ValueError:
    pass
assert _native.parallel_staging_count() > 0 or not fastsgd.has_openmp()
print("memcheck drive done")
