"""The build's promises: no -march=native, and a serial build with a warning
when the compiler has no OpenMP."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_default_build_targets_no_particular_cpu():
    for name in ("setup.py", "pyproject.toml"):
        assert "-march=native" not in (ROOT / name).read_text()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("openmp", [[], ["-fopenmp"]], ids=["serial", "openmp"])
def test_kernels_compile_without_a_warning(openmp):
    sources = [str(ROOT / "csrc" / name) for name in ("sgd_impls.c", "driver.c")]
    result = subprocess.run(
        ["gcc", "-std=c11", "-O2", "-ffp-contract=off", *openmp, "-Wall", "-Wextra",
         "-Wconversion", "-Wshadow", "-Wpedantic", "-Werror", "-fsyntax-only", *sources],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_builds_and_steps_without_openmp(tmp_path):
    lib = tmp_path / "lib"
    env = dict(os.environ, FASTSGD_NO_OPENMP="1")
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "building without OpenMP" in build.stderr
    shutil.copytree(ROOT / "fastsgd", lib / "fastsgd", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    check = (
        "import numpy as np, fastsgd\n"
        "assert not fastsgd.has_openmp() and fastsgd.get_num_threads() == 1\n"
        "fastsgd.set_num_threads(4)\n"
        "assert fastsgd.get_num_threads() == 1\n"
        "ps = [fastsgd.Parameter(np.linspace(-1, 1, n)) for n in (5, 300_000)]\n"
        "rs = [fastsgd.Parameter(np.linspace(-1, 1, n)) for n in (5, 300_000)]\n"
        "for p, r in zip(ps, rs): p.grad = r.grad = np.cos(np.arange(p.size))\n"
        "a = fastsgd.SGD(ps, lr=0.1, momentum=0.9); b = fastsgd.reference.SGD(rs, lr=0.1, momentum=0.9)\n"
        "for _ in range(3): a.step(); b.step()\n"
        "assert all(np.array_equal(p, r) for p, r in zip(ps, rs))\n"
        "print('serial ok')\n")
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(lib)))
    assert run.returncode == 0, run.stderr
    assert "serial ok" in run.stdout
