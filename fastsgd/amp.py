"""fastsgd.amp: GradScaler, torch.amp.GradScaler's loss scaling for fastsgd optimizers.

The same methods, state_dict and scale sequence as ``torch.amp.GradScaler("cpu")``, bit for
bit: the scale is a float32, its inverse ``float32(1 / float64(scale))``, unscaling multiplies
each grad by it in float32 (float64 grads: in float64), and ``update`` grows or backs off the
scale as torch's ``_amp_update_scale_``.  A step with any inf or NaN grad is skipped: it writes
nothing and creates no optimizer state.

An optimizer whose every group has ``master_weights=True`` takes the inverse scale into its
step: the step reads every grad for inf/NaN before it writes anything, then unscales each
16-bit grad in float32 as it steps the float32 master, leaving the grads as they were.
Otherwise ``unscale_`` multiplies the grads in place, as torch does (and, as torch, refuses
float16 grads: "Attempting to unscale FP16 gradients.").
"""
from collections import abc, defaultdict
from enum import Enum
from typing import Any

import numpy as np

from . import _native

__all__ = ["GradScaler", "OptState"]


class OptState(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _refresh_per_optimizer_state():
    return {"stage": OptState.READY, "found_inf_per_device": {}}


def _scaled(value, scale):
    """value * scale in value's dtype, computed as torch multiplies a tensor by
    a float32 0-dim tensor: 16-bit values in float32, then rounded once."""
    array = np.asarray(value)
    if array.dtype.itemsize == 2 and array.dtype.kind in "fV":
        return (array.astype(np.float32) * scale).astype(array.dtype)
    return np.multiply(array, scale, dtype=np.result_type(array.dtype, np.float32))


class GradScaler:
    """Loss scaling for mixed precision, with torch.amp.GradScaler's API.

    ``scaler.scale(loss)`` multiplies a loss (or arrays of them) by the scale;
    ``scaler.step(optimizer)`` unscales the grads and steps the optimizer
    unless a grad is inf or NaN; ``scaler.update()`` halves the scale after a
    skipped step and doubles it after ``growth_interval`` good ones.

    Args:
        init_scale (float): the first scale (default: 2.0**16)
        growth_factor (float): the scale's factor after growth_interval
            steps without inf/NaN (default: 2.0)
        backoff_factor (float): its factor after a step with inf/NaN
            (default: 0.5)
        growth_interval (int): steps without inf/NaN between growths
            (default: 2000)
        enabled (bool): if False, ``step`` just steps and the rest does
            nothing (default: True)
        device (str): accepted for torch's call shape; only "cpu"
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True, *, device="cpu") -> None:
        if device != "cpu":
            raise ValueError(f"fastsgd.amp.GradScaler runs on the CPU, but got device {device!r}")
        self._device = device
        self._enabled = enabled
        if self._enabled:
            if growth_factor <= 1.0:
                raise AssertionError("The growth factor must be > 1.0.")
            if backoff_factor >= 1.0:
                raise AssertionError("The backoff factor must be < 1.0.")
            self._init_scale = init_scale
            self._scale: Any = None  # a float32, set by the first scale()
            self._growth_factor = growth_factor
            self._backoff_factor = backoff_factor
            self._growth_interval = growth_interval
            self._init_growth_tracker = 0
            self._growth_tracker: Any = None
            self._per_optimizer_states: defaultdict = defaultdict(_refresh_per_optimizer_state)

    def _check_scale_growth_tracker(self, funcname):
        fix = ("This may indicate your script did not use scaler.scale(loss or outputs) "
               "earlier in the iteration.")
        if self._scale is None:
            raise AssertionError(f"Attempted {funcname} but _scale is None.  " + fix)
        if self._growth_tracker is None:
            raise AssertionError(f"Attempted {funcname} but _growth_tracker is None.  " + fix)

    def _lazy_init_scale_growth_tracker(self):
        self._scale = np.float32(self._init_scale)
        self._growth_tracker = np.int32(self._init_growth_tracker)

    def scale(self, outputs):
        """outputs multiplied by the scale: an array (or numpy scalar), or a
        list, tuple or other iterable of them (each keeps its dtype)."""
        if not self._enabled:
            return outputs
        if self._scale is None:
            self._lazy_init_scale_growth_tracker()

        def apply_scale(value):
            if isinstance(value, (np.ndarray, np.generic)):
                return _scaled(value, self._scale)
            if isinstance(value, abc.Iterable):
                scaled = map(apply_scale, value)
                return type(value)(scaled) if isinstance(value, (list, tuple)) else scaled
            raise ValueError("outputs must be a Tensor or an iterable of Tensors")

        return apply_scale(outputs)

    def _inv_scale(self):
        return np.float32(1.0 / np.float64(self._scale))

    def _unscale_grads_(self, optimizer, inv_scale, allow_fp16):
        """Multiply every grad of optimizer by inv_scale in place; returns
        found_inf_per_device."""
        grads = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if not allow_fp16 and np.asarray(grad).dtype == np.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                grads.append(grad)
        found = _native.unscale_grads(grads, list(range(len(grads))), float(inv_scale))
        return {self._device: np.float32(found)}

    def unscale_(self, optimizer):
        """Divide ("unscale") the optimizer's grads by the scale, in place, and
        record whether any is inf or NaN (at most once between updates)."""
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update().")
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        optimizer_state["found_inf_per_device"] = self._unscale_grads_(
            optimizer, self._inv_scale(), False)
        optimizer_state["stage"] = OptState.UNSCALED

    def step(self, optimizer, *args, **kwargs):
        """Unscale the grads (unless ``unscale_`` did) and step the optimizer if
        none is inf or NaN; returns what optimizer.step returned, or None."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if (optimizer_state["stage"] is OptState.READY
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            stepper = optimizer._stepper
            stepper.amp_inv_scale, stepper.amp_unscale = self._inv_scale(), True
            stepper.amp_skipped = False
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                stepper.amp_unscale = False
            found = np.float32(stepper.amp_skipped)
            optimizer_state["found_inf_per_device"] = {self._device: found}
            optimizer_state["stage"] = OptState.STEPPED
            return retval
        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) == 0:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        retval = None
        if not sum(float(v) for v in optimizer_state["found_inf_per_device"].values()):
            retval = optimizer.step(*args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def update(self, new_scale=None):
        """Set the scale for the next iteration: new_scale if given, else the
        scale backed off (a step had inf/NaN) or grown (growth_interval
        steps had none), as torch's _amp_update_scale_."""
        if not self._enabled:
            return
        self._check_scale_growth_tracker("update")
        if new_scale is not None:
            if isinstance(new_scale, float):
                self._scale = np.float32(new_scale)
            else:
                reason = ("new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                          "torch.FloatTensor with requires_grad=False.")
                value = np.asarray(new_scale)
                if value.size != 1:
                    raise AssertionError(reason)
                self._scale = np.float32(value.reshape(()))
        else:
            found_infs = [found_inf for state in self._per_optimizer_states.values()
                          for found_inf in state["found_inf_per_device"].values()]
            if len(found_infs) == 0:
                raise AssertionError("No inf checks were recorded prior to update.")
            found_inf_combined = np.float32(sum(found_infs[1:], found_infs[0]))
            self._update_scale(found_inf_combined)
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

    def _update_scale(self, found_inf):
        """torch's _amp_update_scale_ on the CPU: the products in double,
        rounded to the float32 scale."""
        if found_inf:
            self._scale = np.float32(float(self._scale) * self._backoff_factor)
            self._growth_tracker = np.int32(0)
            return
        successful = int(self._growth_tracker) + 1
        if successful == self._growth_interval:
            grown = np.float32(float(self._scale) * self._growth_factor)
            if np.isfinite(grown):
                self._scale = grown
            self._growth_tracker = np.int32(0)
        else:
            self._growth_tracker = np.int32(successful)

    def get_scale(self):
        """The current scale as a Python float (1.0 when disabled)."""
        if self._enabled:
            return self._init_scale if self._scale is None else float(self._scale)
        return 1.0

    def get_growth_factor(self):
        return self._growth_factor

    def set_growth_factor(self, new_factor):
        self._growth_factor = new_factor

    def get_backoff_factor(self):
        return self._backoff_factor

    def set_backoff_factor(self, new_factor):
        self._backoff_factor = new_factor

    def get_growth_interval(self):
        return self._growth_interval

    def set_growth_interval(self, new_interval):
        self._growth_interval = new_interval

    def _get_growth_tracker(self):
        if self._enabled:
            return (self._init_growth_tracker if self._growth_tracker is None
                    else int(self._growth_tracker))
        return 0

    def is_enabled(self):
        return self._enabled

    def state_dict(self):
        """scale, growth_factor, backoff_factor, growth_interval and
        _growth_tracker, as torch's (empty when disabled)."""
        if self._enabled:
            return {
                "scale": self.get_scale(),
                "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval,
                "_growth_tracker": self._get_growth_tracker(),
            }
        return {}

    def load_state_dict(self, state_dict):
        """Load a state_dict of this class or of torch.amp.GradScaler."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        self._init_scale = float(state_dict["scale"])
        if self._scale is not None:
            self._scale = np.float32(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._growth_tracker is not None:
            self._growth_tracker = np.int32(state_dict["_growth_tracker"])

    def __getstate__(self):
        state = self.__dict__.copy()
        if self._enabled:
            if len(self._per_optimizer_states) != 0:
                raise AssertionError("A GradScaler instance may only be pickled at the beginning "
                                     "of an iteration, or at the end after scaler.update().")
            state["_init_scale"] = self.get_scale()
            state["_init_growth_tracker"] = self._get_growth_tracker()
            state["_scale"] = None
            state["_growth_tracker"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
