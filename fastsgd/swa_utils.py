"""Stochastic weight averaging: torch.optim.swa_utils (torch 2.13) for fastsgd Parameters.

``SWALR`` is torch's scheduler, formula for formula.  ``AveragedModel`` keeps
running averages of a list of Parameters (torch's takes a module: here the
model is its list of parameters, in a fixed order), with torch's
``update_parameters`` rules, ``n_averaged`` and ``state_dict``.  Its
averaging runs natively, one call per dtype for all the parameters
(csrc/average_loop.h), and gives torch's CPU results bit for bit, for
float32, float64, float16 and bfloat16 alike:

* by default (no ``avg_fn`` nor ``multi_avg_fn``), torch's CPU path, which
  is ``get_swa_avg_fn`` per parameter: ``avg + (cur - avg) / (n + 1)``, three
  ops each rounded to the dtype (16-bit ones computed in float32);
* ``get_swa_multi_avg_fn()`` and ``get_ema_multi_avg_fn(decay)``: torch's
  ``_foreach_lerp_(avg, cur, w)`` with ``w = 1 / (n + 1)`` or ``1 - decay``.
  The weight is rounded to the compute type (float32 for 16-bit dtypes);
  with ``|w| < 0.5`` the result is ``avg + w * (cur - avg)``, else
  ``cur + (w - 1) * (cur - avg)``, each a fused multiply-add rounded once
  (torch's vector and scalar code alike on AVX2/AVX-512 CPUs; unfused, as
  torch's, under ``FASTSGD_CPU_CAPABILITY=default``).  As in torch, where
  ``n`` is the model's ``n_averaged`` (an array), ``1 / (n + 1)`` is a
  float32 (torch divides a 0-d long tensor); where it is a Python int, a
  double.

The NaN payloads of 16-bit results are not promised to be torch's (its
scalar remainder and vector body give bfloat16 NaNs different bits).
"""
import math

import numpy as np

from . import _native
from .lr_scheduler import LRScheduler, _format_param, _warn_get_lr_called_within_step
from .parameter import Parameter, is_bfloat16

__all__ = [
    "AveragedModel",
    "SWALR",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
]


def _check_decay(decay):
    if decay < 0.0 or decay > 1.0:
        raise ValueError(
            f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")


def _swa_weight(num_averaged):
    """torch's ``1 / (num_averaged + 1)``: a float32 for an array (as for a
    0-d long Tensor: its reciprocal), a double for a number."""
    if isinstance(num_averaged, np.ndarray):
        return float(np.float32(1.0) / np.float32(num_averaged + 1))
    return 1 / (num_averaged + 1)


def get_ema_multi_avg_fn(decay=0.999):
    """The exponential moving average over lists of arrays, in place:
    ``ema = decay * ema + (1 - decay) * current``, computed as torch's
    ``_foreach_lerp_(ema, current, 1 - decay)`` (see the module's docstring).

    Args:
        decay: in [0, 1] (else ``ValueError``, torch's message).

    Returns:
        ``fn(ema_arrays, current_arrays, num_averaged)``, updating
        ``ema_arrays`` in one native call per dtype.
    """
    _check_decay(decay)

    def ema_update(ema_param_list, current_param_list, _):
        _native.lerp_arrays(list(ema_param_list), list(current_param_list), 1 - decay)

    return ema_update


def get_swa_multi_avg_fn():
    """The equal-weight running average over lists of arrays, in place, as
    torch's: ``_foreach_lerp_(averaged, current, 1 / (num_averaged + 1))``
    (see the module's docstring for the weight's type).

    Returns:
        ``fn(averaged_arrays, current_arrays, num_averaged)``.
    """

    def swa_update(averaged_param_list, current_param_list, num_averaged):
        _native.lerp_arrays(list(averaged_param_list), list(current_param_list),
                            _swa_weight(num_averaged))

    return swa_update


def get_ema_avg_fn(decay=0.999):
    """The exponential moving average of one array, out of place, as
    torch's: ``decay * ema + (1 - decay) * current``, each op rounded to the
    array's dtype (16-bit ones computed in float32, the scalars unrounded).

    Returns:
        ``fn(ema_array, current_array, num_averaged)`` returning a new array.
    """
    _check_decay(decay)

    def ema_update(ema_param, current_param, num_averaged):
        ema, current = np.asarray(ema_param), np.asarray(current_param)
        dtype = ema.dtype
        compute = np.float32 if dtype.itemsize == 2 else dtype.type
        kept = (compute(decay) * ema.astype(compute)).astype(dtype)
        added = (compute(1 - decay) * current.astype(compute)).astype(dtype)
        return (kept.astype(compute) + added.astype(compute)).astype(dtype)

    return ema_update


def get_swa_avg_fn():
    """The equal-weight running average of one array, out of place, as
    torch's: ``averaged + (current - averaged) / (num_averaged + 1)``, each op
    rounded to the array's dtype (AveragedModel's default, natively).

    Returns:
        ``fn(averaged_array, current_array, num_averaged)`` returning a new
        array.
    """

    def swa_update(averaged_param, current_param, num_averaged):
        result = np.array(averaged_param, order="K")
        _native.mean_arrays([result], [np.asarray(current_param)], float(num_averaged + 1))
        return result

    return swa_update


class AveragedModel:
    """Running averages (SWA or EMA) of a list of Parameters, as torch's
    ``torch.optim.swa_utils.AveragedModel`` of a module.

    Args:
        params: the model's Parameters (any iterable of float32, float64,
            float16 or bfloat16 arrays); the averages start as copies of them
            (new Parameters, in the same memory order), which
            :meth:`update_parameters` overwrites on its first call.
        avg_fn: ``fn(averaged, current, n_averaged)`` returning the new
            average of one array (e.g. :func:`get_ema_avg_fn`); it is copied
            into the averaged Parameter.
        multi_avg_fn: ``fn(averaged_list, current_list, n_averaged)``
            updating the arrays of one dtype in place (e.g.
            :func:`get_ema_multi_avg_fn`).  With neither, the equal-weight
            average, computed natively as torch's CPU path does.
        use_buffers: torch averages a module's buffers too when True; a list
            of Parameters has no buffers, so only False is accepted (True
            raises ``ValueError``).

    ``avg_fn``, ``multi_avg_fn`` and ``use_buffers`` are keyword-only: torch's
    second positional argument is a device, which has no counterpart here.
    Passing both functions raises torch's ``AssertionError``.

    Attributes:
        n_averaged: how many times the model was averaged, a 0-d int64 array
            updated in place (torch's 0-d long buffer); it is what the
            functions receive as ``n_averaged``.
    """

    def __init__(self, params, *, avg_fn=None, multi_avg_fn=None, use_buffers=False) -> None:
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        if use_buffers:
            raise ValueError("use_buffers=True has no meaning for fastsgd's AveragedModel: "
                             "it averages a list of Parameters, which has no buffers")
        params = list(params)
        for i, p in enumerate(params):
            _check_float(p, f"params[{i}]")
        self._params: list[np.ndarray] = [Parameter(np.array(p, order="K")) for p in params]
        self.n_averaged = np.array(0, dtype=np.int64)
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = False

    def parameters(self):
        """An iterator over the averaged Parameters, in the model's order."""
        return iter(self._params)

    def update_parameters(self, params):
        """Average the model's current ``params`` (the list the averages were
        made from, or one like it) into the averages.  The first call
        (``n_averaged == 0``) copies them; each later call applies the
        averaging function (see the class).  ``n_averaged`` then grows by 1.

        Every array is checked before any average changes: a list of another
        length, or an array of another shape, dtype or memory order, raises
        ``ValueError`` or ``TypeError``.
        """
        current = self._check_like_averages(list(params))
        if self.n_averaged == 0:
            for averaged, model in zip(self._params, current):
                np.copyto(averaged, model)
        elif self.multi_avg_fn is not None:
            for dtype in dict.fromkeys(p.dtype for p in self._params):
                members = [i for i, p in enumerate(self._params) if p.dtype == dtype]
                self.multi_avg_fn([self._params[i] for i in members],
                                  [current[i] for i in members], self.n_averaged)
        elif self.avg_fn is None:
            _native.mean_arrays(self._params, current, float(self.n_averaged + 1))
        else:
            for averaged, model in zip(self._params, current):
                np.copyto(averaged, self.avg_fn(averaged, model, self.n_averaged))
        self.n_averaged += 1

    def _check_like_averages(self, params):
        if len(params) != len(self._params):
            raise ValueError(f"update_parameters got {len(params)} params, but the "
                             f"AveragedModel averages {len(self._params)}")
        for i, (averaged, p) in enumerate(zip(self._params, params)):
            where = f"params[{i}]"
            _check_float(p, where)
            if p.dtype != averaged.dtype or p.shape != averaged.shape:
                raise ValueError(f"{where} has dtype {p.dtype} and shape {p.shape}, but its "
                                 f"average has dtype {averaged.dtype} and shape "
                                 f"{averaged.shape}")
            if not (p.flags.c_contiguous and averaged.flags.c_contiguous
                    or p.flags.f_contiguous and averaged.flags.f_contiguous):
                raise ValueError(f"{where} must be contiguous in the memory order of its "
                                 f"average ({'C' if averaged.flags.c_contiguous else 'Fortran'})")
        return params

    def state_dict(self):
        """``{"params": [...], "n_averaged": ...}``: the averaged Parameters
        and ``n_averaged`` themselves, not copies (as torch's module
        ``state_dict`` holds its tensors)."""
        return {"params": list(self._params), "n_averaged": self.n_averaged}

    def load_state_dict(self, state_dict):
        """Copy a :meth:`state_dict`'s averages and ``n_averaged`` into this
        model (checked first: nothing changes if they do not match)."""
        missing = {"params", "n_averaged"} - set(state_dict)
        if missing:
            raise KeyError(f"state_dict is missing {sorted(missing)}")
        params = self._check_like_averages_values(list(state_dict["params"]))
        n_averaged = np.asarray(state_dict["n_averaged"])
        if n_averaged.shape != () or n_averaged.dtype.kind not in "iu":
            raise ValueError(f"n_averaged must be an integer scalar, but got an array of dtype "
                             f"{n_averaged.dtype} and shape {n_averaged.shape}")
        for averaged, p in zip(self._params, params):
            averaged[...] = p
        self.n_averaged[...] = n_averaged

    def _check_like_averages_values(self, params):
        if len(params) != len(self._params):
            raise ValueError(f"state_dict holds {len(params)} params, but the "
                             f"AveragedModel averages {len(self._params)}")
        params = [np.asarray(p) for p in params]
        for i, (averaged, p) in enumerate(zip(self._params, params)):
            if p.dtype != averaged.dtype or p.shape != averaged.shape:
                raise ValueError(f"state_dict['params'][{i}] has dtype {p.dtype} and shape "
                                 f"{p.shape}, but the average has dtype {averaged.dtype} and "
                                 f"shape {averaged.shape}")
        return params


def _check_float(p, where):
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{where} must be a numpy array, but got {type(p).__name__}")
    if p.dtype not in _FLOAT_DTYPES and not is_bfloat16(p.dtype):
        raise TypeError(f"{where} must be float32, float64, float16 or bfloat16, but got "
                        f"{p.dtype}")


_FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.float16))


class SWALR(LRScheduler):
    """Anneals each param group's learning rate to its ``swa_lr``, as torch's
    ``torch.optim.swa_utils.SWALR``: over ``anneal_epochs`` epochs, with
    ``lr_t = swa_lr * alpha_t + lr_0 * (1 - alpha_t)``, where ``alpha_t`` is
    ``t`` ("linear") or ``(1 - cos(pi * t)) / 2`` ("cos") for
    ``t = min(1, epoch / max(1, anneal_epochs))``, computed recursively from
    the group's current lr with torch's operations, so the learning rates
    are torch's bit for bit; then it stays at ``swa_lr``.

    Args:
        optimizer: a fastsgd optimizer.
        swa_lr: the final learning rate, for all groups or one per group (a
            list or tuple); stored in each group as ``"swa_lr"``.
        anneal_epochs: the epochs of annealing, an int >= 0 (default 10).
        anneal_strategy: "cos" (default) or "linear".
        last_epoch: the index of the last epoch (default -1).

    Raises:
        ValueError: torch's messages, for a bad strategy, a bad
            ``anneal_epochs`` or a list of ``swa_lr`` of another length than
            the groups.
    """

    def __init__(self, optimizer, swa_lr, anneal_epochs=10, anneal_strategy="cos",
                 last_epoch=-1):
        swa_lrs = _format_param("swa_lr", optimizer, swa_lr)
        for swa_lr, group in zip(swa_lrs, optimizer.param_groups):
            group["swa_lr"] = swa_lr
        if anneal_strategy not in ["cos", "linear"]:
            raise ValueError("anneal_strategy must be one of 'cos' or 'linear', "
                             f"instead got {anneal_strategy}")
        self._set_anneal_func(anneal_strategy)
        if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(
                f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")
        self.anneal_epochs = anneal_epochs
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _linear_anneal(t):
        return t

    @staticmethod
    def _cosine_anneal(t):
        return (1 - math.cos(math.pi * t)) / 2

    @staticmethod
    def _get_initial_lr(lr, swa_lr, alpha):
        if alpha == 1:
            return swa_lr
        return (lr - alpha * swa_lr) / (1 - alpha)

    def get_lr(self):
        """The next learning rate of each param group (use get_last_lr() to
        read the current ones)."""
        _warn_get_lr_called_within_step(self)
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        prev_t = max(0, min(1, (step - 1) / max(1, self.anneal_epochs)))
        prev_alpha = self.anneal_func(prev_t)
        prev_lrs = [self._get_initial_lr(group["lr"], group["swa_lr"], prev_alpha)
                    for group in self.optimizer.param_groups]
        t = max(0, min(1, step / max(1, self.anneal_epochs)))
        alpha = self.anneal_func(t)
        return [group["swa_lr"] * alpha + lr * (1 - alpha)
                for group, lr in zip(self.optimizer.param_groups, prev_lrs)]

    def _set_anneal_func(self, anneal_strategy):
        self._anneal_strategy = anneal_strategy
        if anneal_strategy == "cos":
            self.anneal_func = self._cosine_anneal
        else:
            self.anneal_func = self._linear_anneal

    def state_dict(self):
        """The scheduler's state: every entry of ``self.__dict__`` but the
        optimizer and ``anneal_func``."""
        return {key: value for key, value in self.__dict__.items()
                if key not in ("optimizer", "anneal_func")}

    def load_state_dict(self, state_dict):
        """Load the scheduler's state, as returned by :meth:`state_dict`."""
        self.__dict__.update(state_dict)
        self._set_anneal_func(self._anneal_strategy)
