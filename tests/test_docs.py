"""The documentation's promises: every ```python block of README.md and docs/**/*.md runs
and checks itself, the Sphinx site builds without a warning, and the generated tables are
what the committed benchmark JSON generates.

Each block runs in a fresh interpreter in a temporary directory.  A block whose first line
is ``# mpiexec -n N`` runs under ``mpiexec -n N python -m mpi4py``, with the mpiexec next to
this Python (skipped, saying so, when mpi4py is not installed).
"""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from fastsgd import report

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
MPIEXEC = re.compile(r"# mpiexec -n (\d+)\n")


def python_blocks(path):
    """(line number, code) of each ```python block of a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


BLOCKS = [(path, line, code) for path in PAGES for line, code in python_blocks(path)]


def run_block(code, cwd, timeout=180):
    """Run one block as the docs' convention says; returns the CompletedProcess."""
    script = pathlib.Path(cwd, "block.py")
    script.write_text(code)
    command = [sys.executable, str(script)]
    env = dict(os.environ)
    mpi = MPIEXEC.match(code)
    if mpi:
        if importlib.util.find_spec("mpi4py") is None:
            pytest.skip("a `# mpiexec` block needs mpi4py (pip install -e '.[test]')")
        mpiexec = pathlib.Path(sys.executable).parent / "mpiexec"
        assert mpiexec.exists(), f"mpi4py is installed but {mpiexec} is not"
        command = [str(mpiexec), "-n", mpi.group(1), sys.executable, "-m", "mpi4py", str(script)]
        # Open MPI refuses to start as root without these (CI runs as root); MPICH ignores them.
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("path, line, code", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in BLOCKS])
def test_python_block_runs(path, line, code, tmp_path):
    result = run_block(code, tmp_path)
    assert result.returncode == 0, (f"{path.relative_to(ROOT)}:{line} failed\n{code}\n"
                                    f"{result.stdout}{result.stderr}")


def test_every_block_checks_itself():
    """A block that asserts nothing passes whatever it prints."""
    for path, line, code in BLOCKS:
        assert "assert" in code, f"{path.relative_to(ROOT)}:{line} asserts nothing"


def test_the_readme_tours_the_api_with_an_example_each():
    readme = [code for path, _, code in BLOCKS if path.name == "README.md"]
    for name in ("Parameter", "SGD", "register_step_post_hook", "reference.SGD", "lr_scheduler",
                 "clip_grad_norm_", "fastsgd.save", "set_num_threads", "master_weights",
                 "ml_dtypes.bfloat16", "amp.GradScaler"):
        assert any(name in code for code in readme), name


def test_the_readmes_first_example_prints_the_optimizer_as_torch_does(tmp_path):
    idiom = python_blocks(ROOT / "README.md")[0][1]
    result = run_block(idiom, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SGD (\nParameter Group 0\n")
    assert "\nParameter Group 1\n" in result.stdout


def test_the_harness_finds_blocks_and_runs_mpiexec_blocks_under_mpi(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n```python\nassert 1\n```\n\n```text\nnot run\n```\n\n"
                    "```python\n# mpiexec -n 2\nfrom mpi4py import MPI\n"
                    "assert MPI.COMM_WORLD.Get_size() == 2\n```\n")
    blocks = python_blocks(page)
    assert [line for line, _ in blocks] == [3, 11]
    result = run_block(blocks[1][1], tmp_path)  # skips here without mpi4py
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_generated_tables_are_what_the_committed_json_generates():
    data = json.loads((DOCS / "_data" / "fastsgd-bench.json").read_text())
    assert report.stale_docs(data, ROOT) == [], (
        "regenerate them: python -m fastsgd report docs/_data/fastsgd-bench.json --docs")


def test_the_distributed_tables_are_what_their_committed_json_generates():
    spec = importlib.util.spec_from_file_location("distributed_bench",
                                                  ROOT / "benchmarks" / "distributed.py")
    distributed_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distributed_bench)
    runs = json.loads((DOCS / "_data" / "fastsgd-bench-distributed.json").read_text())["runs"]
    generated = distributed_bench.regions(runs)
    for name in distributed_bench.DOCS:
        text = (ROOT / name).read_text()
        assert report.rewrite(text, generated) == text, (
            f"{name}: regenerate: python benchmarks/distributed.py --report "
            "docs/_data/fastsgd-bench-distributed.json --docs")


def test_the_site_builds_without_a_warning(tmp_path):
    if importlib.util.find_spec("sphinx") is None and not os.environ.get("CI"):
        pytest.skip("sphinx is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "api" / "sgd.html").exists()
