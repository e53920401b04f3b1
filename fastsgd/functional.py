"""Functional SGD with the call shape of torch.optim.sgd.sgd."""
from . import _native

__all__ = ["sgd"]


def sgd(params, d_p_list, momentum_buffer_list, has_sparse_grad=False, foreach=None,
        fused=None, *, weight_decay, momentum, lr, dampening, nesterov, maximize):
    """Update ``params`` in place with their grads ``d_p_list``.

    ``momentum_buffer_list`` has one entry per param when momentum != 0; a
    ``None`` entry is a first step, and is replaced by the new buffer.
    ``has_sparse_grad``, ``foreach`` and ``fused`` are accepted for torch
    compatibility: every call takes the same multi-tensor native path.
    """
    hyper = {"lr": lr, "momentum": momentum, "dampening": dampening,
             "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize}
    new_buffers = _native.sgd(params, d_p_list, momentum_buffer_list, hyper)
    for i, buf in new_buffers:
        momentum_buffer_list[i] = buf
