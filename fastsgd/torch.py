"""fastsgd.torch: torch.optim.SGD on CPU torch tensors, stepped by fastsgd's kernel.

Importing this module imports torch; fastsgd itself never does.
"""
import torch
from torch.optim.optimizer import _use_grad_for_differentiable

from fastsgd._native.tensors import DIFFERENTIABLE, FUSED, TensorStepper

__all__ = ["SGD"]


class SGD(torch.optim.SGD):
    """Stochastic gradient descent on CPU torch tensors, bit for bit
    ``torch.optim.SGD(foreach=False)``, each step one call of fastsgd's
    native kernel per group and dtype, in place and without copies.

    A subclass of ``torch.optim.SGD`` with its arguments, its param groups,
    state, ``state_dict`` and hooks, so torch's schedulers,
    ``torch.amp.GradScaler`` and checkpoint code take it; its momentum
    buffers are torch tensors in ``state[p]['momentum_buffer']``, made as
    torch makes them.  A step checks every tensor before it writes any:
    parameters, grads and buffers must be dense CPU tensors of float32,
    float64, float16 or bfloat16, the grads and buffers of their
    parameter's dtype and shape, sharing no memory (a parameter listed
    twice, or two sharing memory, is refused), and a parameter or buffer
    must not have its negative bit set (a grad with it is read resolved, as
    torch reads it), nor be an inference tensor outside
    ``torch.inference_mode()``, as torch's in-place ops refuse.  A tensor
    that is not contiguous is stepped in place through contiguous copies,
    as fastsgd.SGD steps strided numpy arrays (a bfloat16 one needs
    ml_dtypes for its numpy view).  It bumps each stepped
    parameter's version counter as torch's in-place ``add_`` does (just
    before writing it), so autograd still sees a parameter saved for
    backward change.

    Args:
        params: the parameters or parameter groups, as for torch.optim.SGD.
        lr: learning rate, a float or a 1-element tensor (not requiring grad).
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: weight decay (L2 penalty), a float or a 1-element tensor.
        nesterov: enables Nesterov momentum.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted and ignored: the step is the same for every value.
        differentiable: must be False (fastsgd does not differentiate through
            a step; use torch.optim.SGD for that).
        fused: must be False or None (True asks for torch's fused kernel;
            use torch.optim.SGD(fused=True) for it).

    Raises:
        RuntimeError: differentiable=True or fused=True.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        if differentiable:
            raise RuntimeError(DIFFERENTIABLE)
        if fused:
            raise RuntimeError(FUSED)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=False, fused=fused)
        self._stepper = TensorStepper()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._stepper = TensorStepper()

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._stepper.step(self.param_groups, self.state)
        return loss
