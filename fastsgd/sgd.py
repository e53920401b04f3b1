"""fastsgd.SGD: torch.optim.SGD's interface, stepped by the native kernel."""
import numpy as np

from ._native import SGDPlan
from .optimizer import Optimizer

__all__ = ["SGD"]


class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with momentum, as torch.optim.SGD.

    For each parameter with a grad, in this order (torch's for-loop path):

    .. code-block:: text

        d = -grad if maximize else grad
        d = d + weight_decay * p                    if weight_decay != 0
        buf = d                                     first step of p (no dampening)
        buf = momentum * buf + (1 - dampening) * d  later steps
        d = d + momentum * buf if nesterov else buf if momentum != 0
        p = p - lr * d

    Every group's step runs as one native call per dtype; all groups are
    validated before any array is written.  ``p.grad`` is never modified.

    Args:
        params (iterable): Parameters, ``(name, Parameter)`` tuples, or dicts
            defining parameter groups.
        lr (float): learning rate (default: 1e-3)
        momentum (float): momentum factor (default: 0)
        dampening (float): dampening for momentum (default: 0)
        weight_decay (float): weight decay, L2 penalty (default: 0)
        nesterov (bool): enables Nesterov momentum (default: False)
        maximize (bool): maximize the objective instead of minimizing (default: False)
        foreach, fused: accepted and kept in the groups so torch code runs
            unchanged; every step takes the same multi-tensor native path.
        differentiable: must be False; fastsgd has no autograd.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        if isinstance(lr, np.ndarray) and lr.size != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise RuntimeError(_NO_AUTOGRAD)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _plan_group(self, group_index, group):
        """A validated, not yet run, step of one group."""
        if group["differentiable"]:
            raise RuntimeError(_NO_AUTOGRAD)
        params = group["params"]
        grads = [p.grad for p in params]
        buffers = []
        if group["momentum"] != 0:
            state = self.state
            # .get, not state[p]: a step that fails validation must not add
            # state entries, and torch adds none for params without grad.
            buffers = [state.get(p, _NO_STATE).get("momentum_buffer") if g is not None else None
                       for p, g in zip(params, grads)]
        return SGDPlan(params, grads, buffers, group, group_index)

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            loss = closure()

        plans = [self._plan_group(i, group) for i, group in enumerate(self.param_groups)]
        for group, plan in zip(self.param_groups, plans):
            plan.run()
            params = group["params"]
            for i, buf in plan.new_buffers:
                self.state[params[i]]["momentum_buffer"] = buf
        return loss


_NO_STATE = {}
_NO_AUTOGRAD = "fastsgd has no autograd: differentiable=True is not supported"
