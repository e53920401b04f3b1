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
DOCS = ("README.md", "docs/performance.md")
DEFAULT_JSON = "docs/_data/fastsgd-bench.json"
_REGION = re.compile(r"(<!-- bench:begin (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- bench:end -->)",
                     re.S)
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
]


def _format(value, unit):
    if unit == "%":
        return f"{100 * value:.0f}%"
    if unit == "us":
        return f"{value * 1e6:.2f} us"
    return f"{value:.2f}x"


def targets_table(results):
    """Each target against one run, per workload and thread count (or 2
    threads against 1): fastsgd's value, the bounding roofline's, and the
    verdict: met, missed, out of reach (the roofline itself misses it) or
    not in this run (a thread count it lacks).  Workloads the run did not
    measure are named below the table."""
    paired = bench._Paired(results)
    threads = sorted({r["threads"] for r in results}) or [1]
    lines = ["| target | workload | threads | fastsgd | bound: the same for | verdict |",
             "|---|---|---|---|---|---|"]
    measured = {r["workload"] for r in results}
    for target in TARGETS:
        for w in (w for w in target.workloads if w in measured):
            for t in ([1] if target.scaling else threads):
                value = target.measure(paired, w, t, "fastsgd")
                bound = (target.measure(paired, w, t, target.bound_peer)
                         if target.bound_peer else None)
                verdict = ("not in this run" if value is None
                           else "met" if target.reached(value)
                           else "out of reach" if bound is not None and not target.reached(bound)
                           else "missed")
                cells = [target.text, w, "2 vs 1" if target.scaling else str(t),
                         "-" if value is None else _format(value, target.unit),
                         "-" if bound is None else f"{target.bound_peer}: "
                                                   f"{_format(bound, target.unit)}", verdict]
                lines.append("| " + " | ".join(cells) + " |")
    missing = sorted({w for target in TARGETS for w in target.workloads} - measured)
    if missing:
        lines.append(f"\nThe targets on {', '.join(missing)} are not judged: "
                     "this run did not measure them.")
    return "\n".join(lines)


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


def regions(data):
    """Every generated region's text, by name, from a benchmark's JSON."""
    results = data["results"]
    limits = bench.limits_table(results) or (
        "(This run has one thread count: the table needs 1 and 2 threads.)")
    return {
        "run": run_summary(data),
        "headline": bench.table(results, columns=HEADLINE_COLUMNS),
        "results": bench.table(results),
        "limits": limits,
        "targets": targets_table(results),
    }


def rewrite(text, generated):
    """text with each marked region's body replaced by its generated text;
    raises ValueError on a region with no generated text."""
    def body(match):
        name = match["name"]
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
