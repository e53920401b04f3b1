"""Launching tests under MPI: where mpiexec is, and a run that cannot hang."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest


def mpiexec():
    """The mpiexec of the MPI that mpi4py loads: pip's mpich wheel installs it
    next to this Python (a venv's bin/), which PATH may not list."""
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def require_mpi():
    """Skip unless mpi4py and an mpiexec are installed (`pip install ".[distributed]"`)."""
    pytest.importorskip("mpi4py")
    if mpiexec() is None:
        pytest.skip("no mpiexec: pip install mpich (the 'distributed' extra)")


def run(ranks, *args, timeout=120, python=("-m", "mpi4py"), cwd=None):
    """``mpiexec -n ranks python -m mpi4py args...`` (in ``cwd``): the completed process.

    On timeout the whole process group (mpiexec, its proxy and every rank)
    is killed and the test fails: a hang is a failure, never a stuck suite.
    """
    command = [mpiexec(), "-n", str(ranks), sys.executable, *python, *map(str, args)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               text=True, start_new_session=True, cwd=cwd,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} hung for {timeout} s\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
