"""python -m fastsgd report: a benchmark's JSON as tables, and the docs' regions made from it.

README.md and docs/performance.md hold regions between ``<!-- bench:begin NAME -->``
and ``<!-- bench:end -->``.  ``python -m fastsgd report JSON --docs`` rewrites each
from the JSON that ``python -m fastsgd bench`` wrote, so that no number in them is
typed by hand; ``--check`` only tells whether they are what the JSON generates
(tests/test_docs.py checks the committed docs against docs/_data/fastsgd-bench.json).
"""
import json
import pathlib
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from . import bench

# The files whose regions the report rewrites, relative to the repository.
DOCS = ("README.md", "docs/performance.md", "docs/guide/half-precision.md")
DEFAULT_JSON = "docs/_data/fastsgd-bench.json"
DISTRIBUTED_PREFIX = "distributed-"  # the regions benchmarks/distributed.py generates
_REGION = re.compile(r"(<!-- bench:begin (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- bench:end -->)",
                     re.S)
# The README's headline: one workload of each kind, the rest in docs/performance.md.
HEADLINE_WORKLOADS = ("W1", "W2", "W4", "H2", "M1")
HALF_WORKLOADS = ("H1", "H2", "H3", "H4", "M1", "M2")
HALF_COLUMNS = ("workload", "threads", "fastsgd", "% of roofline", "x vs torch for-loop",
                "x vs fastsgd f32", "x vs torch chain")
HEADLINE_COLUMNS = ("workload", "threads", "fastsgd", "% of roofline", "x vs torch for-loop",
                    "x vs torch foreach", "x vs torch fused")


@dataclass
class Target:
    """A speed target of the project: a measure of a peer on a workload at a
    thread count, the goal fastsgd's must reach, and the roofline whose own
    measure bounds it (None where nothing bounds it below the goal)."""
    text: str
    workloads: tuple
    measure: Callable  # (paired, workload, threads, peer) -> float or None
    goal: float
    unit: str
    bound_peer: Optional[str] = None
    at_most: bool = False  # the goal is a ceiling (a time), not a floor
    scaling: bool = False  # measured as 2 threads against 1, not per thread count

    def reached(self, value):
        return value <= self.goal if self.at_most else value >= self.goal

    def show(self, value):
        """value as the tables write it, with finer digits where rounding
        would show a miss as the goal itself (94.6% of a 95% goal)."""
        for digits in range(3):
            shown = _format(value, self.unit, digits)
            if self.reached(value) or shown != _format(self.goal, self.unit, digits):
                break
        return shown


def _share_of_roofline(paired, w, t, peer):
    return paired.ratio((w, "roofline", t), (w, peer, t))


def _faster_than(other):
    """How many times faster the peer is than `other` (their times' ratio)."""
    return lambda paired, w, t, peer: paired.ratio((w, other, t), (w, peer, t))


def _seconds(paired, w, t, peer):
    row = paired.rows.get((w, peer, t))
    return row["seconds"] if row else None


def _two_threads_vs_one(paired, w, t, peer):
    return paired.ratio((w, peer, 1), (w, peer, 2))


TARGETS = [
    Target("at least 95% of the roofline", ("W1", "W3", "W5", "W6"), _share_of_roofline,
           0.95, "%"),
    Target("no slower than torch fused", ("W1", "W3", "W5", "W6"), _faster_than("torch fused"),
           1.0, "x"),
    Target("within 2x of the roofline (at least 50% of it)", ("W2",), _share_of_roofline,
           0.5, "%"),
    Target("at most 2 us per step()", ("W4",), _seconds, 2e-6, "us", at_most=True),
    Target("at least 20x faster than torch fused", ("W2",), _faster_than("torch fused"), 20.0,
           "x", bound_peer="roofline reading objects"),
    Target("at least 4x faster than torch's for-loop", ("W1",), _faster_than("torch for-loop"),
           4.0, "x", bound_peer="roofline"),
    Target("2 threads at least 1.6x faster than 1", ("W2",), _two_threads_vs_one, 1.6, "x",
           bound_peer="roofline", scaling=True),
    # half precision and master weights: against torch's own 16-bit steps,
    # and against fastsgd's float32 step of the same shapes (the roofline of
    # the 16-bit bytes bounds how much faster than float32 a step can be)
    Target("float16 at least 2x faster than torch's for-loop", ("H1", "H3"),
           _faster_than("torch for-loop"), 2.0, "x"),
    Target("float16 at least 1.1x faster than fastsgd's float32", ("H1", "H3"),
           _faster_than("fastsgd f32"), 1.1, "x", bound_peer="roofline"),
    Target("bfloat16 at least 1.8x faster than torch's for-loop", ("H2", "H4"),
           _faster_than("torch for-loop"), 1.8, "x"),
    Target("bfloat16 no slower than fastsgd's float32", ("H2", "H4"),
           _faster_than("fastsgd f32"), 1.0, "x", bound_peer="roofline"),
    Target("master weights at least 1.5x faster than torch's chain", ("M1", "M2"),
           _faster_than("torch chain"), 1.5, "x"),
    Target("master weights at least 85% of the roofline", ("M1", "M2"), _share_of_roofline,
           0.85, "%"),
]


# fastsgd.torch.SGD's targets (issue 15), judged in the torch region's table.
TORCH_TARGETS = [
    # (both step the same memory; any torch optimizer's step wraps fastsgd's)
    Target("within 5% of fastsgd on numpy arrays", ("T1",), _faster_than("fastsgd on numpy"),
           0.95, "x", bound_peer="fastsgd on numpy in torch's step"),
    Target("at least 2x faster than torch fused", ("T2",), _faster_than("torch fused"), 2.0,
           "x", bound_peer="torch API floor"),
    Target("at least 5x faster than torch's for-loop", ("T2",),
           _faster_than("torch for-loop"), 5.0, "x"),
]
TORCH_WORKLOADS = tuple(w.name for w in bench.WORKLOADS if w.torch)
TORCH_COLUMNS = ("workload", "threads", "fastsgd", "GB/s", "x vs fastsgd on numpy",
                 "x vs torch for-loop", "x vs torch foreach", "x vs torch fused")


def _format(value, unit, extra_digits=0):
    if unit == "%":
        return f"{100 * value:.{extra_digits}f}%"
    if unit == "us":
        return f"{value * 1e6:.{2 + extra_digits}f} us"
    return f"{value:.{2 + extra_digits}f}x"


def judgements(results, targets=TARGETS):
    """Each target (of targets) against one run, per workload and thread count (or 2
    threads against 1): (target, workload, threads label, fastsgd's value,
    the bounding roofline's value, verdict), the verdict one of met, missed,
    out of reach (the roofline itself misses it) or not in this run (a
    thread count it lacks)."""
    paired = bench._Paired(results)
    threads = sorted({r["threads"] for r in results}) or [1]
    measured = {r["workload"] for r in results}
    for target in targets:
        for w in (w for w in target.workloads if w in measured):
            for t in ([1] if target.scaling else threads):
                value = target.measure(paired, w, t, "fastsgd")
                bound = (target.measure(paired, w, t, target.bound_peer)
                         if target.bound_peer else None)
                verdict = ("not in this run" if value is None
                           else "met" if target.reached(value)
                           else "out of reach" if bound is not None and not target.reached(bound)
                           else "missed")
                yield target, w, "2 vs 1" if target.scaling else str(t), value, bound, verdict


def _unjudged(results, workloads=None, targets=TARGETS):
    measured = {r["workload"] for r in results}
    missing = sorted({w for target in targets for w in target.workloads
                      if workloads is None or w in workloads} - measured)
    return (f"\n\nThe targets on {', '.join(missing)} are not judged: "
            "this run did not measure them.") if missing else ""


def targets_table(results, targets=TARGETS):
    """Every judgement of one run (of targets), with fastsgd's value and the
    bound's; workloads the run did not measure are named below the table."""
    lines = ["| target | workload | threads | fastsgd | bound: the same for | verdict |",
             "|---|---|---|---|---|---|"]
    for target, w, threads, value, bound, verdict in judgements(results, targets):
        cells = [target.text, w, threads, "-" if value is None else target.show(value),
                 "-" if bound is None else f"{target.bound_peer}: {target.show(bound)}",
                 verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + _unjudged(results, targets=targets)


def verdicts_table(results, workloads=None):
    """One row per target: where it is met and where not, for the README
    (only the targets on ``workloads``, if given)."""
    lines = ["| target | met | not met |", "|---|---|---|"]
    by_target: dict = {}
    for target, w, threads, value, _, verdict in judgements(results):
        if workloads is not None and w not in workloads:
            continue
        label = f"{w} {threads}T" if threads != "2 vs 1" else w
        if value is not None:
            label += f" ({target.show(value)})"
        by_target.setdefault(target.text, []).append((verdict, label))
    for text, judged in by_target.items():
        met = ", ".join(label for verdict, label in judged if verdict == "met") or "-"
        others = "; ".join(f"{verdict}: {label}" for verdict, label in judged
                           if verdict != "met") or "-"
        lines.append(f"| {text} | {met} | {others} |")
    return "\n".join(lines) + _unjudged(results, workloads)


def run_summary(data):
    """One paragraph: the machine, the date and what was run."""
    machine, run = data["machine"], data.get("run", {})
    cpus = f", {machine['cpus']} CPUs" if machine.get("cpus") else ""
    openmp = "and OpenMP" if machine["openmp"] else "(no OpenMP)"
    text = (f"Measured on {machine.get('cpu', machine['machine'])}{cpus}, "
            f"{run.get('date', 'date not recorded')[:10]}, with the `{machine['kernel']}` "
            f"kernel {openmp}; Python {machine['python']}, numpy {machine['numpy']}, "
            f"torch {machine['torch'] or 'not installed'}, fastsgd {machine['fastsgd']}.")
    if run:
        threads = " and ".join(str(t) for t in run["threads"])
        plural = "s" if run["threads"] != [1] else ""
        text += (f" Workloads {', '.join(run['workloads'])} at {threads} thread{plural}, "
                 f"{run['budget_s']:g} s of timing per measurement.")
        if run.get("label"):
            text += f" This run: {run['label']}."
    return text


def torch_region(results):
    """fastsgd.torch.SGD's rows ("fastsgd" is the adapter there) and its
    targets' verdicts, or what to run when the run has none."""
    rows = [r for r in results if r["workload"] in TORCH_WORKLOADS]
    if not rows:
        return (f"(This run did not measure {' and '.join(TORCH_WORKLOADS)}: "
                f"`python -m fastsgd bench --workloads {' '.join(TORCH_WORKLOADS)}`.)")
    return (bench.table(rows, columns=TORCH_COLUMNS) + "\n\n"
            + targets_table(rows, TORCH_TARGETS))


def regions(data):
    """Every generated region's text, by name, from a benchmark's JSON."""
    results = data["results"]
    limits = bench.limits_table(results) or (
        "(This run has one thread count: the table needs 1 and 2 threads.)")
    return {
        "run": run_summary(data),
        "headline": bench.table([r for r in results if r["workload"] in HEADLINE_WORKLOADS],
                                columns=HEADLINE_COLUMNS),
        "torch": torch_region(results),
        "results": bench.table(results),
        "limits": limits,
        "targets": targets_table(results),
        "verdicts": verdicts_table(results),
        "half": bench.table([r for r in results if r["workload"] in HALF_WORKLOADS],
                            columns=HALF_COLUMNS),
        "half-verdicts": verdicts_table(results, HALF_WORKLOADS),
    }


def rewrite(text, generated):
    """text with each marked region's body replaced by its generated text.
    Two generators share the files: benchmarks/distributed.py owns the
    regions named ``distributed-*`` (from its own JSON), this module the
    rest; the other generator's regions are left as they are, and a region
    of the caller's side with no generated text raises ValueError."""
    distributed = any(name.startswith(DISTRIBUTED_PREFIX) for name in generated)

    def body(match):
        name = match["name"]
        if name.startswith(DISTRIBUTED_PREFIX) != distributed:
            return match[0]
        if name not in generated:
            raise ValueError(f"no generated region named {name!r} (known: {sorted(generated)})")
        return f"{match[1]}{generated[name]}\n{match[4]}"
    return _REGION.sub(body, text)


def _rewrites(data, root):
    """(path, its text, its text with the regions data generates) for each of DOCS."""
    generated = regions(data)
    for name in DOCS:
        path = pathlib.Path(root, name)
        text = path.read_text()
        yield path, text, rewrite(text, generated)


def stale_docs(data, root="."):
    """The docs under root whose regions differ from what data generates."""
    return [str(path) for path, text, new in _rewrites(data, root) if new != text]


def main(json_path=DEFAULT_JSON, docs=False, check=False, root="."):
    with open(json_path) as f:
        data = json.load(f)
    if check:
        stale = stale_docs(data, root)
        for path in stale:
            print(f"{path}: its tables are not what {json_path} generates "
                  f"(python -m fastsgd report {json_path} --docs)", file=sys.stderr)
        return 1 if stale else 0
    if not docs:
        for name, text in regions(data).items():
            print(f"{name}:\n\n{text}\n")
        return 0
    for path, text, new in _rewrites(data, root):
        if new != text:
            path.write_text(new)
        print(f"{'rewrote' if new != text else 'up to date:'} {path}")
    return 0
