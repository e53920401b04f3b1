"""python -m fastsgd report: the tables of a benchmark's JSON, and the docs' marked
regions rewritten from it."""
import json
import subprocess
import sys

import pytest

from fastsgd import report


def result(workload, peer, threads, seconds):
    return {"workload": workload, "peer": peer, "threads": threads, "seconds": seconds,
            "gb_per_s": 1.0, "rounds": None}


def run_json(results, label="a test run"):
    return {"machine": {"cpu": "Test CPU", "cpus": 2, "machine": "x86_64", "kernel": "avx2",
                        "openmp": True, "python": "3.11", "numpy": "2.0", "torch": "2.13.0",
                        "fastsgd": "0.1.0"},
            "run": {"date": "2026-12-01T07:33:07+00:00", "label": label, "workloads": ["W2"],
                    "threads": [1, 2], "budget_s": 0.2},
            "results": results}


W2 = [result("W2", "fastsgd", 1, 1.0), result("W2", "roofline", 1, 0.8),
      result("W2", "roofline reading objects", 1, 0.9), result("W2", "torch fused", 1, 15.0),
      result("W2", "fastsgd", 2, 0.5), result("W2", "roofline", 2, 0.6),
      result("W2", "roofline reading objects", 2, 0.45), result("W2", "torch fused", 2, 12.0)]


def test_the_targets_are_judged_against_the_run_and_the_rooflines_bounds():
    rows = report.targets_table(W2).splitlines()
    assert rows[2] == "| within 2x of the roofline (at least 50% of it) | W2 | 1 | 80% | - | met |"
    # 15x torch fused, where the roofline reading objects is only 16.7x: out of reach;
    # at 2 threads 24x: met
    assert rows[4] == ("| at least 20x faster than torch fused | W2 | 1 | 15.00x | "
                       "roofline reading objects: 16.67x | out of reach |")
    assert rows[5].endswith("| 24.00x | roofline reading objects: 26.67x | met |")
    # 2 threads vs 1: fastsgd 2.0x, the roofline 1.33x
    assert rows[6] == ("| 2 threads at least 1.6x faster than 1 | W2 | 2 vs 1 | 2.00x | "
                       "roofline: 1.33x | met |")
    assert rows[-1] == ("The targets on H1, H2, H3, H4, M1, M2, W1, W3, W4, W5, W6 are not judged: "
                        "this run did not measure them.")


def test_the_verdicts_say_per_target_where_it_is_met_and_where_not():
    rows = report.verdicts_table(W2).splitlines()
    assert rows[2] == "| within 2x of the roofline (at least 50% of it) | W2 1T (80%), W2 2T (120%) | - |"
    assert rows[3] == ("| at least 20x faster than torch fused | W2 2T (24.00x) | "
                       "out of reach: W2 1T (15.00x) |")
    assert rows[4] == "| 2 threads at least 1.6x faster than 1 | W2 (2.00x) | - |"


def test_a_target_the_roofline_reaches_is_missed_not_out_of_reach():
    slower = [dict(r, seconds=r["seconds"] * (1.5 if r["peer"] == "fastsgd" else 1)) for r in W2]
    rows = report.targets_table(slower).splitlines()
    assert rows[5].endswith("| 16.00x | roofline reading objects: 26.67x | missed |")


def test_a_miss_that_rounds_to_the_goal_shows_finer_digits():
    runs = [result("W6", "fastsgd", 1, 1.0), result("W6", "roofline", 1, 0.946),
            result("W6", "fastsgd", 2, 1.0), result("W6", "roofline", 2, 0.953)]
    rows = report.targets_table(runs).splitlines()
    assert rows[2] == "| at least 95% of the roofline | W6 | 1 | 94.6% | - | missed |"
    assert rows[3] == "| at least 95% of the roofline | W6 | 2 | 95% | - | met |"
    assert "missed: W6 1T (94.6%)" in report.verdicts_table(runs)


def test_a_target_needing_two_thread_counts_is_not_judged_on_one():
    rows = report.targets_table([r for r in W2 if r["threads"] == 1]).splitlines()
    assert rows[4] == ("| 2 threads at least 1.6x faster than 1 | W2 | 2 vs 1 | - | - | "
                       "not in this run |")


def test_the_run_summary_says_where_when_and_what():
    text = report.run_summary(run_json(W2, label="reduced"))
    assert text.startswith("Measured on Test CPU, 2 CPUs, 2026-12-01, with the `avx2` kernel")
    assert "Workloads W2 at 1 and 2 threads, 0.2 s of timing per measurement." in text
    assert text.endswith("This run: reduced.")


def test_rewrite_replaces_each_regions_body_and_nothing_else():
    text = ("# Page\n\nbefore\n<!-- bench:begin run -->\nstale\nlines\n<!-- bench:end -->\n"
            "between\n<!-- bench:begin limits -->\n<!-- bench:end -->\nafter\n")
    new = report.rewrite(text, {"run": "RUN", "limits": "LIMITS\nTABLE"})
    assert new == ("# Page\n\nbefore\n<!-- bench:begin run -->\nRUN\n<!-- bench:end -->\n"
                   "between\n<!-- bench:begin limits -->\nLIMITS\nTABLE\n<!-- bench:end -->\n"
                   "after\n")
    # the regions of benchmarks/distributed.py are its own: left as they are
    other = "<!-- bench:begin distributed-summary -->\nkept\n<!-- bench:end -->\n"
    assert report.rewrite(other, {"run": "RUN"}) == other
    with pytest.raises(ValueError, match="no generated region named 'nonsense'"):
        report.rewrite("<!-- bench:begin nonsense -->\n<!-- bench:end -->\n", {"run": "RUN"})


def test_the_command_prints_rewrites_and_checks_the_docs(tmp_path):
    data = tmp_path / "bench.json"
    data.write_text(json.dumps(run_json(W2)))
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    (tmp_path / "docs" / "guide" / "half-precision.md").write_text("# H\n")
    (tmp_path / "README.md").write_text("# R\n<!-- bench:begin headline -->\n<!-- bench:end -->\n")
    (tmp_path / "docs" / "performance.md").write_text(
        "# P\n<!-- bench:begin results -->\nold\n<!-- bench:end -->\n")

    def command(*args):
        return subprocess.run([sys.executable, "-m", "fastsgd", "report", str(data), *args],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    printed = command()
    assert printed.returncode == 0 and "| W2 5,000 tensors x 256, f32 | 2 |" in printed.stdout
    stale = command("--check")
    assert stale.returncode == 1 and "README.md: its tables are not what" in stale.stderr
    assert command("--docs").returncode == 0
    assert "| W2 5,000 tensors x 256, f32 | 1 | 1000.00 ms | 80% |" in (
        tmp_path / "README.md").read_text()
    assert "old" not in (tmp_path / "docs" / "performance.md").read_text()
    assert command("--check").returncode == 0


def test_the_torch_region_judges_the_adapters_targets():
    rows = [result("T2", "fastsgd", 1, 1.0), result("T2", "torch fused", 1, 3.0),
            result("T2", "torch for-loop", 1, 4.0)]
    text = report.torch_region(rows)
    assert text.startswith("| workload | threads | fastsgd | GB/s | x vs torch for-loop |")
    assert "| at least 2x faster than torch fused | T2 | 1 | 3.00x | - | met |" in text
    assert "| at least 5x faster than torch's for-loop | T2 | 1 | 4.00x | - | missed |" in text
    assert report.torch_region(W2).startswith("(This run did not measure T1 and T2")
