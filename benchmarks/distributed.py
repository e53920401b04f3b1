"""Benchmark of fastsgd.distributed: averaging the grads against a raw MPI Allreduce.

    python benchmarks/distributed.py [--ranks 2 4] [--repeat 3] [--rounds 15]
                                     [--json fastsgd-bench-distributed.json]
    python benchmarks/distributed.py --report JSON [--docs]

Launches itself under ``mpiexec -n N python -m mpi4py`` for each N (``--repeat``
times), and prints, per workload (ResNet-50's parameter shapes and 5,000
tensors of 256, float32) and number of ranks, the median time per step of:

- ``raw Allreduce``: one ``Allreduce(IN_PLACE)`` of a flat buffer of the
  grads' bytes: the peer every target is a ratio to;
- ``ordered``: ``DistributedOptimizer.synchronize()`` with
  ``gradient_as_bucket_view=True`` (the grads are the buckets: no copy);
- ``ordered, copied``: the same with each grad a separate array, copied once;
- ``mpi``: ``reduction="mpi"`` (Allreduce per bucket, then a division);
- ``average only``: the ordered plan's requests and sums alone, without the
  per-step checks (which grads are present, the options, the digest
  Allgather): the algorithm's own cost, a bound on how fast ``ordered`` can be;
- ``exchange only``: the ordered plan's Alltoallv and Allgatherv without the
  sums: its communication;
- ``ZeRO``: ``ZeroRedundancyOptimizer.synchronize()`` (grads reduced to their
  owners only);

each as the median over rounds of its ratio to the raw Allreduce of the same
round (every round samples every peer once, in a new order, each sample after
a Barrier, its time the slowest rank's).  Also: the grads copied per grad, the
memory a steady-state ``synchronize()`` keeps and peaks at (tracemalloc), the
ZeRO optimizer state per rank against total / N, and, for the cost model of
docs/guide/distributed.md, raw Allreduce times over message sizes and numpy's
add throughput.  With ``--repeat`` > 1 the tables give the median over
repeats and the range.  Times on a shared machine are noisy; only the ratios
measured in one round mean much.  The JSON holds every repeat; ``--report``
prints its tables, and with ``--docs`` rewrites the regions of
docs/guide/distributed.md that they fill (docs/_data holds the run the guide
shows).
"""
import argparse
import json
import math
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve()
WORKLOADS = {"ResNet-50 shapes, f32": "resnet50", "5,000 x 256, f32": "w2"}
TARGETS = {2: 1.2, 4: 1.6}  # ordered, replicated, against the raw Allreduce
ZERO_TARGET = 1.25
PEERS = ["raw Allreduce", "ordered", "ordered, copied", "mpi", "average only", "exchange only",
         "ZeRO"]
SIZES = [2**12, 2**16, 2**20, 2**23, 2**25]  # bytes, for the cost model


def shapes_of(workload):
    from fastsgd.bench import resnet50_shapes

    return resnet50_shapes() if workload == "resnet50" else [(256,)] * 5000


# ------------------------------------------------------------ on the ranks

def worker(rounds, out):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    results = {"ranks": comm.size, "workloads": {
        name: measure(comm, shapes_of(workload), rounds) for name, workload in WORKLOADS.items()}}
    results["allreduce by size"] = allreduce_by_size(comm, rounds)
    results["numpy add, bytes per second"] = add_throughput()
    if comm.rank == 0:
        pathlib.Path(out).write_text(json.dumps(results))


def measure(comm, shapes, rounds):
    """Every peer on parameters of ``shapes``, float32, in interleaved rounds."""
    from mpi4py import MPI

    import fastsgd
    import fastsgd.distributed as dist

    rng = np.random.default_rng(comm.rank)
    params = [fastsgd.Parameter(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    flat = np.zeros(sum(p.size for p in params), np.float32)

    def replicated(**options):
        return dist.DistributedOptimizer(fastsgd.SGD(params, lr=0.01, momentum=0.9), **options)

    ordered = replicated(gradient_as_bucket_view=True)
    copied = replicated()
    mpi = replicated(reduction="mpi", gradient_as_bucket_view=True)
    exchange = replicated(gradient_as_bucket_view=True)
    for flat_grads in exchange._plan.flats:  # the same requests, no arithmetic
        flat_grads.schedule = [(a, [], g, n) for a, _, g, n in flat_grads.schedule]
    zero = dist.ZeroRedundancyOptimizer(params, lr=0.01, momentum=0.9,
                                        gradient_as_bucket_view=True)

    def bind_copies():
        copied.zero_grad()
        for p, g in zip(params, grads):
            p.grad = g

    def average_only():
        for flat_grads in ordered._plan.flats:
            flat_grads.average()

    # Each peer: (prepare, run); zero_grad() zero-fills the views, as a
    # backward pass writing into them leaves them, outside the timing.
    peers = {
        "raw Allreduce": (lambda: flat.fill(0),
                          lambda: comm.Allreduce(MPI.IN_PLACE, [flat, MPI.FLOAT], MPI.SUM)),
        "ordered": (ordered.zero_grad, ordered.synchronize),
        "ordered, copied": (bind_copies, copied.synchronize),
        "mpi": (mpi.zero_grad, mpi.synchronize),
        "average only": (ordered.zero_grad, average_only),
        "exchange only": (exchange.zero_grad, exchange.synchronize),
        "ZeRO": (zero.zero_grad, zero.synchronize),
    }
    for prepare, run in peers.values():  # warm up: first touches, lazy setup
        prepare()
        run()
    times = {peer: [] for peer in peers}
    order = list(peers)
    shuffle = random.Random(0)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for peer in order:
            prepare, run = peers[peer]
            prepare()
            comm.Barrier()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            times[peer].append(comm.allreduce(elapsed, op=MPI.MAX))
    plan = ordered._plan  # the per-step checks alone: staging and the digest's Allgather
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(20):
        ordered._stage(plan)
        plan.exchange.Start()
        plan.exchange.Wait()
    checks = (time.perf_counter() - start) / 20
    copies = {"ordered": ordered.grads_copied / len(params)}
    bind_copies()
    copied.synchronize()
    copies["ordered, copied"] = copied.grads_copied / len(params)
    # ZeRO's state after a step, against one process's.
    zero.zero_grad()
    zero.step()
    state = sum(b.nbytes for entry in zero.state.values() for b in entry.values())
    result = {
        "tensors": len(params), "bytes": int(flat.nbytes),
        "buckets": sum(f.buckets for f in ordered._plan.flats),
        "times": times, "copies per grad": copies, "checks seconds": checks,
        "allocation": steady_state_allocation(ordered, comm),
        "zero state bytes per rank": comm.allgather(state),
        "zero state bytes, one process": int(flat.nbytes),
    }
    for optimizer in (ordered, copied, mpi, exchange, zero):
        optimizer.close()
    return result


def steady_state_allocation(optimizer, comm):
    """(bytes kept, bytes peaked) by 20 synchronize() calls, less a loop of none."""
    from fastsgd.bench import traced_memory

    def synchronize():
        optimizer._synchronized = False  # what zero_grad resets, without its fill
        optimizer.synchronize()

    traced_memory(synchronize, 20)  # tracemalloc's own first use
    comm.Barrier()
    steps = traced_memory(synchronize, 20)
    comm.Barrier()
    none = traced_memory(synchronize, 0)
    return {"kept": steps[0] - none[0], "peak": steps[1] - none[1]}


def allreduce_by_size(comm, rounds):
    """Median raw Allreduce time (slowest rank) per message size."""
    from mpi4py import MPI

    medians = {}
    for size in SIZES:
        buffer = np.zeros(size // 4, np.float32)
        samples = []
        for _ in range(max(5, rounds)):
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, [buffer, MPI.FLOAT], MPI.SUM)
            samples.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        medians[size] = float(np.median(samples))
    return medians


def add_throughput():
    """Bytes of output per second of np.add(a, b, out=a) on 25 MB (the sums' cost)."""
    a, b = np.ones(25 * 2**20 // 4, np.float32), np.ones(25 * 2**20 // 4, np.float32)
    samples = []
    for _ in range(9):
        start = time.perf_counter()
        np.add(a, b, a)
        samples.append(time.perf_counter() - start)
    return a.nbytes / float(np.median(samples))


# ------------------------------------------------------------ the driver

def mpiexec():
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else "mpiexec"


def launch(ranks, rounds):
    with tempfile.TemporaryDirectory() as directory:
        out = pathlib.Path(directory) / "result.json"
        command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", str(HERE),
                   "--worker", "--rounds", str(rounds), "--json", str(out)]
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.read_text())


def ratios(workload):
    """Each peer's median over rounds of its ratio to the raw Allreduce."""
    raw = np.array(workload["times"]["raw Allreduce"])
    return {peer: float(np.median(np.array(times) / raw))
            for peer, times in workload["times"].items()}


def summarize(runs):
    """{(workload, ranks): {quantity: [value per repeat]}}."""
    table = {}
    for run in runs:
        for name, workload in run["workloads"].items():
            row = table.setdefault((name, run["ranks"]), {})
            for peer, ratio in ratios(workload).items():
                row.setdefault(peer, []).append(ratio)
            row.setdefault("raw ms", []).append(
                1e3 * float(np.median(workload["times"]["raw Allreduce"])))
            row.setdefault("ordered ms", []).append(
                1e3 * float(np.median(workload["times"]["ordered"])))
            per_rank = workload["zero state bytes per rank"]
            row.setdefault("zero", []).append(
                max(per_rank) / (workload["zero state bytes, one process"] / run["ranks"]))
            row["copies"] = workload["copies per grad"]
            row.setdefault("kept", []).append(workload["allocation"]["kept"])
            row.setdefault("peak", []).append(workload["allocation"]["peak"])
            row["buckets"] = workload["buckets"]
    return table


def spread(values, digits=2):
    middle = float(np.median(values))
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _verdict(row, ranks):
    """The ordered reduction's ratio to the raw Allreduce against its target."""
    target = TARGETS.get(ranks)
    ordered = float(np.median(row["ordered"]))
    bound = float(np.median(row["average only"]))
    if target is None:
        return "-"
    if ordered <= target:
        return "met"
    if bound > target:
        return f"out of reach: the algorithm alone is {bound:.2f}x"
    return "missed"


def summary_markdown(table):
    """The README's table: per workload and ranks, the ordered reduction's
    time against the raw Allreduce's, ZeRO's state per rank, the verdicts."""
    lines = ["| workload | ranks | raw Allreduce | ordered (bit-identical) | target | verdict "
             "| ZeRO state per rank / (total / N) |", "|---|---|---|---|---|---|---|"]
    for (name, ranks), row in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        target, zero = TARGETS.get(ranks), float(np.median(row["zero"]))
        lines.append(
            f"| {name} | {ranks} | {float(np.median(row['raw ms'])):.1f} ms | "
            f"{float(np.median(row['ordered'])):.2f}x | {f'<= {target}x' if target else '-'} | "
            f"{_verdict(row, ranks)} | {zero:.3f} "
            f"({'met' if zero <= ZERO_TARGET else 'missed'}: <= {ZERO_TARGET}) |")
    return "\n".join(lines)


def markdown(table, repeats):
    lines = [(f"Median over {repeats} run(s) (range in brackets); every ratio is to the raw "
              "Allreduce of the same bytes, measured in the same rounds."), "",
             ("| workload | ranks | raw Allreduce | ordered | ordered, copied | mpi | "
              "average only (bound) | exchange only | ZeRO reduce | target | verdict |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, ranks), row in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        target, verdict = TARGETS.get(ranks), _verdict(row, ranks)
        lines.append(
            f"| {name} | {ranks} | {spread(row['raw ms'], 1)} ms | {spread(row['ordered'])}x | "
            f"{spread(row['ordered, copied'])}x | {spread(row['mpi'])}x | "
            f"{spread(row['average only'])}x | {spread(row['exchange only'])}x | "
            f"{spread(row['ZeRO'])}x | "
            f"{f'<= {target}x' if target else '-'} | {verdict} |")
    lines += ["", ("| workload | ranks | buckets | grads copied per grad (views / copied) | "
                   "steady-state synchronize: bytes kept, peak | ZeRO state per rank / (total / N) |"),
              "|---|---|---|---|---|---|"]
    for (name, ranks), row in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        zero = float(np.median(row["zero"]))
        lines.append(
            f"| {name} | {ranks} | {row['buckets']} | {row['copies']['ordered']:.0f} / "
            f"{row['copies']['ordered, copied']:.0f} | {max(row['kept'])}, {max(row['peak'])} | "
            f"{spread(row['zero'], 3)} ({'met' if zero <= ZERO_TARGET else 'missed'}: "
            f"<= {ZERO_TARGET}) |")
    return "\n".join(lines)


# ------------------------------------------------------------ the cost model

LINKS = {"10 Gb/s": (1.25e9, 10e-6), "100 Gb/s": (12.5e9, 2e-6)}  # bytes/s; assumed latency
MODEL_RANKS = [8, 16, 32, 64]
MODEL_WORKLOADS = {"ResNet-50 shapes, f32": (102_228_128, 161), "5,000 x 256, f32": (5_120_000, 5000)}
BUCKET_BYTES = 25 * 2**20


def fit(runs):
    """The model's machine constants, from the runs' medians.

    gamma: seconds per byte of numpy's add (the sums; the division costs
    about as much per byte).  alpha, beta: the raw 2-rank Allreduce's latency
    and seconds per byte on this machine's transport, least squares (relative
    error) of T(M) = 2 alpha + M beta + M gamma / 2 over the message sizes.
    check: seconds per tensor of the per-step checks (5,000 tensors).
    """
    gamma = 1 / float(np.median([run["numpy add, bytes per second"] for run in runs]))
    pairs = [run for run in runs if run["ranks"] == 2]
    sizes = np.array(SIZES[1:], float)
    times = np.array([np.median([run["allreduce by size"][str(int(m))] for run in pairs])
                      for m in sizes])
    design = np.stack([2 * np.ones_like(sizes), sizes], axis=1) / times[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, (times - sizes * gamma / 2) / times, rcond=None)
    checks = [run["workloads"]["5,000 x 256, f32"]["checks seconds"] for run in pairs]
    return {"alpha": float(alpha), "beta": float(beta), "gamma": gamma,
            "check": float(np.median(checks)) / 5000}


def predicted(constants, ranks, nbytes, tensors, alpha, beta):
    """(ordered, MPI's best) seconds to average ``nbytes`` of grads at ``ranks``.

    Both move 2 (N-1)/N M bytes per rank and add (N-1)/N M.  MPI's best
    large-message allreduce (reduce-scatter by recursive halving, allgather
    by recursive doubling) pays 2 log2(N) latencies, or for small messages
    recursive doubling, log2(N) (latency + M bytes + M sums).  The ordered
    reduction pays 2 (N-1) latencies per bucket (a pairwise exchange and a
    ring allgather), a division of M / N bytes and the per-step checks.
    """
    n, m, gamma = ranks, nbytes, constants["gamma"]
    moved, summed = 2 * (n - 1) / n * m * beta, (n - 1) / n * m * gamma
    buckets = max(1, math.ceil(m / BUCKET_BYTES))
    ordered = (2 * (n - 1) * alpha * buckets + moved + summed + m / n * gamma
               + tensors * constants["check"])
    halving = 2 * math.log2(n) * alpha + moved + summed
    doubling = math.log2(n) * (alpha + m * beta + m * gamma)
    return ordered, min(halving, doubling)


def model_markdown(runs):
    constants = fit(runs)
    lines = [(f"Fitted here: alpha {constants['alpha'] * 1e6:.1f} us, beta "
              f"{1 / constants['beta'] / 1e9:.2f} GB/s (shared memory), gamma "
              f"{1 / constants['gamma'] / 1e9:.2f} GB/s (numpy's add), checks "
              f"{constants['check'] * 1e9:.0f} ns per tensor."), "",
             "| workload | link | ranks | ordered | MPI's best | ratio |", "|---|---|---|---|---|---|"]
    for name, (nbytes, tensors) in MODEL_WORKLOADS.items():
        for link, (bandwidth, latency) in LINKS.items():
            for ranks in MODEL_RANKS:
                ordered, best = predicted(constants, ranks, nbytes, tensors, latency,
                                          1 / bandwidth)
                lines.append(f"| {name} | {link} | {ranks} | {ordered * 1e3:.2f} ms | "
                             f"{best * 1e3:.2f} ms | {ordered / best:.2f} |")
    lines += ["", ("Smallest grads (MB, one tensor per 1,000 elements) that the ordered "
                   "reduction averages within 1.2x of MPI's best:"), "",
              "| link | " + " | ".join(f"{n} ranks" for n in MODEL_RANKS) + " |",
              "|---|" + "---|" * len(MODEL_RANKS)]
    for link, (bandwidth, latency) in LINKS.items():
        cells = []
        for ranks in MODEL_RANKS:
            worth = next((mb for mb in np.geomspace(0.01, 10_000, 241)
                          if _ratio(constants, ranks, mb * 1e6, latency, bandwidth) <= 1.2), None)
            cells.append(f"{worth:.2g}" if worth is not None else "never")
        lines.append(f"| {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(constants, ranks, nbytes, latency, bandwidth):
    ordered, best = predicted(constants, ranks, nbytes, nbytes / 4000, latency, 1 / bandwidth)
    return ordered / best


GUIDE = "docs/guide/distributed.md"
DOCS = (GUIDE, "README.md")  # the files holding this benchmark's generated regions
DOCS_JSON = "docs/_data/fastsgd-bench-distributed.json"


def regions(runs):
    """The guide's generated regions (see fastsgd.report), by name, from the runs."""
    repeats = sum(run["ranks"] == runs[0]["ranks"] for run in runs)
    table = summarize(runs)
    generated = {"distributed-results": markdown(table, repeats),
                 "distributed-summary": summary_markdown(table)}
    if any(run["ranks"] == 2 for run in runs):
        generated["distributed-model"] = model_markdown(runs)
    return generated


def machine():
    from mpi4py import MPI

    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "mpi": MPI.Get_library_version().splitlines()[0],
            "numpy": np.__version__, "date": time.strftime("%Y-%m-%d")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeat", type=int, default=1, help="runs per number of ranks")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default="fastsgd-bench-distributed.json")
    parser.add_argument("--report", metavar="JSON",
                        help="run nothing: print the tables and the cost model of JSON")
    parser.add_argument("--docs", action="store_true",
                        help=f"with --report, rewrite the generated regions of {' and '.join(DOCS)}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.rounds, args.json)
    if args.report:
        generated = regions(json.loads(pathlib.Path(args.report).read_text())["runs"])
        if args.docs:
            from fastsgd import report

            for name in DOCS:
                path = HERE.parent.parent / name
                path.write_text(report.rewrite(path.read_text(), generated))
                print(f"rewrote {path}")
        else:
            print("\n\n".join(generated.values()))
        return 0
    runs = [launch(ranks, args.rounds) for _ in range(args.repeat) for ranks in args.ranks]
    text = "\n\n".join(regions(runs).values())
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"machine": machine(), "runs": runs, "markdown": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
