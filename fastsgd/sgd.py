"""fastsgd.SGD: torch.optim.SGD's interface, stepped by the native kernel."""
import numpy as np

from ._native import NO_AUTOGRAD, SGDStepper
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
        master_weights (bool): for float16/bfloat16 parameters, keep a
            float32 copy of each (``state[p]["master_param"]``) and a float32
            momentum buffer; a step reads the 16-bit grad, steps the master
            as a float32 parameter and writes the parameter as the master
            rounded to its dtype, in one pass (default: False).  With
            :class:`fastsgd.amp.GradScaler`, the unscale and the inf/NaN
            check happen within the step, before anything is written.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, master_weights=False):
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
        if master_weights:  # only then: param_groups and repr stay torch's otherwise
            defaults["master_weights"] = True
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise RuntimeError(NO_AUTOGRAD)
        self._stepper = SGDStepper()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._stepper = SGDStepper()
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    @property
    def _step_supports_amp_scaling(self):
        """GradScaler's protocol (as torch's fused optimizers): when every
        group has master weights, the step unscales and checks the grads
        itself (GradScaler sets ``_stepper.amp_unscale`` and
        ``amp_inv_scale``, and reads ``amp_skipped``)."""
        return all(group.get("master_weights") for group in self.param_groups)

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            loss = closure()

        self._stepper.step(self.param_groups, self.state)
        return loss

    # --------------------------------------------------- master weights

    def _master_params(self):
        return {id(p) for group in self.param_groups if group.get("master_weights")
                for p in group["params"]}

    def _cast_state_value(self, param, value, key):
        """A master-weights parameter's master and momentum stay float32
        (a float32 state loads as is, a 16-bit one is widened)."""
        if key in ("master_param", "momentum_buffer") and id(param) in self._loading_masters:
            cast = np.empty(param.shape, np.float32, order="F" if np.isfortran(param) else "C")
            cast[...] = value
            return cast
        return super()._cast_state_value(param, value, key)

    _loading_masters: frozenset = frozenset()

    def load_state_dict(self, state_dict):
        """torch's load_state_dict; groups with master weights keep them (a
        torch or float32 state_dict has no such option) and their state
        stays float32."""
        masters = [group.get("master_weights", False) for group in self.param_groups]
        self._loading_masters = self._master_params()
        try:
            super().load_state_dict(state_dict)
        finally:
            del self._loading_masters
        for group, master in zip(self.param_groups, masters):
            if master:
                group.setdefault("master_weights", True)

