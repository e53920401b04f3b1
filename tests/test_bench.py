"""The benchmark command runs and reports what it measured (no timing is
asserted: speed lives in benchmarks/)."""
import json
import subprocess
import sys

import numpy as np

import fastsgd
from fastsgd import bench


def test_resnet50_shapes_are_torchvisions():
    shapes = bench.resnet50_shapes()
    assert len(shapes) == 161
    assert sum(int(np.prod(s)) for s in shapes) == 25_557_032


def test_bench_command_prints_a_table_and_writes_json_and_a_chart(tmp_path):
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "fastsgd", "bench", "--workloads", "W4", "--threads", "1",
         "--budget", "0.02", "--json", str(out), "--png", str(chart)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| W4 one tensor of 100, f32 | 1 |" in result.stdout
    assert "[1/1] W4 1T: fastsgd" in result.stderr  # progress
    data = json.loads(out.read_text())
    peers = {r["peer"] for r in data["results"]}
    assert {"fastsgd", "roofline", "reference"} <= peers
    assert all(r["seconds"] > 0 and r["gb_per_s"] > 0 for r in data["results"])
    assert data["machine"]["kernel"] == fastsgd.cpu_capability()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_makes_the_same_traffic_as_a_step():
    """The roofline's stream loop reads param, grad, buffer and writes param,
    buffer: each pass adds grad to the buffer and the buffer to the param."""
    p = fastsgd.Parameter(np.zeros(1000, np.float32))
    g = np.full(1000, 2.0, np.float32)
    b = np.ones(1000, np.float32)
    roofline = fastsgd._native.Roofline([p], [g], [b])
    roofline()
    assert np.all(b == 3.0) and np.all(p == 3.0)
