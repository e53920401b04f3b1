"""The ranks' side of tests/test_distributed.py, and the runs it compares them with.

    mpiexec -n N python -m mpi4py distributed_worker.py OUT SPEC.json

SPEC holds a list of jobs; every rank runs each in turn and saves what it
ends with to OUT/<job name>.rank<r>.npz (or .json).  The test imports this
file too (it imports mpi4py only in main) to train the same model in one
process with fastsgd.SGD on fastsgd.reference.rank_ordered_mean's averages
and compares.  Grads are a function of (seed, step, rank, parameter), so any
number of ranks can be replayed in one process.
"""
import json
import os
import signal
import sys

import numpy as np

import fastsgd
from fastsgd import lr_scheduler

# A small model: two groups (float32, float64), a Fortran-ordered matrix, a
# 0-d parameter, and options that exercise every term of the step.
DEFAULT_GROUPS = [
    {"shapes": [[7, 5], [5], [3, 4, 2], [300]], "dtype": "float32", "fortran": [0],
     "options": {}},
    {"shapes": [[6, 6], [], [50]], "dtype": "float64", "fortran": [],
     "options": {"lr": 0.05, "nesterov": True, "momentum": 0.8}},
]
DEFAULT_OPTIONS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def groups_of(job):
    return job.get("groups", DEFAULT_GROUPS)


def make_params(job):
    """The model's parameters, the same on every rank and in the test."""
    if any(group["dtype"] == "bfloat16" for group in groups_of(job)):
        import ml_dtypes  # noqa: F401 -- registers the dtype name "bfloat16"
    rng = np.random.default_rng(job.get("seed", 0))
    params = []
    for group in groups_of(job):
        for index, shape in enumerate(group["shapes"]):
            values = rng.standard_normal(shape).astype(group["dtype"])
            if index in group["fortran"]:
                values = np.asfortranarray(values)
            params.append(fastsgd.Parameter(values))
    return params


def param_groups(job, params):
    groups, start = [], 0
    for group in groups_of(job):
        count = len(group["shapes"])
        groups.append({"params": params[start:start + count], **group["options"]})
        start += count
    return groups


def grad(job, step, rank, index, param):
    """Rank ``rank``'s grad of params[index] at ``step``, in its memory order."""
    rng = np.random.default_rng([job.get("seed", 0), step, rank, index])
    values = np.asarray(rng.standard_normal(param.shape) * 10.0 ** rng.integers(-3, 3), param.dtype)
    return np.asfortranarray(values) if param.flags.f_contiguous and param.ndim > 1 else values


def has_grad(job, step, index):
    """False where the job leaves params[index] without a grad on every rank."""
    return [step, index] not in job.get("none", [])


def schedule(job, optimizer):
    return lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5) if job.get("scheduler") else None


LATE_AT = 2  # the step at which a "late_group" job adds its last group


def reference(job, world_sizes):
    """One process: fastsgd.SGD on the rank-ordered averages.

    ``world_sizes[step]`` is the number of ranks whose grads step ``step``
    averages.  Returns (params, optimizer, clip totals).
    """
    params = make_params(job)
    groups = param_groups(job, params)
    late = groups.pop() if job.get("late_group") else None
    optimizer = fastsgd.SGD(groups, **job.get("options", DEFAULT_OPTIONS))
    scheduler = schedule(job, optimizer)
    totals = []
    for step, ranks in enumerate(world_sizes):
        if late and step == LATE_AT:
            optimizer.add_param_group(late)
        for index, p in enumerate(params):
            p.grad = fastsgd.reference.rank_ordered_mean(
                [grad(job, step, r, index, p) for r in range(ranks)]) \
                if has_grad(job, step, index) else None
        if job.get("clip"):
            totals.append(fastsgd.clip_grad_norm_(params, job["clip"]))
        optimizer.step()
        if scheduler:
            scheduler.step()
    return params, optimizer, totals


# ------------------------------------------------------------ on the ranks

def train(job, comm, dist):
    """Train data-parallel as ``job`` says; what this rank ends with."""
    params = make_params(job)
    groups = param_groups(job, params)
    late = groups.pop() if job.get("late_group") else None
    options = job.get("options", DEFAULT_OPTIONS)
    if job.get("zero"):
        optimizer = dist.ZeroRedundancyOptimizer(
            groups, fastsgd.SGD, bucket_cap_mb=job.get("bucket_cap_mb", 25),
            gradient_as_bucket_view=job.get("views", False), **options)
    else:
        optimizer = dist.DistributedOptimizer(
            fastsgd.SGD(groups, **options), job.get("bucket_cap_mb", 25),
            job.get("reduction", "ordered"), gradient_as_bucket_view=job.get("views", False))
    scheduler = schedule(job, optimizer)
    first = 0
    if job.get("resume"):
        saved = dist.load(job["resume"], root=0 if job.get("root_reads") else None)
        for p, value in zip(params, saved["params"]):
            p[...] = value
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler:
            scheduler.load_state_dict(saved["scheduler"])
        first = saved["step"]
    totals, copied = [], []
    for step in range(first, job["steps"]):
        if step == job.get("save_at"):
            save(job, comm, dist, params, optimizer, scheduler, step)
        if late and step == LATE_AT:
            # "inner": behind the wrapper's back, which notices at the next step
            adder = optimizer.optimizer if job["late_group"] == "inner" else optimizer
            adder.add_param_group(late)
        for index, p in enumerate(params):
            if not has_grad(job, step, index):
                p.grad = None
            elif job.get("views") and p.grad is not None:
                p.grad[...] = grad(job, step, comm.rank, index, p)  # a backward writing in place
            else:
                p.grad = grad(job, step, comm.rank, index, p)
        if job.get("clip"):
            totals.append(dist.clip_grad_norm_(optimizer, job["clip"]))
            copied.append(optimizer.grads_copied)
            optimizer.step()
        else:
            optimizer.step(lambda: None)  # the closure form
            copied.append(optimizer.grads_copied)
        if scheduler:
            scheduler.step()
        optimizer.zero_grad()
    result = {f"p{i}": np.asarray(p) for i, p in enumerate(params)}
    result["totals"] = np.array(totals)
    result["copied"] = np.array(copied)
    if job.get("zero"):
        optimizer.consolidate_state_dict(to=0)
        state = optimizer.state_dict() if comm.rank == 0 else None
        result["state_bytes"] = np.array(sum(
            buffer.nbytes for entry in optimizer.state.values() for buffer in entry.values()))
    else:
        state = optimizer.state_dict()
    if state is not None:
        for index, entry in state["state"].items():
            result[f"b{index}"] = entry["momentum_buffer"]
        result["lrs"] = np.array([group["lr"] for group in state["param_groups"]])
    if job.get("final"):
        dist.save({"optimizer": state}, job["final"])
    return result


def save(job, comm, dist, params, optimizer, scheduler, step):
    if job.get("zero"):
        optimizer.consolidate_state_dict(to=0)
    state = optimizer.state_dict() if comm.rank == 0 or not job.get("zero") else None
    dist.save({"params": list(params), "optimizer": state, "step": step,
               "scheduler": scheduler.state_dict() if scheduler else None}, job["save"])


def errors(job, comm, dist):
    """Each case gives the ranks different inputs; the message each rank raised."""
    rank, last = comm.rank, comm.size - 1
    rng = np.random.default_rng(0)
    results = {}

    def params(shapes, dtype=np.float32, fortran=()):
        made = []
        for i, shape in enumerate(shapes):
            values = rng.standard_normal(shape).astype(dtype)
            made.append(fastsgd.Parameter(np.asfortranarray(values) if i in fortran else values))
        return made

    def attempt(name, action):
        try:
            action()
        except Exception as error:  # noqa: BLE001 -- the test reads every rank's
            results[name] = [type(error).__name__, str(error)]
        else:
            results[name] = None

    shapes = [(4,), (3, 2), (256, 1152), (5,)]
    transposed = [(4,), (3, 2), (1152, 256) if rank == last else (256, 1152), (5,)]
    attempt("transposed", lambda: dist.DistributedOptimizer(fastsgd.SGD(params(transposed))))
    attempt("dtype", lambda: dist.DistributedOptimizer(fastsgd.SGD(
        params(shapes[:2]) + params(shapes[2:3], np.float64 if rank == 1 else np.float32))))
    attempt("fortran", lambda: dist.ZeroRedundancyOptimizer(
        params(shapes, fortran=(1,) if rank == last else ())))
    attempt("count", lambda: dist.DistributedOptimizer(fastsgd.SGD(
        params(shapes[:3] if rank == 1 else shapes))))
    attempt("lr", lambda: dist.DistributedOptimizer(fastsgd.SGD(
        params(shapes), lr=0.1 if rank != last else 0.2)))
    attempt("bucket_cap_mb", lambda: dist.DistributedOptimizer(
        fastsgd.SGD(params(shapes)), bucket_cap_mb=25 if rank == 0 else 1))
    attempt("not an optimizer", lambda: dist.DistributedOptimizer(
        fastsgd.SGD(params(shapes)) if rank == 0 else "SGD"))
    attempt("broadcast", lambda: dist.broadcast_parameters(params(transposed)))
    attempt("zero duplicate", lambda: dist.ZeroRedundancyOptimizer(params(shapes) * 2))
    attempt("comm", lambda: dist.DistributedOptimizer(fastsgd.SGD(params(shapes)), comm="world"))
    attempt("mpi reduction of float16", lambda: dist.DistributedOptimizer(
        fastsgd.SGD(params(shapes, np.float16)), reduction="mpi"))

    def change_params(zero, on_ranks):
        model = params(shapes)
        optimizer = dist.ZeroRedundancyOptimizer(model) if zero else \
            dist.DistributedOptimizer(fastsgd.SGD(model))
        if rank in on_ranks:
            optimizer.param_groups[0]["params"].append(params([(2,)])[0])
        for p in optimizer.param_groups[0]["params"]:
            p.grad = np.ones(p.shape, p.dtype)
        optimizer.step()

    attempt("params changed on one rank", lambda: change_params(False, [1]))
    attempt("zero params changed", lambda: change_params(True, range(comm.size)))

    def closed():
        optimizer = dist.DistributedOptimizer(fastsgd.SGD(params(shapes)))
        optimizer.close()
        optimizer.step()

    attempt("closed", closed)
    attempt("pickle", lambda: __import__("pickle").dumps(
        dist.DistributedOptimizer(fastsgd.SGD(params(shapes)))))

    # Per step: the optimizer is left usable and the parameters untouched.
    model = params(shapes)
    for kind in ("replicated", "zero"):
        optimizer = dist.ZeroRedundancyOptimizer(model, lr=0.1) if kind == "zero" else \
            dist.DistributedOptimizer(fastsgd.SGD(model, lr=0.1))
        step_errors(kind, optimizer, model, rank, last, attempt, results)
        optimizer.close()
    return results


def step_errors(kind, optimizer, model, rank, last, attempt, results):
    """The cases that differ at a step; ``results[f"{kind} ..."]``."""
    before = [np.array(p) for p in model]

    def step(grads):
        # Written to the raw slot: p.grad = g would refuse a wrong grad on its
        # rank alone; the step's check, which every rank must agree on, is for
        # a grad changed after assignment.
        for p, g in zip(model, grads):
            fastsgd.Parameter._grad.__set__(p, g)
        optimizer.step()

    def replaced(index, grad, on_rank):
        grads = [np.ones(p.shape, p.dtype) for p in model]
        if rank == on_rank:
            grads[index] = grad
        return grads

    attempt(f"{kind} missing grad", lambda: step(replaced(1, None, 1)))
    attempt(f"{kind} wrong grad", lambda: step(replaced(2, np.ones(3, np.float32), last)))
    attempt(f"{kind} wrong dtype", lambda: step(replaced(0, np.ones(4, np.float64), 1)))
    plateau = lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
    plateau.step(1.0)
    plateau.step(2.0 if rank == 1 else 0.5)  # a metric of this rank's data
    attempt(f"{kind} plateau", lambda: step(replaced(0, None, -1)))
    results[f"{kind} untouched"] = all(np.array_equal(a, b) for a, b in zip(model, before))
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    inner = optimizer.optim if kind == "zero" else optimizer.optimizer

    def fail_on_the_last_rank(*args):
        if rank == last:
            raise KeyError("a hook of the last rank")

    handle = inner.register_step_pre_hook(fail_on_the_last_rank)
    attempt(f"{kind} step raises on one rank", lambda: step(replaced(0, None, -1)))
    handle.remove()
    attempt(f"{kind} usable again", lambda: step(replaced(0, None, -1)))


def allocations(job, comm, dist):
    """tracemalloc over steady-state steps: (kept, peak) against a loop of none."""
    from fastsgd.bench import traced_memory

    params = [fastsgd.Parameter(np.ones(n, np.float32)) for n in (3, 1000, 70_000)] + \
        [fastsgd.Parameter(np.ones((20, 30)))]
    optimizer = dist.DistributedOptimizer(fastsgd.SGD(params, lr=0.01, momentum=0.9),
                                          bucket_cap_mb=0.1, gradient_as_bucket_view=True)
    for _ in range(3):
        optimizer.step()
    comm.Barrier()
    steps = traced_memory(optimizer.step, 200)
    comm.Barrier()
    return {"steps": steps, "none": traced_memory(optimizer.step, 0),
            "copied": optimizer.grads_copied}


def fail(job, comm, dist):
    """Train, and on the last rank die at step 3 as ``job['how']`` says."""
    params = make_params(job)
    optimizer = dist.DistributedOptimizer(fastsgd.SGD(param_groups(job, params), lr=0.1))
    for step in range(6):
        if step == 3 and comm.rank == comm.size - 1:
            print("failing", flush=True)
            if job["how"] == "raise":
                raise RuntimeError("this rank's data loader broke")
            if job["how"] == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        for index, p in enumerate(params):
            p.grad = grad(job, step, comm.rank, index, p)
        optimizer.step()
    return {}


def broadcast(job, comm, dist):
    """Every rank starts from different values and momentum; after the
    broadcasts all hold the root's."""
    rng = np.random.default_rng(comm.rank)
    params = [fastsgd.Parameter(rng.standard_normal(s).astype(np.float32)) for s in
              [(3, 4), (5,)]]
    params.append(fastsgd.Parameter(np.asfortranarray(rng.standard_normal((4, 3)))))
    optimizer = fastsgd.SGD(params, lr=0.1 + comm.rank, momentum=0.9)
    for p in params:
        p.grad = np.empty_like(p, subok=False)
        p.grad[...] = rng.standard_normal(p.shape)
    optimizer.step()  # each rank's own step: their buffers differ
    root = comm.size - 1
    dist.broadcast_parameters({f"p{i}": p for i, p in enumerate(params)}, root=root)
    dist.broadcast_optimizer_state(optimizer, root=root)
    result = {f"p{i}": np.asarray(p) for i, p in enumerate(params)}
    for i, p in enumerate(params):
        result[f"b{i}"] = optimizer.state[p]["momentum_buffer"]
    result["lr"] = np.array(optimizer.param_groups[0]["lr"])
    return result


JOBS = {"train": train, "errors": errors, "allocations": allocations, "fail": fail,
        "broadcast": broadcast}


def main(out, spec):
    from mpi4py import MPI

    from fastsgd import distributed as dist

    comm = MPI.COMM_WORLD
    with open(spec) as file:
        jobs = json.load(file)
    for job in jobs:
        result = JOBS[job["kind"]](job, comm, dist)
        path = os.path.join(out, f"{job['name']}.rank{comm.rank}")
        if job["kind"] in ("errors", "allocations"):
            with open(path + ".json", "w") as file:
                json.dump(result, file)
        else:
            np.savez(path + ".npz", **result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
