"""Runs every path of fastsgd.torch.SGD's step (tensors read through DLPack's
exchange API and through torch's Python API; all four dtypes; contiguous,
dense-permuted and staged tensors; first and later steps; negated grads;
interleaved views and a grad between them; a parameter moved and a grad changed in place; refusals)
for the memory checkers in tests/test_memory_checkers.py."""
import torch

import fastsgd.torch
from fastsgd._native.tensors import _set_exchange_api

torch.manual_seed(0)


def layouts(dtype):
    """Parameters in each layout the step treats its own way."""
    base = torch.randn(6, 3, dtype=dtype)
    return [torch.nn.Parameter(torch.randn(37, 5, dtype=dtype)),  # contiguous
            torch.nn.Parameter(torch.randn(5, 37, dtype=dtype).t()),  # dense, permuted
            torch.nn.Parameter(torch.randn(6, 8, dtype=dtype)[:, ::2]),  # staged
            torch.nn.Parameter(base[:, 0]), torch.nn.Parameter(base[:, 1]),  # interleaved
            torch.nn.Parameter(torch.randn(0, 4, dtype=dtype))]  # empty


def refused(opt):
    try:
        opt.step()
    except (RuntimeError, TypeError, ValueError):
        return
    raise AssertionError("the step was not refused")


for exchange_api in (True, False):
    _set_exchange_api(exchange_api)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        params = layouts(dtype)
        for options in (dict(momentum=0.9, nesterov=True, weight_decay=0.1),
                        dict(momentum=0.9, dampening=0.2, maximize=True), dict()):
            opt = fastsgd.torch.SGD(params, lr=0.1, **options)
            for step in range(3):
                for i, p in enumerate(params):
                    p.grad = None if (i + step) % 4 == 3 else torch.randn_like(p)
                if dtype == torch.float32:
                    params[0].grad = torch._neg_view(torch.randn(37, 5))
                opt.step()
            params[0].data = params[0].data.clone()  # moved
            grad = params[0].grad = torch.randn(37, 5, dtype=dtype)
            grad.resize_(185)  # changed in place after its assignment
            refused(opt)
            params[0].grad = torch.randn(37, 5, dtype=dtype)
            params[2].grad = params[0].detach()[:6, :4]  # inside another parameter
            refused(opt)
            params[2].grad = torch.randn(6, 4, dtype=dtype)
            # base[:, 2], between the interleaved parameters' elements
            params[3].grad = params[3].detach().as_strided((6,), (3,), 2)
            opt.step()
print("memcheck drive done")
