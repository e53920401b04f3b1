"""HIPS autograd differentiates with respect to fastsgd.Parameters whichever
of the two the program imports first, and fastsgd never imports autograd."""
import subprocess
import sys

import pytest

pytest.importorskip("autograd")

GRAD_OF_A_PARAMETER = """
import numpy as np
from autograd import grad
p = fastsgd.Parameter(np.arange(3, dtype=np.float32))
p.grad = grad(lambda w: anp.sum(w ** 2))(p)
assert type(p.grad) is np.ndarray and p.grad.dtype == np.float32
assert np.array_equal(p.grad, [0.0, 2.0, 4.0])
scalar = fastsgd.Parameter(np.float32(3.0))
scalar.grad = grad(lambda w: w * w)(scalar)  # a numpy scalar: taken as a 0-d grad
assert scalar.grad == 6.0
"""


def run(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("imports", [
    "import autograd.numpy as anp\nimport fastsgd",
    "import fastsgd\nimport autograd.numpy as anp",
    "import fastsgd\nfrom autograd import grad\nimport autograd.numpy.numpy_boxes\n"
    "import autograd.numpy as anp",
], ids=["autograd-first", "fastsgd-first", "autograd-core-then-numpy"])
def test_autograd_differentiates_parameters_in_any_import_order(imports):
    run(imports + GRAD_OF_A_PARAMETER)


def test_fastsgd_never_imports_autograd():
    run("import sys\nimport fastsgd\n"
        "assert not any(name.startswith('autograd') for name in sys.modules)\n"
        "import autograd.numpy\n"
        "assert autograd.numpy.__loader__ is autograd.numpy.__spec__.loader\n"
        "assert type(autograd.numpy.__loader__).__module__ != 'fastsgd.autodiff'\n")


def test_register_autograd_by_hand_is_idempotent():
    run("import fastsgd\nfastsgd.autodiff.register_autograd()\n"
        "fastsgd.autodiff.register_autograd()\nimport autograd.numpy as anp" + GRAD_OF_A_PARAMETER)
