"""python -m fastsgd bench: fastsgd against its peers, measured in one process.

Peers: torch's for-loop (its CPU default), foreach and fused SGD when torch is
installed, fastsgd.reference (numpy), and the roofline: a C streaming loop
shipped in the extension that makes the same reads and writes per element as
a step, split over threads the same way.  The 16-bit workloads add fastsgd's
float32 step of the same shapes; the master-weights workloads time fastsgd's
step with GradScaler against torch's chain: float32 params with
GradScaler("cpu") and fused SGD, then a copy back to the 16-bit params
(torch's fused SGD does not write 16-bit params in torch 2.13, and is left
out there).  The torch workloads (T1, T2) time fastsgd.torch.SGD on torch
tensors as "fastsgd", beside fastsgd.SGD on numpy views of the same tensors
and torch's three SGDs, and the torch API floor: per tensor only the reads
through torch's public Python API that any such adapter makes each step
(the grad and its data pointer) and the version bump, stepping nothing.  T2
gives every torch peer new grad tensors before each sample (untimed), as a
backward pass after zero_grad() does.  Every peer
starts from the same
values and grads; times are medians of individually timed steps (batched for
steps shorter than a millisecond).  Every sample starts from a state that does
not depend on which peer ran before it: "cold", the cache flushed, as a step
finds it after a backward pass (every workload but W4), or "warm", the same
peer having just stepped, as in back-to-back calls (W4, which measures the
overhead of a call).  Ratios are only meaningful within one run.
"""
import glob
import itertools
import json
import math
import mmap
import operator
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np

import fastsgd
from fastsgd import _native, reference

DEFAULT_OPTIONS = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}


def resnet50_shapes():
    """The parameter shapes of torchvision's ResNet-50: 161 tensors, 25,557,032 elements."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:  # the downsampling shortcut
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def _dtype(name):
    """The numpy dtype called name; bfloat16 is ml_dtypes' (None without it)."""
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


@dataclass
class Workload:
    name: str
    description: str
    shapes: list
    dtype: str = "float32"
    options: dict = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    cache: str = "cold"  # the state each sample starts from (see the module's doc)
    master_weights: bool = False  # 16-bit params, float32 masters, GradScaler
    torch: bool = False  # "fastsgd" is fastsgd.torch.SGD on torch tensors
    new_grads: bool = False  # torch peers get new grad tensors before each sample

    @property
    def elements(self):
        return sum(math.prod(s) for s in self.shapes)

    @property
    def bytes_per_step(self):
        """Reads of param, grad and buffer, writes of param and buffer; with
        master weights, 22 bytes per element: the 16-bit grad read, the
        float32 master and buffer read and written, and the 16-bit param
        written (its cache lines read first)."""
        if self.master_weights:
            return self.elements * 22
        per_element = 5 if self.options["momentum"] else 3
        return self.elements * _dtype(self.dtype).itemsize * per_element


WORKLOADS = [
    Workload("W1", "ResNet-50 shapes, f32", resnet50_shapes()),
    Workload("W2", "5,000 tensors x 256, f32", [(256,)] * 5000),
    Workload("W3", "one tensor of 50M, f32", [(50_000_000,)]),
    Workload("W4", "one tensor of 100, f32", [(100,)], cache="warm"),
    Workload("W5", "ResNet-50 shapes, f64", resnet50_shapes(), "float64"),
    Workload("W6", "ResNet-50, plain momentum", resnet50_shapes(),
             options={"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}),
    # half precision (issue 14)
    Workload("H1", "ResNet-50 shapes, f16", resnet50_shapes(), "float16"),
    Workload("H2", "ResNet-50 shapes, bf16", resnet50_shapes(), "bfloat16"),
    Workload("H3", "5,000 tensors x 256, f16", [(256,)] * 5000, "float16"),
    Workload("H4", "5,000 tensors x 256, bf16", [(256,)] * 5000, "bfloat16"),
    Workload("M1", "ResNet-50, bf16 master weights", resnet50_shapes(), "bfloat16",
             master_weights=True),
    Workload("M2", "ResNet-50, f16 master weights", resnet50_shapes(), "float16",
             master_weights=True),
    # torch tensors (issue 15)
    Workload("T1", "ResNet-50 shapes, f32, torch tensors", resnet50_shapes(), torch=True),
    Workload("T2", "5,000 tensors x 256, f32, torch tensors, new grads", [(256,)] * 5000,
             torch=True, new_grads=True),
]


def _model(workload, seed=0):
    rng = np.random.default_rng(seed)
    dtype = _dtype(workload.dtype)
    values = [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in workload.shapes]
    grads = [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in workload.shapes]
    return values, grads


# Each peer: setup(workload, threads, model) -> a callable running one step
# (after a warm-up step, so momentum buffers exist), or None when it cannot
# run.  `model` holds the workload's values and grads; peers copy them, except
# fastsgd and the roofline, which share one set of arrays so that the roofline
# streams exactly the memory fastsgd steps, from the same cache state.  On the
# torch workloads "fastsgd on numpy" steps numpy views of fastsgd.torch.SGD's
# tensors for the same reason: their ratio is then the adapter's cost, not
# how each peer's memory happened to be placed (the share of it on huge pages
# moved that ratio between runs by several percent).

@dataclass
class Model:
    values: list
    grads: list
    fastsgd_optimizer: object = None
    torch_optimizer: object = None  # fastsgd.torch.SGD, on the torch workloads


def _fastsgd_step(workload, threads, model, optimizer_class=fastsgd.SGD):
    if workload.torch and optimizer_class is fastsgd.SGD:
        return _torch_step("fastsgd.torch")(workload, threads, model)
    fastsgd.set_num_threads(threads)
    params = [fastsgd.Parameter(v) for v in model.values]
    for p, g in zip(params, model.grads):
        p.grad = g
    opt = optimizer_class(params, **workload.options, master_weights=workload.master_weights)
    opt.step()
    if optimizer_class is fastsgd.SGD:
        model.fastsgd_optimizer = opt
    if not workload.master_weights:
        return opt.step
    # scale 1 and no growth: every step does the same work on the same values
    scaler = fastsgd.amp.GradScaler(init_scale=1.0, growth_interval=1 << 30)
    scaler.scale(np.float32(1))

    def step():
        scaler.step(opt)
        scaler.update()
    return step


def _fastsgd_float32_step(workload, threads, model):
    """fastsgd's float32 step of a 16-bit workload's shapes (targets compare
    the 16-bit steps with it)."""
    if _dtype(workload.dtype).itemsize != 2 or workload.master_weights:
        return None
    float32 = Model([v.astype(np.float32) for v in model.values],
                    [g.astype(np.float32) for g in model.grads])
    return _fastsgd_step(workload, threads, float32, _FastsgdFloat32)


class _FastsgdFloat32(fastsgd.SGD):
    """fastsgd.SGD, as a peer of its own 16-bit steps."""


def _fastsgd_numpy_step(workload, threads, model):
    """fastsgd.SGD on numpy arrays of a torch workload's shapes (a target
    compares fastsgd.torch.SGD with it): numpy views of fastsgd.torch.SGD's
    parameters, grads and momentum buffers when it runs too."""
    if not workload.torch:
        return None
    adapter = model.torch_optimizer
    if adapter is None:
        return _fastsgd_step(workload, threads, model, _FastsgdNumpy)
    tensors = adapter.param_groups[0]["params"]
    views = Model([t.detach().numpy() for t in tensors], [t.grad.numpy() for t in tensors])
    step = _fastsgd_step(workload, threads, views, _FastsgdNumpy)
    opt = step.__self__
    for p, t in zip(opt.param_groups[0]["params"], tensors):
        if "momentum_buffer" in adapter.state[t]:
            opt.state[p]["momentum_buffer"] = adapter.state[t]["momentum_buffer"].numpy()
    return step


class _FastsgdNumpy(fastsgd.SGD):
    """fastsgd.SGD, as a peer of fastsgd.torch.SGD."""


def _fastsgd_numpy_in_torch_step(workload, threads, model):
    """fastsgd on numpy, its step called from a torch optimizer's step():
    what torch.optim.Optimizer wraps around every step (a profiler record,
    the step hooks, grad mode) added to it.  Any torch optimizer pays that,
    so it bounds T1's target."""
    numpy_step = _fastsgd_numpy_step(workload, threads, model)
    if numpy_step is None:
        return None
    import torch
    from torch.optim.optimizer import _use_grad_for_differentiable

    class AroundNumpy(torch.optim.Optimizer):
        """A torch optimizer whose step is fastsgd.SGD's."""

        def __init__(self):
            super().__init__([torch.zeros(1, requires_grad=True)], {"differentiable": False})

        @_use_grad_for_differentiable
        def step(self, closure=None):  # (no closure: the workload's grads are set)
            numpy_step()
    return AroundNumpy().step


def _fastsgd_small_pages_step(workload, threads, model):
    """fastsgd.SGD on numpy arrays of a torch workload's shapes, each array
    (param, grad, momentum buffer) in an anonymous mapping of its own, as
    torch's allocator gives large tensors: 4 KiB pages where transparent
    huge pages are on request only (numpy requests them for arrays of 4 MiB
    and more).  It shows what torch's pages cost the kernel: the torch
    peers' tensors here are copies made by numpy."""
    if not workload.torch or workload.master_weights:
        return None

    def mapped(array):
        region = mmap.mmap(-1, max(array.nbytes, 1))
        copy = np.frombuffer(region, array.dtype, array.size).reshape(array.shape)
        copy[...] = array
        return copy
    small = Model([mapped(v) for v in model.values], [mapped(g) for g in model.grads])
    step = _fastsgd_step(workload, threads, small, _FastsgdSmallPages)
    opt = step.__self__
    for p in opt.param_groups[0]["params"]:
        if "momentum_buffer" in opt.state[p]:
            opt.state[p]["momentum_buffer"] = mapped(opt.state[p]["momentum_buffer"])
    return step


class _FastsgdSmallPages(fastsgd.SGD):
    """fastsgd.SGD over 4 KiB pages, as a bound of fastsgd.torch.SGD."""


def _reference_step(workload, threads, model):
    if threads != 1 or workload.master_weights or workload.torch:
        return None
    copied = Model([v.copy() for v in model.values], [g.copy() for g in model.grads])
    return _fastsgd_step(workload, 1, copied, reference.SGD)


def _roofline_step(workload, threads, model, read_objects=False):
    if workload.torch:
        return None  # its arrays are numpy's; the torch workloads compare torch's peers
    fastsgd.set_num_threads(threads)
    opt = model.fastsgd_optimizer
    if workload.master_weights:
        if opt is None or read_objects:
            return None
        params = opt.param_groups[0]["params"]
        return _native.Roofline(params, model.grads,
                                [opt.state[p]["momentum_buffer"] for p in params],
                                masters=[opt.state[p]["master_param"] for p in params])
    if opt is not None:
        params = opt.param_groups[0]["params"]
        buffers = [opt.state[p]["momentum_buffer"] for p in params] if opt.state else []
    else:
        params = [fastsgd.Parameter(v) for v in model.values]
        for p, g in zip(params, model.grads):
            p.grad = g
        buffers = [np.zeros_like(v) for v in model.values] if workload.options["momentum"] else []
    return _native.Roofline(params, model.grads, buffers, read_objects)


def _objects_roofline_step(workload, threads, model):
    return _roofline_step(workload, threads, model, read_objects=True)


def _to_torch(torch, array):
    """A torch tensor holding a copy of array (16-bit ones through int16)."""
    if array.dtype.itemsize == 2 and array.dtype != np.int16:
        torch_dtype = torch.float16 if array.dtype == np.float16 else torch.bfloat16
        return torch.from_numpy(array.view(np.int16).copy()).view(torch_dtype)
    return torch.from_numpy(array.copy())


def _torch_step(mode):
    def setup(workload, threads, model):
        try:
            import torch
        except ImportError:
            return None
        half = _dtype(workload.dtype).itemsize == 2
        if workload.master_weights or (half and mode == "fused"):
            return None  # torch 2.13's fused SGD does not write 16-bit params
        if mode == "floor" and not workload.torch:
            return None  # the floor bounds fastsgd.torch.SGD, which the torch workloads time
        torch.set_num_threads(threads)
        params = [torch.nn.Parameter(_to_torch(torch, v)) for v in model.values]
        grads = [_to_torch(torch, g) for g in model.grads]
        for p, g in zip(params, grads):
            p.grad = g
        opt: torch.optim.Optimizer
        step: Callable[[], object]
        if mode == "floor":
            step = _native.TorchApiFloor(params, torch.autograd.graph.increment_version)
        else:
            if mode == "fastsgd.torch":
                from fastsgd.torch import SGD as TorchAdapterSGD
                fastsgd.set_num_threads(threads)
                opt = model.torch_optimizer = TorchAdapterSGD(params, **workload.options)
            else:
                implementation = {mode: True} if mode else {"foreach": False}
                opt = torch.optim.SGD(params, **workload.options, **implementation)
            step = opt.step
        step()
        if not workload.new_grads:
            return step
        # two sets of the same values, taken in turns: each sample's grads
        # are new tensors, its work the same
        sets = [grads, [g.clone() for g in grads]]

        def new_grads():
            sets.reverse()
            for p, g in zip(params, sets[0]):
                p.grad = g
        return _WithNewGrads(step, new_grads)
    return setup


class _WithNewGrads:
    """A peer's step, and what gives it new grads before each sample."""

    def __init__(self, step, before_sample):
        self.step = step
        self.before_sample = before_sample

    def __call__(self):
        self.step()


def _torch_chain_step(workload, threads, model):
    """torch doing a master-weights step: float32 params and grads (the
    16-bit grads converted), GradScaler("cpu") with fused SGD, which unscales
    and checks within its step, then the 16-bit params copied from them."""
    if not workload.master_weights:
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    halves = [_to_torch(torch, v) for v in model.values]
    params = [torch.nn.Parameter(h.float()) for h in halves]
    for p, g in zip(params, model.grads):
        p.grad = _to_torch(torch, g).float()
    opt = torch.optim.SGD(params, **workload.options, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1 << 30)
    scaler.scale(torch.ones(()))
    masters = [p.detach() for p in params]

    def step():
        scaler.step(opt)
        scaler.update()
        torch._foreach_copy_(halves, masters)
    step()
    step.halves = halves  # type: ignore[attr-defined]  # for tests
    return step


PEERS = {
    "fastsgd": _fastsgd_step,
    "roofline": _roofline_step,
    "roofline reading objects": _objects_roofline_step,
    "torch for-loop": _torch_step(None),
    "torch foreach": _torch_step("foreach"),
    "torch fused": _torch_step("fused"),
    "reference": _reference_step,
    "fastsgd f32": _fastsgd_float32_step,
    "torch chain": _torch_chain_step,
    "fastsgd on numpy": _fastsgd_numpy_step,
    "fastsgd on 4 KiB pages": _fastsgd_small_pages_step,
    "fastsgd on numpy in torch's step": _fastsgd_numpy_in_torch_step,
    "torch API floor": _torch_step("floor"),
}


def _calls_per_sample(step):
    """Calls to time at once so that one sample lasts at least 1 ms."""
    start = time.perf_counter()
    step()
    return max(1, int(1e-3 / max(time.perf_counter() - start, 1e-9))), time.perf_counter() - start


def last_level_cache_bytes():
    """The size of the CPU's largest cache (Linux sysfs), else 64 MiB."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=64 << 20)


class CacheFlush:
    """Streams an array twice the size of the last-level cache.  Called
    before each sample, it gives every peer the same start: its arrays and
    Python objects out of cache, as after a forward and backward pass.
    Without it, a peer that runs right after another touching the same
    memory (the roofline after fastsgd) would start warmer than the rest."""

    def __init__(self, nbytes=None):
        self.array = np.zeros((nbytes or 2 * last_level_cache_bytes()) // 8)

    def __call__(self):
        np.add(self.array, 1.0, out=self.array)


def cpu_ticks():
    """(steal, total) CPU time so far, in ticks, from Linux's /proc/stat, or
    None.  Steal is time this virtual machine was ready to run but the host
    ran something else: a run with much of it timed the host's other work
    as well."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(x) for x in fields[1:9]]  # user ... steal (guest is inside user)
    except (OSError, ValueError):
        return None
    return (ticks[7], sum(ticks)) if fields[:1] == ["cpu"] and len(ticks) == 8 else None


def steal_share(before, after):
    """The share of CPU time the host stole between two cpu_ticks(), or None."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _use_threads(threads):
    """Set the thread count of fastsgd and, once imported, torch."""
    fastsgd.set_num_threads(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def measure_together(steps, budget_s, min_rounds=15, max_rounds=200, before_sample=None,
                     back_to_back=()):
    """Seconds per call of each step, one sample per round, sampled in turns.

    The machine's speed drifts (other tenants, memory bandwidth, clocks), so
    the peers are timed in rounds, one sample each per round, and every
    ratio compares samples taken side by side.  Each round takes the steps
    in a new order (seeded, so a run repeats it), so that no step always
    runs right after the same one: rounds that only started one step
    further on kept each step after the same one in all but one round in
    len(steps) (fastsgd at 1 thread after torch fused at 2), and one
    comparison on W3 hinted that a step right after torch fused runs a few
    percent slower.  A round slower than the budget still runs min_rounds
    times: with 5, W3's medians moved fastsgd's share of the roofline by
    several points between runs on this VM; with 9, W3's two rooflines (the
    same stream but for reading 3 objects) came out 6% apart in one run.  A
    round of the largest workloads takes about a second (the numpy
    reference, measured alone, takes longer), so the steps listed (by index)
    in back_to_back run one after another within each round, in a new order
    too: their ratios then compare samples tens of milliseconds apart.
    before_sample(k), if given, runs untimed before every sample of steps[k]
    (and before the call that sizes its batch)."""
    def sized(k):
        if before_sample is not None:
            before_sample(k)
        return _calls_per_sample(steps[k])

    batches, firsts = zip(*(sized(k) for k in range(len(steps))))
    per_round = sum(b * f for b, f in zip(batches, firsts))
    rounds = int(min(max_rounds, max(min_rounds, budget_s * len(steps) / max(per_round, 1e-9))))
    samples: list[list[float]] = [[] for _ in steps]
    block = list(back_to_back)
    units = [block] * bool(block) + [[k] for k in range(len(steps)) if k not in block]
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(block)
        shuffle(units)
        for i in (k for unit in units for k in unit):
            step, batch = steps[i], batches[i]
            if before_sample is not None:
                before_sample(i)
            start = time.perf_counter()
            for _ in range(batch):
                step()
            samples[i].append((time.perf_counter() - start) / batch)
    return samples


# Peers of the 16-bit and torch workloads only: the table has their columns only then.
_HALF_PEERS = ("fastsgd f32", "torch chain", "fastsgd on numpy", "fastsgd on 4 KiB pages",
               "fastsgd on numpy in torch's step", "torch API floor")
# Takes seconds per step on the large workloads: a few samples, on its own.
_SLOW_PEERS = ("reference",)
# The peers of the targets' ratios (and both thread counts of each): sampled
# back to back in each round, apart from torch's slower for-loop and foreach.
_BACK_TO_BACK_PEERS = ("fastsgd", "roofline", "roofline reading objects", "torch fused",
                       "fastsgd f32", "torch chain", "fastsgd on numpy", "fastsgd on 4 KiB pages",
                       "fastsgd on numpy in torch's step", "torch API floor")
# Rounds of those peers alone after the rounds of all: back to back, their
# per-round ratios still scatter widely on this VM (fastsgd vs the roofline
# on W3 at 1 thread from 0.34 to 2.12 within one run's 15 rounds, whose
# median then read 93%; three runs of 80 rounds of the three peers alone
# read 99.2-99.7%), and torch's for-loop and foreach make a round of all
# peers take over a second.
_TARGET_ROUNDS = 30


def _nothing():
    pass


def _measure_samples(samples, steps, flush, budget_s, **kwargs):
    """measure_together over samples, (peer, threads) pairs of steps (a
    workload's steps by peer), each sample at its thread count and from its
    cache state: flushed by flush(), or warm (flush None) from a step of the
    same peer just before."""
    def before_sample(i):
        peer, t = samples[i]
        _use_threads(t)
        getattr(steps[peer], "before_sample", _nothing)()
        if flush is not None:
            flush()
        else:  # what the peer's own previous step leaves in cache
            steps[peer]()
    return measure_together([steps[p] for p, _ in samples], budget_s,
                            before_sample=before_sample, **kwargs)


def run(workloads=None, threads=(1, 2), peers=None, budget_s=0.5, progress=sys.stderr,
        cache=None):
    """Measure every (workload, thread count, peer); returns the result rows.
    A workload's thread counts are sampled in the same rounds, so that the
    ratio of 2 threads to 1 compares samples taken side by side too (across
    groups run minutes apart, this VM's drift moved W2's roofline from 1.1x
    to 2.4x).  cache, if given, is the state every sample starts from
    ("cold" or "warm") instead of each workload's own."""
    workloads = [w for w in WORKLOADS if (workloads is None or w.name in workloads)
                 and _dtype(w.dtype) is not None]  # bfloat16 needs ml_dtypes
    peers = list(PEERS) if peers is None else peers
    flush = None  # made when first needed: it holds twice the last-level cache
    results = []
    saved_threads = fastsgd.get_num_threads()
    # torch's thread count sets the order of its reductions: left changed, it
    # made test_clip_grad's comparisons with torch fail after test_bench's runs.
    torch = sys.modules.get("torch")
    saved_torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        for k, workload in enumerate(workloads, 1):
            state = cache or workload.cache
            if state == "cold" and flush is None:
                flush = CacheFlush()
            model = Model(*_model(workload))
            ticks = cpu_ticks()
            steps = {p: PEERS[p](workload, min(threads), model) for p in peers}
            # the slow peers (1 thread only: their setup refuses more) take a
            # few samples on their own
            together = [(p, t) for p, step in steps.items() if step is not None
                        and p not in _SLOW_PEERS for t in threads]
            alone = [(p, min(threads)) for p, step in steps.items() if step is not None
                     and p in _SLOW_PEERS]

            sampling = (steps, flush if state == "cold" else None, budget_s)
            targets = [i for i, (p, _) in enumerate(together) if p in _BACK_TO_BACK_PEERS]
            rounds = dict(zip(together, _measure_samples(together, *sampling,
                                                         back_to_back=targets)))
            if targets:
                more = _measure_samples([together[i] for i in targets], *sampling,
                                        back_to_back=range(len(targets)),
                                        min_rounds=_TARGET_ROUNDS, max_rounds=_TARGET_ROUNDS)
                for i, times in zip(targets, more):
                    rounds[together[i]] += times
            seconds = {sample: statistics.median(times) for sample, times in rounds.items()}
            for sample in alone:
                seconds[sample] = statistics.median(
                    _measure_samples([sample], *sampling, min_rounds=3)[0])
            del steps, model
            steal = steal_share(ticks, cpu_ticks())
            for (p, t), sec in sorted(seconds.items(), key=lambda item: item[0][1]):
                results.append({"workload": workload.name, "peer": p, "threads": t, "cache": state,
                                "seconds": sec, "gb_per_s": workload.bytes_per_step / sec / 1e9,
                                "host_steal": steal, "rounds": rounds.get((p, t))})
            if progress:
                summary = "; ".join(
                    f"{t}T: " + ", ".join(f"{p} {_format_time(sec)}"
                                          for (p, u), sec in seconds.items() if u == t)
                    for t in threads)
                if steal is not None:
                    summary += f" (host steal {100 * steal:.0f}%)"
                print(f"[{k}/{len(workloads)}] {workload.name} {summary}", file=progress,
                      flush=True)
    finally:
        fastsgd.set_num_threads(saved_threads)
        if torch is not None:
            torch.set_num_threads(saved_torch_threads)
    return results


def _format_time(seconds):
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} us"


class _Paired:
    """A run's times by (workload, peer, threads), combined per round: a
    function of several times is the median of its values over the rounds
    when they were sampled in the same rounds (the run's "rounds" lists),
    so that drift between rounds cancels, else its value at the medians
    (the numpy reference, sampled alone; results without rounds).  The
    targets' peers have more rounds than the others, after the ones all
    peers share: zip pairs the shared ones."""

    def __init__(self, results):
        self.rows = {(r["workload"], r["peer"], r["threads"]): r for r in results}

    def __call__(self, f, *keys):
        """f of the times of keys, or None if one is missing."""
        rows = [self.rows[key] for key in keys if key in self.rows]
        if len(rows) < len(keys):
            return None
        rounds = [row.get("rounds") for row in rows]
        if all(rounds):
            return statistics.median(f(*times) for times in zip(*rounds))
        return f(*(row["seconds"] for row in rows))

    def ratio(self, top, bottom):
        return self(operator.truediv, top, bottom)


def table(results, columns=None):
    """The results as a markdown table: fastsgd's time, bandwidth and its
    ratio to each peer (peer time / fastsgd time; > 1 means fastsgd is faster),
    and the share of each roofline it reaches; ratios as _Paired takes them.
    columns, if given, names the columns to keep (by their header)."""
    paired = _Paired(results)
    rooflines = [p for p in PEERS if p.startswith("roofline")]
    peers = [p for p in PEERS if p != "fastsgd" and p not in rooflines
             and (p not in _HALF_PEERS or any(r["peer"] == p for r in results))]
    header = (["workload", "threads", "fastsgd", "GB/s"] + [f"% of {p}" for p in rooflines]
              + [f"x vs {p}" for p in peers])
    kept = [i for i, name in enumerate(header) if columns is None or name in columns]
    lines = ["| " + " | ".join(header[i] for i in kept) + " |", "|" + "---|" * len(kept)]
    described = {w.name: w for w in WORKLOADS}
    for r in results:
        if r["peer"] != "fastsgd":
            continue
        w, t, mine = r["workload"], r["threads"], (r["workload"], "fastsgd", r["threads"])
        cells = [f"{w} {described[w].description}", str(t), _format_time(r["seconds"]),
                 f"{r['gb_per_s']:.1f}"]
        for p in rooflines:
            share = paired.ratio((w, p, t), mine)
            cells.append(f"{100 * share:.0f}%" if share else "-")
        for p in peers:
            other = paired.ratio((w, p, t), mine) or (
                paired.ratio((w, p, 1), mine) if p == "reference" else None)
            cells.append(f"{other:.2f}" if other else "-")
        lines.append("| " + " | ".join(cells[i] for i in kept) + " |")
    return "\n".join(lines)


def limits_table(results):
    """What the memory bus allows, from the same run: how much faster 2
    threads are than 1 for fastsgd and for the roofline, and how much faster
    the roofline is than torch fused, also when it reads the objects as a
    step must, and than torch's for-loop (no step with the same traffic can
    beat these ratios by much).  Empty unless the run has 1 and 2 threads.

    "at best" bounds fastsgd's own scaling: a step checks every tensor
    before it writes any, so its work beyond the least a step must do (the
    roofline reading objects, else the plain one: its 1-thread time minus
    that roofline's) cannot overlap the streaming.  Even split perfectly over
    2 threads, that work leaves fastsgd at best
    1-thread time / (that roofline's 2-thread time + half that work).
    Ratios as _Paired takes them."""
    paired = _Paired(results)
    lines = ["| workload | fastsgd, 2 threads vs 1 | fastsgd, 2 threads vs 1, at best "
             "| roofline, 2 threads vs 1 "
             "| roofline vs torch fused, 1 thread | roofline vs torch fused, 2 threads "
             "| roofline reading objects vs torch fused, 1 thread "
             "| roofline reading objects vs torch fused, 2 threads "
             "| roofline vs torch for-loop, 1 thread | roofline vs torch for-loop, 2 threads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in WORKLOADS:
        one, two = (w.name, "fastsgd", 1), (w.name, "fastsgd", 2)
        scaling, roof_scaling = paired.ratio(one, two), paired.ratio((w.name, "roofline", 1),
                                                                     (w.name, "roofline", 2))
        if not (scaling and roof_scaling):
            continue
        floor = ("roofline reading objects" if all(
            (w.name, "roofline reading objects", t) in paired.rows for t in (1, 2)) else "roofline")
        at_best = paired(lambda one, floor1, floor2: one / (floor2 + max(one - floor1, 0.0) / 2),
                         one, (w.name, floor, 1), (w.name, floor, 2))
        cells = [w.name, f"{scaling:.2f}", f"{at_best:.2f}", f"{roof_scaling:.2f}"]
        for torch_peer, roofline in (("torch fused", "roofline"),
                                     ("torch fused", "roofline reading objects"),
                                     ("torch for-loop", "roofline")):
            for t in (1, 2):
                theirs = paired.ratio((w.name, torch_peer, t), (w.name, roofline, t))
                cells.append(f"{theirs:.2f}" if theirs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(results, path):
    """A PNG of each peer's time per step (log scale) and share of the
    roofline, per workload and thread count.  Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["workload"], r["threads"]) for r in results})
    peers = [p for p in PEERS if any(r["peer"] == p for r in results)]
    seconds = {(r["workload"], r["threads"], r["peer"]): r["seconds"] for r in results}
    fig, (ax_time, ax_roof) = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(cases)), 8))
    width = 0.8 / len(peers)
    positions = np.arange(len(cases))
    for k, peer in enumerate(peers):
        times = [seconds.get((w, t, peer), np.nan) for w, t in cases]
        roof = [100 * seconds.get((w, t, "roofline"), np.nan) / s for (w, t), s in zip(cases, times)]
        ax_time.bar(positions + k * width, times, width, label=peer)
        ax_roof.bar(positions + k * width, roof, width, label=peer)
    labels = [f"{w} {t}T" for w, t in cases]
    ax_time.set(yscale="log", ylabel="seconds per step", title="time per step (lower is better)")
    ax_roof.set(ylabel="% of roofline", title="share of the memory roofline (higher is better)")
    ax_roof.axhline(100, color="black", linewidth=0.8)
    for ax in (ax_time, ax_roof):
        ax.set_xticks(positions + 0.4 - width / 2, labels)
    fig.legend(*ax_time.get_legend_handles_labels(), loc="upper center", ncol=len(peers))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine():
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
            "fastsgd": fastsgd.__version__, "kernel": fastsgd.cpu_capability(),
            "openmp": fastsgd.has_openmp(), "machine": platform.machine(),
            "processor": platform.processor()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        info["torch"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main(workloads=None, threads=(1, 2), budget_s=0.5, json_path="fastsgd-bench.json",
         peers=None, png_path=None, cache=None, label=""):
    info = machine()
    # what was run and when, so that the tables generated from the JSON
    # (python -m fastsgd report) can say it
    settings = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "label": label, "workloads": workloads or [w.name for w in WORKLOADS],
                "threads": list(threads), "peers": peers or list(PEERS),
                "budget_s": budget_s, "cache": cache}
    print(f"fastsgd bench: kernel {info['kernel']}, torch {info['torch'] or 'not installed'}, "
          f"{info.get('cpu', info['machine'])}", flush=True)
    if info["torch"] is None:
        print("torch is not installed: the torch peers are skipped "
              "(pip install 'fastsgd[bench]' to compare)", flush=True)
    results = run(workloads, threads, peers, budget_s=budget_s, cache=cache)
    print()
    print(table(results))
    limits = limits_table(results)
    if limits:
        print()
        print(limits)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": info, "run": settings, "results": results}, f, indent=1)
        print(f"\nwrote {json_path}")
    if png_path:
        plot(results, png_path)
        print(f"wrote {png_path}")
    return 0


def traced_memory(call, times):
    """(bytes kept, bytes peaked above the start) over ``times`` calls of
    ``call``, as tracemalloc sees them.  Its own bookkeeping shows too:
    compare with ``times=0``."""
    calls = itertools.repeat(None, times)  # made before tracing; yields no new objects
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        for _ in calls:
            call()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current - start, peak - start
