"""Memory checkers over every native path: the numpy optimizers'
(tests/data/native_paths.py) and fastsgd.torch.SGD's (tests/data/torch_paths.py).

Both are slow and marked so: python -m pytest tests/test_memory_checkers.py -m slow
The whole suite runs under the sanitizers with `nox -s sanitize` (docs/reliability.md).
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DRIVERS = [ROOT / "tests" / "data" / "native_paths.py", ROOT / "tests" / "data" / "torch_paths.py"]
# A report is ours when one of its frames is in the extension or csrc/.
OUR_FRAME = re.compile(r"(fastsgd_7_native|fastsgd/_native/|sgd_impls\.c|driver\.c|_loop\.h)")
REPORT = re.compile(r"(Invalid (read|write|free)|uninitialised|Mismatched|definitely lost|"
                    r"Syscall param|Source and destination overlap)")
# The interpreter running Python code, which our code may call (importlib, a property):
# a report raised in there is the interpreter's unless the value came from us.
INTERPRETER = re.compile(r"_PyEval_EvalFrameDefault|_PyEval_Vector")


def is_ours(block):
    """Whether a valgrind report is ours: a frame of ours among the innermost frames
    (those before the interpreter's, which runs the Python code ours may call) of where
    it was found or of where its value was made."""
    return bool(REPORT.search(block)) and any(
        OUR_FRAME.search(_innermost(stack)) for stack in block.split("was created by"))


def _innermost(stack):
    lines = []
    for line in stack.splitlines():
        if INTERPRETER.search(line):
            break
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
@pytest.mark.parametrize("driver", DRIVERS, ids=lambda path: path.stem)
def test_valgrind_memcheck_reports_nothing_in_fastsgd(driver):
    result = subprocess.run(
        ["valgrind", "--tool=memcheck", "--leak-check=full", "--num-callers=40",
         "--track-origins=yes", sys.executable, str(driver)],
        env=dict(os.environ, PYTHONMALLOC="malloc"), capture_output=True, text=True,
        timeout=1800)
    assert "memcheck drive done" in result.stdout, result.stderr[-3000:]
    blocks = re.split(r"\n==\d+== \n", result.stderr)
    ours = [b for b in blocks if is_ours(b)]
    assert ours == [], "\n\n".join(ours[:3])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_address_and_undefined_behaviour_sanitizers_report_nothing(tmp_path):
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    ubsan = subprocess.run(["gcc", "-print-file-name=libubsan.so"], capture_output=True,
                           text=True).stdout.strip()
    if not (os.path.isabs(asan) and os.path.isabs(ubsan)):
        pytest.skip("gcc has no sanitizer runtimes")
    lib = tmp_path / "lib"
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=dict(os.environ, FASTSGD_SANITIZE="1"), capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    shutil.copytree(ROOT / "fastsgd", lib / "fastsgd", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    for driver in DRIVERS:
        run = subprocess.run(
            [sys.executable, str(driver)], cwd=tmp_path, capture_output=True, text=True,
            env=dict(os.environ, PYTHONPATH=str(lib), LD_PRELOAD=f"{asan} {ubsan}",
                     ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="halt_on_error=1"),
            timeout=900)
        assert run.returncode == 0, (driver.name, run.stderr[-3000:])
        assert "memcheck drive done" in run.stdout
        assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr
