"""64-bit indexing: a parameter of more than 2**31 elements steps correctly.

Marked slow (8 GiB): python -m pytest tests/test_large.py -m slow
"""
import numpy as np
import pytest

import fastsgd


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_parameter_of_more_than_2_31_elements(threads):
    previous = fastsgd.get_num_threads()
    fastsgd.set_num_threads(threads)
    try:
        n = 2 ** 31 + 17
        p = fastsgd.Parameter(np.ones(n, np.float32))
        p.grad = p.view(np.ndarray)  # the parameter's own memory: no second 8 GiB
        fastsgd.SGD([p], lr=0.25).step()  # p - 0.25 * p
        assert p.min() == p.max() == np.float32(0.75)
        p[2 ** 31 + 3] = 2.0
        fastsgd.SGD([p], lr=0.5).step()
        assert p[2 ** 31 + 3] == 1.0 and p[0] == p[-1] == np.float32(0.375)
    finally:
        fastsgd.set_num_threads(previous)
