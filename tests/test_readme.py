"""The README's promises: its test command is what CI runs, and the self-check
passes.  Its examples run in tests/test_docs.py, with every page's."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    commands = re.match(r"# fastsgd\n\n```sh\n(.*?)\n```", README, re.S).group(1).splitlines()
    assert len(commands) == 2
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_self_check_passes():
    result = subprocess.run([sys.executable, "-m", "fastsgd", "check", "--steps", "12"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 12 steps bit-identical" in result.stdout
