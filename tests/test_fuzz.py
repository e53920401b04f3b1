"""The coverage-guided fuzzer of fastsgd.load (tests/fuzz_checkpoint.py), run in a child with
a deadline and a memory cap: a short run by default, a long one under -m slow."""
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

FUZZER = Path(__file__).with_name("fuzz_checkpoint.py")
ADDRESS_SPACE = 2 * 2**30  # the child's whole address space: a blow-up is a MemoryError


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_fuzzer(seconds, directory):
    """Fuzz for `seconds`; fail on any crash (an exception other than CheckpointError, a
    loaded file that save would not write), an input running past 10 s, memory past the caps,
    or a fuzzer that outlives its time."""
    result = subprocess.run(
        [sys.executable, str(FUZZER), f"-max_total_time={seconds}", "-timeout=10",
         "-rss_limit_mb=1536", "-malloc_limit_mb=1536", f"-artifact_prefix={directory}/"],
        # TMPDIR: the fuzzer's working files and corpus go where pytest removes them
        cwd=directory, env={**os.environ, "TMPDIR": str(directory)}, preexec_fn=_cap_memory,
        capture_output=True, text=True,
        timeout=seconds + 120)
    tail = result.stderr[-4000:]
    assert result.returncode == 0, tail
    runs = re.search(r"Done (\d+) runs in (\d+) second", result.stderr)
    assert runs and int(runs[1]) > 0, tail
    return int(runs[1]), int(runs[2])


def test_a_short_fuzzing_run_finds_nothing(tmp_path):
    run_fuzzer(10, tmp_path)


@pytest.mark.slow
def test_a_long_fuzzing_run_finds_nothing(tmp_path):
    runs, seconds = run_fuzzer(600, tmp_path)
    print(f"{runs} executions in {seconds} s")
