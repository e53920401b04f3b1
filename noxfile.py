"""The developer tasks, one command each: nox -s tests | lint | docs | sanitize | valgrind | bench.

Every session runs in the current environment (no virtualenv is made, nothing is downloaded),
with the interpreter that runs nox: install the extras first, e.g.
``python -m pip install -e ".[test,dev]"``.  Arguments after ``--`` go to the session's main
command (pytest's, or the bench command's).  docs/contributing.md describes each session.
"""
import pathlib
import shutil
import subprocess
import sys

import nox

ROOT = pathlib.Path(__file__).resolve().parent
PYTHON = sys.executable
BENCH_JSON = "docs/_data/fastsgd-bench.json"

nox.options.sessions = ["tests", "lint", "docs"]  # what plain `nox` runs


def build_in_place(session):
    """Compile the extension next to its sources, so the checkout is importable as it is."""
    session.run(PYTHON, "setup.py", "build_ext", "--inplace", "-j", "2", silent=True)


@nox.session(venv_backend="none")
def tests(session):
    """The whole suite, as CI runs it (add -m slow for the exhaustive cases)."""
    build_in_place(session)
    session.run(PYTHON, "-m", "pytest", *session.posargs)


@nox.session(venv_backend="none")
def lint(session):
    """ruff, mypy, stubtest and cython-lint, as pyproject.toml configures them.

    The commands are tests/test_lint.py's; mypy's stubtest checks the extension's stubs."""
    build_in_place(session)  # mypy's stubtest imports the extension
    session.run(PYTHON, "-m", "pytest", "tests/test_lint.py", "-v", *session.posargs)


@nox.session(venv_backend="none")
def docs(session):
    """The Sphinx site, offline, warnings as errors, into docs/_build/html."""
    build_in_place(session)  # autodoc imports the extension
    session.run(PYTHON, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs",
                "docs/_build/html", *session.posargs)


@nox.session(venv_backend="none")
def sanitize(session):
    """The whole suite under AddressSanitizer and UBSan (or the test paths given after --).

    The extension is built sanitized outside the source tree, the package's Python files
    are copied beside it, and pytest runs from outside the repository, so that every test
    and subprocess imports that build."""
    build = pathlib.Path(session.create_tmp()).resolve() / "asan"
    session.run(PYTHON, "setup.py", "build_ext", "--build-lib", str(build),
                "--build-temp", str(build / "temp"), env={"FASTSGD_SANITIZE": "1"})
    for source in (ROOT / "fastsgd").rglob("*"):
        if source.suffix in (".py", ".pyi", ".typed"):
            target = build / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    runtimes = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                               text=True, check=True).stdout.strip()
                for name in ("libasan.so", "libubsan.so")]
    # Test paths given after -- are the repository's (tests/test_x.py), read from outside it.
    args = [str(ROOT / arg) if (ROOT / arg.split("::")[0]).exists() else arg
            for arg in session.posargs] or [str(ROOT / "tests")]
    env = {"LD_PRELOAD": " ".join(runtimes), "ASAN_OPTIONS": "detect_leaks=0",
           "PYTHONPATH": str(build)}
    session.chdir(build.parent)
    session.run(PYTHON, "-c", "import sys, fastsgd._native as n; "
                f"sys.exit(not n.__file__.startswith({str(build)!r}))", env=env)
    session.run(PYTHON, "-m", "pytest", "-p", "no:cacheprovider", *args, env=env)


@nox.session(venv_backend="none")
def valgrind(session):
    """valgrind memcheck over every native path (tests/test_memory_checkers.py, slow)."""
    build_in_place(session)
    session.run(PYTHON, "-m", "pytest", "tests/test_memory_checkers.py", "-m", "slow",
                *session.posargs)


@nox.session(venv_backend="none")
def bench(session):
    """The full benchmark into docs/_data/, then the docs' tables regenerated from it.

    Run it on a quiet machine; arguments after -- go to the bench command (default:
    --label "full run")."""
    build_in_place(session)
    session.run(PYTHON, "-m", "fastsgd", "bench", "--json", BENCH_JSON,
                *(session.posargs or ["--label", "full run"]))
    session.run(PYTHON, "-m", "fastsgd", "report", BENCH_JSON, "--docs")
