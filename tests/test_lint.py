"""The linters and the type checker pass, as configured in pyproject.toml: ruff,
mypy (and stubtest: the extension's stubs name what it has), cython-lint.

A tool that is not installed skips its test, except in CI (CI is set), where
the test extra installs every one of them.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINTED = ["fastsgd", "tests", "examples", "benchmarks", "noxfile.py", "docs/conf.py"]


def run_tool(module, *args, timeout=300):
    if importlib.util.find_spec(module) is None and not os.environ.get("CI"):
        pytest.skip(f"{module} is not installed (pip install -e '.[lint]')")
    command = [sys.executable, "-m", module, *args]
    if module == "cython_lint":  # it has no __main__
        command[1:3] = ["-c", "import sys; from cython_lint.cython_lint import main; "
                              "sys.exit(main(sys.argv[1:]))"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"


def test_ruff():
    run_tool("ruff", "check", *LINTED)


def test_mypy():
    run_tool("mypy")  # the files and settings are pyproject.toml's


def test_the_extensions_stubs_match_what_it_has():
    # with pyproject.toml's mypy settings, so that it skips the optional
    # dependencies' missing stubs as mypy does
    run_tool("mypy.stubtest", "fastsgd._native", "--allowlist",
             str(ROOT / "tests" / "stubtest_allowlist.txt"),
             "--mypy-config-file", str(ROOT / "pyproject.toml"))


def test_cython_lint():
    run_tool("cython_lint", "fastsgd")
