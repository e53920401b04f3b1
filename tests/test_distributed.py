"""fastsgd.distributed under real `mpiexec -n 1..4` runs: bit-identical to one
process, errors raised on every rank, no hangs.

The ranks run tests/data/distributed_worker.py; the same file trains the
model here, in one process, with fastsgd.SGD on
fastsgd.reference.rank_ordered_mean's averages, and every parameter, momentum
buffer and clipping total must match it bit for bit.  Runs whose results
several tests read are launched once per module (several jobs per launch:
each launch costs about a second of interpreter start-up per rank).
"""
import importlib.util
import json
import pathlib
import re

import mpi_launch
import numpy as np
import pytest

import fastsgd
from fastsgd import report

mpi_launch.require_mpi()

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER_PATH = ROOT / "tests" / "data" / "distributed_worker.py"
_spec = importlib.util.spec_from_file_location("distributed_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

STEPS, SAVED_AT = 6, 3
TINY_BUCKETS = 0.0005  # MB: the default model's grads then span several buckets per dtype


def launch(directory, ranks, jobs, timeout=180):
    """Run ``jobs`` on ``ranks`` ranks; {job name: [each rank's result]}."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = directory / f"jobs{ranks}.json"
    spec.write_text(json.dumps(jobs))
    result = mpi_launch.run(ranks, WORKER_PATH, directory, spec, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    results = {}
    for job in jobs:
        name = job["name"]
        if job["kind"] in ("errors", "allocations"):
            results[name] = [json.loads((directory / f"{name}.rank{r}.json").read_text())
                             for r in range(ranks)]
        else:
            results[name] = [dict(np.load(directory / f"{name}.rank{r}.npz"))
                             for r in range(ranks)]
    return results


# float16 and bfloat16 grads travel as their bits; the ranks sum them in order.
HALF_GROUPS = [
    {"shapes": [[7, 5], [5], [300]], "dtype": "float16", "fortran": [0], "options": {}},
    {"shapes": [[6, 6], [50]], "dtype": "bfloat16", "fortran": [],
     "options": {"lr": 0.05, "nesterov": True, "momentum": 0.8}},
]
DEFAULT_OPTIONS = worker.DEFAULT_OPTIONS


def training_jobs(ranks, directory):
    """The configurations every world size trains."""
    common = {"kind": "train", "steps": STEPS, "none": [[1, 2], [2, 5], [4, 0]]}
    jobs = [
        {**common, "name": "replicated", "clip": 1.0, "scheduler": True,
         "bucket_cap_mb": TINY_BUCKETS, "save_at": SAVED_AT,
         "save": str(directory / "replicated.ckpt")},
        {**common, "name": "bucket views", "views": True},
        {**common, "name": "zero", "zero": True, "clip": 1.0, "scheduler": True,
         "bucket_cap_mb": TINY_BUCKETS, "save_at": SAVED_AT, "save": str(directory / "zero.ckpt"),
         "final": str(directory / "zero-final.ckpt")},
        {**common, "name": "zero views", "zero": True, "views": True},
        {**common, "name": "mpi", "reduction": "mpi", "none": []},
        {**common, "name": "late group", "late_group": "wrapper", "bucket_cap_mb": TINY_BUCKETS},
        {**common, "name": "late group inner", "late_group": "inner", "views": True},
        {**common, "name": "zero late group", "late_group": "wrapper", "zero": True,
         "bucket_cap_mb": TINY_BUCKETS},
        {**common, "name": "half", "groups": HALF_GROUPS, "clip": 1.0,
         "bucket_cap_mb": TINY_BUCKETS},
        {**common, "name": "zero half master weights", "groups": HALF_GROUPS, "zero": True,
         "options": {**DEFAULT_OPTIONS, "master_weights": True}, "views": True},
    ]
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The training runs at 1 to 4 ranks (and a broadcast at 3)."""
    base = tmp_path_factory.mktemp("distributed")
    results = {}
    for ranks in (1, 2, 3, 4):
        jobs = training_jobs(ranks, base / f"n{ranks}")
        if ranks == 3:
            jobs.append({"kind": "broadcast", "name": "broadcast"})
        if ranks == 2:
            jobs.append({"kind": "allocations", "name": "allocations"})
        results[ranks] = launch(base / f"n{ranks}", ranks, jobs)
    results["dir"] = base
    return results


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if "V" in (a.dtype.kind, b.dtype.kind):  # bfloat16; np.load gives it back as 2-byte voids
        return a.dtype.itemsize == b.dtype.itemsize == 2 and a.shape == b.shape \
            and a.tobytes() == b.tobytes()
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_one_process(job, world_sizes, results, state_ranks, first_step=0):
    """Every rank's parameters (and the given ranks' momentum buffers, lrs and
    clipping totals) equal one process's on the rank-ordered averages."""
    params, optimizer, totals = worker.reference(job, world_sizes)
    state = optimizer.state_dict()
    for rank, result in enumerate(results):
        for index, p in enumerate(params):
            assert same_bits(result[f"p{index}"], p), (job["name"], rank, index)
        if job.get("clip"):
            assert same_bits(result["totals"], np.array(totals[first_step:])), (job["name"], rank)
    for rank in state_ranks:
        buffers = {int(key[1:]) for key in results[rank] if key.startswith("b")}
        assert buffers == set(state["state"]), (job["name"], rank)
        for index, entry in state["state"].items():
            assert same_bits(results[rank][f"b{index}"], entry["momentum_buffer"]), \
                (job["name"], rank, index)
        assert same_bits(results[rank]["lrs"], [g["lr"] for g in state["param_groups"]])


def job_named(name, ranks, runs):
    return next(job for job in training_jobs(ranks, runs["dir"] / f"n{ranks}")
                if job["name"] == name)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["replicated", "bucket views", "zero", "zero views",
                                  "late group", "late group inner", "zero late group", "half",
                                  "zero half master weights"])
def test_bit_identical_to_one_process(runs, ranks, name):
    results = runs[ranks][name]
    zero = name.startswith("zero")
    assert_one_process(job_named(name, ranks, runs), [ranks] * STEPS, results,
                       state_ranks=[0] if zero else range(ranks))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_grads_are_copied_once_or_never(runs, ranks):
    job = job_named("replicated", ranks, runs)
    present = [sum(worker.has_grad(job, step, i) for i in range(7)) for step in range(STEPS)]
    for result in runs[ranks]["replicated"]:
        assert result["copied"].tolist() == present
    for result in runs[ranks]["bucket views"]:
        assert result["copied"].tolist() == [0] * STEPS


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_zero_shards_the_state(runs, ranks):
    job = job_named("zero", ranks, runs)
    _, optimizer, _ = worker.reference(job, [ranks] * STEPS)
    total = sum(entry["momentum_buffer"].nbytes for entry in optimizer.state.values())
    per_rank = [int(result["state_bytes"]) for result in runs[ranks]["zero"]]
    assert sum(per_rank) == total
    assert max(per_rank) < total or ranks == 1


def test_mpi_reduction_differs_from_one_process_at_4_ranks(runs):
    """The negative control: the ordered path is what the tests above test."""
    job = job_named("mpi", 4, runs)
    params, _, _ = worker.reference(job, [4] * STEPS)
    results = runs[4]["mpi"]
    assert not all(same_bits(results[0][f"p{i}"], p) for i, p in enumerate(params))
    for result in results[1:]:  # still the same on every rank
        assert all(same_bits(result[f"p{i}"], results[0][f"p{i}"]) for i in range(len(params)))
    assert_one_process(job, [2] * STEPS, runs[2]["mpi"], state_ranks=[0])  # one addition: exact


def test_consolidated_state_loads_into_one_process_sgd(runs):
    job = job_named("zero", 3, runs)
    params, optimizer, _ = worker.reference(job, [3] * STEPS)
    saved = fastsgd.load(runs["dir"] / "n3" / "zero-final.ckpt")["optimizer"]
    expected = optimizer.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    fresh = fastsgd.SGD(worker.param_groups(job, params), **worker.DEFAULT_OPTIONS)
    fresh.load_state_dict(saved)
    for p in params:
        assert same_bits(fresh.state[p]["momentum_buffer"], optimizer.state[p]["momentum_buffer"])


@pytest.mark.parametrize("zero", [False, True])
def test_checkpoint_resumes_in_one_process(runs, zero):
    """The checkpoint an N=2 run wrote at step 3, continued by plain fastsgd.SGD."""
    name = "zero" if zero else "replicated"
    job = job_named(name, 2, runs)
    saved = fastsgd.load(runs["dir"] / "n2" / f"{name}.ckpt")
    params = [fastsgd.Parameter(value) for value in saved["params"]]
    optimizer = fastsgd.SGD(worker.param_groups(job, params), **worker.DEFAULT_OPTIONS)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler = worker.schedule(job, optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    for step in range(saved["step"], STEPS):
        for index, p in enumerate(params):
            p.grad = fastsgd.reference.rank_ordered_mean(
                [worker.grad(job, step, r, index, p) for r in range(2)]) \
                if worker.has_grad(job, step, index) else None
        fastsgd.clip_grad_norm_(params, job["clip"])
        optimizer.step()
        scheduler.step()
    for index, p in enumerate(params):
        assert same_bits(p, runs[2][name][0][f"p{index}"])


@pytest.fixture(scope="module")
def resumed(runs):
    """Runs resumed from the checkpoints written at step 3: at the same number
    of ranks, 2 -> 3 (each kind from the other kind's checkpoint, read by one
    rank and sent to the others), and 4 -> 1."""
    base = runs["dir"]
    other = {"replicated": "zero", "zero": "replicated"}
    results = {}
    for ranks, source in ((2, 2), (3, 2), (1, 4)):
        jobs = []
        for name in ("replicated", "zero"):
            job = job_named(name, ranks, runs)
            for key in ("save_at", "save", "final"):
                job.pop(key, None)
            checkpoint = other[name] if ranks == 3 else name
            job.update(name=f"{name} resumed", root_reads=ranks == 3,
                       resume=str(base / f"n{source}" / f"{checkpoint}.ckpt"))
            jobs.append(job)
        results[ranks] = launch(base / f"resume{ranks}", ranks, jobs)
    return results


@pytest.mark.parametrize("ranks, source", [(2, 2), (3, 2), (1, 4)])
@pytest.mark.parametrize("name", ["replicated", "zero"])
def test_checkpoint_resumes_bit_identically(runs, resumed, ranks, source, name):
    """Both kinds train the same model with the same options, so a run
    resumed from either kind's checkpoint continues one process's run."""
    results = resumed[ranks][f"{name} resumed"]
    if source == ranks:  # as the run that was not interrupted
        for result in results:
            for key, value in runs[ranks][name][0].items():
                if key.startswith("p"):
                    assert same_bits(result[key], value)
    assert_one_process(job_named(name, ranks, runs),
                       [source] * SAVED_AT + [ranks] * (STEPS - SAVED_AT), results,
                       state_ranks=[0] if name == "zero" else range(ranks),
                       first_step=SAVED_AT)


def test_broadcast_gives_every_rank_the_roots_values(runs):
    results = runs[3]["broadcast"]
    root = results[2]
    for result in results:
        assert result.keys() == root.keys()
        for key in root:
            assert same_bits(result[key], root[key])
    assert float(root["lr"]) == pytest.approx(2.1)


def test_steady_state_steps_keep_no_memory_and_allocate_no_array(runs):
    for result in runs[2]["allocations"]:
        kept, peak = result["steps"]
        assert kept == result["none"][0]
        # Python's loop iterators only (512 bytes here), whatever the model's size.
        assert peak < 2048
        assert result["copied"] == 0


# ------------------------------------------------------------ errors

@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    directory = tmp_path_factory.mktemp("errors")
    return launch(directory, 4, [{"kind": "errors", "name": "errors"}])["errors"]


EXPECTED_ERRORS = {
    "transposed": ("ValueError",
                   "params[2] is float32 (256, 1152) on rank 0 but float32 (1152, 256) on rank 3"),
    "dtype": ("ValueError",
              "params[2] is float32 (256, 1152) on rank 0 but float64 (256, 1152) on rank 1"),
    "fortran": ("ValueError",
                "params[1] is float32 (3, 2) on rank 0 but float32 (3, 2) in Fortran order on rank 3"),
    "count": ("ValueError", "param_groups[0] has 4 parameters on rank 0 but 3 on rank 1"),
    "lr": ("ValueError", "param_groups[0]['lr'] is 0.1 on rank 0 but 0.2 on rank 3"),
    "bucket_cap_mb": ("ValueError", "bucket_cap_mb is 25 on rank 0 but 1 on rank 1"),
    "broadcast": ("ValueError",
                  "params[2] is float32 (256, 1152) on rank 0 but float32 (1152, 256) on rank 3"),
    "mpi reduction of float16": ("ValueError", ("reduction='mpi' cannot average float16 grads "
                                                "(MPI has no 16-bit float sum); use "
                                                "reduction='ordered'")),
    "comm": ("TypeError", "comm must be an mpi4py MPI.Intracomm (or None for MPI.COMM_WORLD), "
                          "not str"),
    "params changed on one rank": ("ValueError", "param_groups changed on rank 1 but not on rank 0"),
    "zero params changed": ("ValueError", ("param_groups changed since the optimizer was made; "
                                           "add parameters with add_param_group() on every rank")),
    "closed": ("RuntimeError", "this DistributedOptimizer was closed"),
    "pickle": ("TypeError", ("cannot pickle a DistributedOptimizer: it holds MPI requests; "
                             "save its state_dict() instead")),
    "zero duplicate": ("ValueError", ("params[4] is params[0] again: a "
                                      "ZeroRedundancyOptimizer steps each parameter once")),
}
for _kind in ("replicated", "zero"):
    EXPECTED_ERRORS.update({
        f"{_kind} missing grad": ("ValueError", "params[1] has a grad on rank 0 but none on rank 1"),
        f"{_kind} wrong grad": ("ValueError", ("rank 3: params[2]: grad has shape (3,), but the "
                                               "parameter has shape (256, 1152)")),
        f"{_kind} wrong dtype": ("TypeError", ("rank 1: params[0]: grad has dtype float64, but "
                                               "the parameter has dtype float32")),
        f"{_kind} plateau": ("ValueError", ("param_groups[0]['lr'] is 0.1 on rank 0 but "
                                            "0.010000000000000002 on rank 1")),
    })


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_a_difference_between_ranks_raises_on_every_rank(errors, case):
    for result in errors:
        assert tuple(result[case]) == EXPECTED_ERRORS[case]


def test_a_rank_that_is_not_given_an_optimizer_fails_every_rank(errors):
    assert [result["not an optimizer"][0] for result in errors] == ["TypeError"] * 4
    assert errors[1]["not an optimizer"][1] == \
        "DistributedOptimizer wraps a fastsgd optimizer, not a str"
    assert errors[0]["not an optimizer"][1] == \
        "rank 1: DistributedOptimizer wraps a fastsgd optimizer, not a str"


@pytest.mark.parametrize("kind", ["replicated", "zero"])
def test_after_a_rejected_step_nothing_moved_and_training_goes_on(errors, kind):
    for result in errors:
        assert result[f"{kind} untouched"] is True
        assert result[f"{kind} usable again"] is None


@pytest.mark.parametrize("kind", ["replicated", "zero"])
def test_a_step_that_raises_on_one_rank_raises_on_every_rank(errors, kind):
    messages = [result[f"{kind} step raises on one rank"] for result in errors]
    assert messages[3] == ["KeyError", "'a hook of the last rank'"]
    for message in messages[:3]:
        assert message == ["KeyError", "'rank 3: a hook of the last rank'"]


@pytest.mark.parametrize("how", ["raise", "exit", "kill"])
def test_a_rank_that_fails_ends_the_job_with_an_error_not_a_hang(tmp_path, how):
    spec = tmp_path / "fail.json"
    spec.write_text(json.dumps([{"kind": "fail", "name": "fail", "how": how}]))
    result = mpi_launch.run(3, WORKER_PATH, tmp_path, spec, timeout=60)
    assert "failing" in result.stdout
    assert result.returncode != 0


def test_example_trains_the_same_parameters_on_every_rank():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    result = mpi_launch.run(2, ROOT / "examples" / "train_digits_distributed.py", "--epochs", "3")
    assert result.returncode == 0, result.stderr
    # The ranks' lines reach mpiexec's stdout in any order, even run together.
    digests = dict(re.findall(r"rank (\d) of 2: parameters digest ([0-9a-f]{16})", result.stdout))
    assert digests.keys() == {"0", "1"}
    assert digests["0"] == digests["1"]
    assert float(re.search(r"test accuracy ([0-9.]+)", result.stdout).group(1)) > 0.85


def random_job(rng, index):
    """A random model, options, buckets and kind of optimizer."""
    groups = []
    for _ in range(int(rng.integers(1, 4))):
        shapes = []
        for _ in range(int(rng.integers(1, 6))):
            ndim = int(rng.integers(0, 4))
            shapes.append([int(rng.integers(0, 12)) for _ in range(ndim)])
        if rng.random() < 0.3:
            shapes.append([int(rng.integers(20_000, 60_000))])
        momentum = float(rng.choice([0.0, 0.9]))
        nesterov = bool(momentum and rng.random() < 0.5)
        options = {"lr": float(rng.choice([0.1, 0.03])), "momentum": momentum,
                   "nesterov": nesterov, "dampening": 0.0 if nesterov else float(rng.choice([0, 0.1])),
                   "weight_decay": float(rng.choice([0, 1e-2])), "maximize": bool(rng.random() < 0.3)}
        groups.append({"shapes": shapes, "dtype": str(rng.choice(["float32", "float64"])),
                       "fortran": [i for i, s in enumerate(shapes) if len(s) > 1 and rng.random() < 0.4],
                       "options": options})
    count = sum(len(g["shapes"]) for g in groups)
    return {"kind": "train", "name": f"random {index}", "seed": index, "steps": 4,
            "groups": groups, "options": {"lr": 0.1},
            "none": [[int(rng.integers(0, 4)), int(rng.integers(0, count))] for _ in range(2)],
            "bucket_cap_mb": float(rng.choice([0.0001, 0.01, 0.2, 25])),
            "views": bool(rng.random() < 0.5), "zero": bool(rng.random() < 0.4),
            "clip": float(rng.choice([0, 0.5, 10])) or None}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_random_models_are_bit_identical_to_one_process(tmp_path, ranks):
    rng = np.random.default_rng(ranks)
    jobs = [random_job(rng, 100 * ranks + i) for i in range(30)]
    results = launch(tmp_path, ranks, jobs, timeout=900)
    for job in jobs:
        assert_one_process(job, [ranks] * job["steps"], results[job["name"]],
                           state_ranks=[0] if job["zero"] else range(ranks))


def test_guide_tables_are_the_benchmarks():
    """The guide's tables are what benchmarks/distributed.py --report makes of the
    committed JSON (its --docs rewrites them), not typed by hand."""
    spec = importlib.util.spec_from_file_location("bench_distributed",
                                                  ROOT / "benchmarks" / "distributed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = json.loads((ROOT / bench.DOCS_JSON).read_text())["runs"]
    guide = (ROOT / bench.GUIDE).read_text()
    assert report.rewrite(guide, bench.regions(runs)) == guide


STRIDED_SCRIPT = '''
import numpy as np
from mpi4py import MPI

import fastsgd
from fastsgd import distributed, reference

comm = MPI.COMM_WORLD
rng = np.random.default_rng(0)
base = rng.standard_normal((6, 5, 2))
p = fastsgd.Parameter(base.copy()[..., 0])         # strided: stepped through copies
opt = distributed.DistributedOptimizer(fastsgd.SGD([p], lr=0.1, momentum=0.9))
one = fastsgd.Parameter(base.copy()[..., 0])
one_opt = fastsgd.SGD([one], lr=0.1, momentum=0.9)
for step in range(3):
    grads = [np.random.default_rng(10 * step + r).standard_normal((6, 5, 2))
             for r in range(comm.size)]
    p.grad = grads[comm.rank][:, :, 1].T.T         # strided grads are copied into the bucket
    opt.step()
    one.grad = reference.rank_ordered_mean([g[:, :, 1] for g in grads])
    one_opt.step()
assert np.array_equal(p, one) and not p.flags.c_contiguous
try:
    distributed.ZeroRedundancyOptimizer([fastsgd.Parameter(base.copy()[..., 0])])
    raise AssertionError("ZeroRedundancyOptimizer took a strided parameter")
except ValueError as error:
    assert str(error) == "params[0] is not contiguous", error
print("strided ok")
'''


def test_strided_parameters_and_grads(tmp_path):
    """DistributedOptimizer copies strided grads into its buckets and steps
    strided parameters as one process does; ZeroRedundancyOptimizer, which
    sends each parameter's memory as one block, refuses them."""
    script = tmp_path / "strided.py"
    script.write_text(STRIDED_SCRIPT)
    result = mpi_launch.run(2, script, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("strided ok") == 2
