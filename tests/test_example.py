"""examples/train_digits.py runs, learns, and gives the identical loss curve
with fastsgd.reference's optimizer."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_optimizer_gives_the_identical_loss_curve():
    example = load_example()
    losses, accuracy = example.train(epochs=3, progress=False)
    ref_losses, ref_accuracy = example.train(epochs=3, use_reference=True, progress=False)
    assert losses == ref_losses
    assert accuracy == ref_accuracy
    assert losses[-1] < losses[0] / 4  # it learns


def test_script_prints_the_test_accuracy():
    result = subprocess.run([sys.executable, str(SCRIPT), "--epochs", "8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().rsplit(" ", 1)[1])
    assert accuracy > 0.9
