"""examples/train_digits.py runs, learns, and gives the identical loss curve
with fastsgd.reference's optimizer; examples/train_digits_autograd.py, its
model with autograd's grads, runs and learns."""
import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "train_digits.py"
AUTOGRAD_SCRIPT = EXAMPLES / "train_digits_autograd.py"


def load_example(script=SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
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


def test_autograd_computes_the_hand_written_grads(monkeypatch):
    pytest.importorskip("autograd")
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as when run: it imports train_digits
    example = load_example(AUTOGRAD_SCRIPT)
    hand = load_example()
    x, _, y, _ = hand.load_data()
    model = hand.MLP(np.random.default_rng(0))
    params = model.parameters()
    loss = model.loss_and_backward(x[:64], y[:64])
    auto_loss, grads = example.loss_and_grads(params, x[:64], y[:64])
    assert abs(float(auto_loss) - loss) < 1e-6
    for p, g in zip(params, grads):
        assert type(g) is np.ndarray and g.dtype == p.dtype
        np.testing.assert_allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_autograd_script_learns():
    pytest.importorskip("autograd")
    result = subprocess.run([sys.executable, str(AUTOGRAD_SCRIPT), "--epochs", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loss, accuracy = (float(word.rstrip(",")) for word in result.stdout.split()[3::3])
    assert accuracy > 0.9 and loss < 0.5
