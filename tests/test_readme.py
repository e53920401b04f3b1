"""The README's promises: its first example runs as written, its test command
is what CI runs, and the self-check passes."""
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


def test_first_example_runs_as_written():
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SGD (\nParameter Group 0\n")
    assert result.stdout.rstrip().endswith("0.1")


def test_every_python_example_runs():
    """Each API has an example in the README; each checks itself."""
    examples = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(examples) >= 10
    for example in examples:
        result = subprocess.run([sys.executable, "-c", example], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, example + result.stderr


def test_self_check_passes():
    result = subprocess.run([sys.executable, "-m", "fastsgd", "check", "--steps", "12"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 12 steps bit-identical" in result.stdout
