"""The Optimizer base class: torch.optim.Optimizer's bookkeeping over numpy arrays.

Constructor rules, param_groups, per-group defaults, state, state_dict layout,
hooks and error messages follow torch 2.13 case for case.  Where torch says
"Tensor" this module says "Parameter": the arrays an optimizer updates are
fastsgd.Parameter, the numpy array that carries a `.grad`.  Subclasses only
implement `step`; the hooks around it are wrapped onto the class's `step` the
first time one of its instances is made, as torch does.
"""
import functools
import warnings
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from itertools import chain

import numpy as np

from .parameter import Parameter

__all__ = [
    "Optimizer",
    "OptimizerState",
    "ParamState",
    "RemovableHandle",
    "required",
    "register_optimizer_step_pre_hook",
    "register_optimizer_step_post_hook",
]


class _RequiredParameter:
    """Singleton marking a hyperparameter every param group must give."""

    def __repr__(self):
        return "<required parameter>"


required = _RequiredParameter()


_MUTATORS = ("__init__", "__setitem__", "__delitem__", "__ior__", "clear", "pop",
             "popitem", "setdefault", "update")


def _counts_changes(cls):
    """Make every mutating method and operator of `cls` (that `cls` does not
    define itself) count a change in OptimizerState.version."""
    base = cls.__bases__[0]
    for name in _MUTATORS:
        if name not in cls.__dict__:
            setattr(cls, name, _counting(getattr(base, name), f"{cls.__name__}.{name}"))
    return cls


def _counting(method, qualname):
    @functools.wraps(method)
    def mutate(self, *args, **kwargs):
        OptimizerState.version += 1
        return method(self, *args, **kwargs)

    mutate.__qualname__ = qualname
    return mutate


@_counts_changes
class ParamState(dict):
    """The state of one parameter (e.g. ``{'momentum_buffer': array}``): a
    dict whose changes count in ``OptimizerState.version``."""


@_counts_changes
class OptimizerState(defaultdict):
    """``optimizer.state``: a defaultdict of ParamState keyed by parameter,
    as torch's ``defaultdict(dict)``.

    ``version`` counts every change made to any OptimizerState or ParamState
    through its methods or operators (entries that ``state[p]`` creates
    included).  A step keeps the momentum buffers it found while the version
    stands; a state entry that is a plain dict is looked up on every step
    instead.  Only dict's methods called unbound on it, as in
    ``dict.__setitem__(state, ...)``, go unseen.
    """

    version = 0

    def __init__(self, default_factory=ParamState, *args, **kwargs):
        OptimizerState.version += 1
        super().__init__(default_factory, *args, **kwargs)


class RemovableHandle:
    """Handle returned by the hook registrations; `remove()` unregisters the hook.

    Same semantics as torch.utils.hooks.RemovableHandle: ids are unique across
    all hook dicts, and a handle does not keep its dict alive.
    """

    next_id = 0

    def __init__(self, hooks_dict):
        self.hooks_dict_ref = weakref.ref(hooks_dict)
        self.id = RemovableHandle.next_id
        RemovableHandle.next_id += 1

    def remove(self):
        hooks_dict = self.hooks_dict_ref()
        if hooks_dict is not None and self.id in hooks_dict:
            del hooks_dict[self.id]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.remove()


_global_optimizer_pre_hooks: "OrderedDict[int, Callable]" = OrderedDict()
_global_optimizer_post_hooks: "OrderedDict[int, Callable]" = OrderedDict()


def register_optimizer_step_pre_hook(hook):
    """Register a pre hook common to all optimizers: ``hook(optimizer, args, kwargs)``."""
    handle = RemovableHandle(_global_optimizer_pre_hooks)
    _global_optimizer_pre_hooks[handle.id] = hook
    return handle


def register_optimizer_step_post_hook(hook):
    """Register a post hook common to all optimizers: ``hook(optimizer, args, kwargs)``."""
    handle = RemovableHandle(_global_optimizer_post_hooks)
    _global_optimizer_post_hooks[handle.id] = hook
    return handle


def _typename(obj):
    """torch.typename for anything that is not a torch.Tensor."""
    module = getattr(obj, "__module__", "") or ""
    if hasattr(obj, "__qualname__"):
        qualname = obj.__qualname__
    elif hasattr(obj, "__name__"):
        qualname = obj.__name__
    else:
        module = obj.__class__.__module__ or ""
        qualname = obj.__class__.__qualname__
    if module in {"", "builtins"}:
        return qualname
    return f"{module}.{qualname}"


def _with_step_hooks(step):
    """Wrap a subclass's step so that it runs the global and per-optimizer hooks."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        # Tested before looping: a step without hooks allocates nothing.
        if _global_optimizer_pre_hooks or self._optimizer_step_pre_hooks:
            args, kwargs = _run_pre_hooks(step, self, args, kwargs)
        # step(args[0]) is a plain call, which the interpreter runs without the
        # argument packing of step(*args, **kwargs): ~80 ns, 4% of a one-tensor step.
        out = step(args[0]) if len(args) == 1 and not kwargs else step(*args, **kwargs)
        if self._optimizer_step_post_hooks or _global_optimizer_post_hooks:
            for hook in chain(list(self._optimizer_step_post_hooks.values()),
                              list(_global_optimizer_post_hooks.values())):
                hook(self, args, kwargs)
        return out

    wrapper.hooked = True
    return wrapper


def _run_pre_hooks(step, optimizer, args, kwargs):
    for hook in chain(list(_global_optimizer_pre_hooks.values()),
                      list(optimizer._optimizer_step_pre_hooks.values())):
        result = hook(optimizer, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(
                    f"{step} must return None or a tuple of (new_args, new_kwargs), "
                    f"but got {result}.")
    return args, kwargs


class Optimizer:
    r"""Base class for all optimizers.

    Args:
        params (iterable): an iterable of :class:`fastsgd.Parameter` s, of
            ``(name, Parameter)`` tuples, or of :class:`dict` s. Specifies what
            arrays should be optimized.
        defaults (dict): a dict containing default values of optimization
            options (used when a parameter group doesn't specify them).

    Parameters need to be given in collections with a deterministic order
    (not sets), because ``state_dict`` refers to them by position.
    """

    def __init__(self, params, defaults):
        self.defaults = defaults
        self._init_hook_dicts()
        self._patch_step_function()

        if isinstance(params, np.ndarray):
            raise TypeError(
                "params argument given to the optimizer should be "
                "an iterable of Parameters or dicts, but got " + _typename(params))

        self.state = OptimizerState()
        self.param_groups = []

        param_groups = list(params)
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]

        for param_group in param_groups:
            self.add_param_group(param_group)

    _HOOK_DICTS = (
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    )

    def _init_hook_dicts(self):
        for name in self._HOOK_DICTS:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())

    def _patch_step_function(self):
        cls = type(self)
        if not getattr(cls.step, "hooked", False):
            cls.step = _with_step_hooks(cls.step)

    def __getstate__(self):
        # Hooks are not pickled, as in torch: they are often closures.
        return {
            "defaults": self.defaults,
            "state": self.state,
            "param_groups": self.param_groups,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_hook_dicts()
        self._patch_step_function()
        self.defaults.setdefault("differentiable", False)

    def __repr__(self):
        format_string = self.__class__.__name__ + " ("
        for i, group in enumerate(self.param_groups):
            format_string += "\n"
            format_string += f"Parameter Group {i}\n"
            for key in sorted(group.keys()):
                if key != "params":
                    format_string += f"    {key}: {group[key]}\n"
        format_string += ")"
        return format_string

    # ----------------------------------------------------------------- hooks

    def register_step_pre_hook(self, hook):
        """Register ``hook(optimizer, args, kwargs) -> None or (new_args, new_kwargs)``,
        called before each step."""
        return self._register(self._optimizer_step_pre_hooks, hook, prepend=False)

    def register_step_post_hook(self, hook):
        """Register ``hook(optimizer, args, kwargs) -> None``, called after each step."""
        return self._register(self._optimizer_step_post_hooks, hook, prepend=False)

    def register_state_dict_pre_hook(self, hook, prepend=False):
        """Register ``hook(optimizer) -> None``, called before ``state_dict()``."""
        return self._register(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend=False):
        """Register ``hook(optimizer, state_dict) -> state_dict or None``, called
        after ``state_dict()``; a returned dict replaces the result."""
        return self._register(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend=False):
        """Register ``hook(optimizer, state_dict) -> state_dict or None``, called
        before ``load_state_dict()``; a returned dict is loaded instead."""
        return self._register(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend=False):
        """Register ``hook(optimizer) -> None``, called after ``load_state_dict()``."""
        return self._register(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    @staticmethod
    def _register(hooks_dict, hook, prepend):
        handle = RemovableHandle(hooks_dict)
        hooks_dict[handle.id] = hook
        if prepend:
            hooks_dict.move_to_end(handle.id, last=False)
        return handle

    # ------------------------------------------------------------ state dict

    def state_dict(self):
        """The optimizer's state as a dict with torch's layout.

        ``state`` maps each parameter's index (its position counted across all
        groups) to its state; ``param_groups`` holds each group's options with
        ``params`` replaced by those indices, last.  Arrays are not copied.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)

        param_mappings = {}
        start_index = 0

        def pack_group(group):
            nonlocal start_index
            packed = {k: v for k, v in group.items() if k != "params"}
            param_mappings.update({
                id(p): i
                for i, p in enumerate(group["params"], start_index)
                if id(p) not in param_mappings
            })
            packed["params"] = [param_mappings[id(p)] for p in group["params"]]
            start_index += len(packed["params"])
            return packed

        param_groups = [pack_group(g) for g in self.param_groups]
        packed_state = {
            (param_mappings[id(k)] if isinstance(k, np.ndarray) else k): v
            for k, v in self.state.items()
        }
        state_dict = {"state": packed_state, "param_groups": param_groups}

        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    def _cast_state_value(self, param, value, key):
        """An array of the state as the optimizer keeps it.

        Arrays take the parameter's dtype (``step`` excepted), as in torch.
        Unlike torch's ``.to()``, arrays are always copied, laid out like the
        parameter: training then never writes into the dict that was loaded,
        nor into a read-only or memory-mapped array.
        """
        if key == "step":
            return np.array(value)
        if value.shape != param.shape:
            return np.array(value, dtype=param.dtype)
        cast = np.empty_like(param, subok=False)
        cast[...] = value
        return cast

    def load_state_dict(self, state_dict):
        """Load optimizer state from a dict made by ``state_dict()`` (this
        optimizer's or torch's, with tensors turned into arrays)."""
        state_dict = state_dict.copy()

        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result

        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])

        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        param_lens = (len(g["params"]) for g in groups)
        saved_lens = (len(g["params"]) for g in saved_groups)
        if any(p_len != s_len for p_len, s_len in zip(param_lens, saved_lens)):
            raise ValueError(
                "loaded state dict contains a parameter group "
                "that doesn't match the size of optimizer's group")

        id_map = dict(zip(
            chain.from_iterable(g["params"] for g in saved_groups),
            chain.from_iterable(g["params"] for g in groups),
        ))

        def cast(param, value, key=None):
            if isinstance(value, np.ndarray):
                return self._cast_state_value(param, value, key)
            if isinstance(value, dict):
                return {k: cast(param, v, key=k) for k, v in value.items()}
            if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
                return type(value)(cast(param, v) for v in value)
            return value

        # State of params is copied and cast; state under keys that are not
        # params is kept as is (torch keeps it for backward compatibility).
        state = OptimizerState()
        for k, v in state_dict["state"].items():
            if k in id_map:
                param = id_map[k]
                value = cast(param, v)
                state[param] = ParamState(value) if type(value) is dict else value
            else:
                state[k] = v

        def update_group(group, new_group):
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in new_group:
                new_group["param_names"] = group["param_names"]
            return new_group

        param_groups = [update_group(g, ng) for g, ng in zip(groups, saved_groups)]
        self.__setstate__({"state": state, "param_groups": param_groups})

        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------ the groups

    def zero_grad(self, set_to_none=True):
        """Reset the grads of all parameters: to None (default), or fill them
        with zeros in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.fill(0)

    def step(self, closure=None):
        """Perform a single optimization step; return the closure's value."""
        raise NotImplementedError

    def add_param_group(self, param_group):
        """Add a param group to the optimizer's ``param_groups``, e.g. to train
        layers that were frozen so far. Missing options take the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")

        params = param_group["params"]
        if isinstance(params, np.ndarray):
            param_group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. Please use a list instead.")
        else:
            param_group["params"] = list(params)

        extracted_param_tensors = []
        extracted_param_names = []
        for param in param_group["params"]:
            if isinstance(param, tuple):
                extracted_param_names.append(param[0])
                extracted_param_tensors.append(param[1])
            else:
                extracted_param_tensors.append(param)

        param_group["params"] = extracted_param_tensors
        if len(extracted_param_names) != 0:
            if len(extracted_param_names) == len(extracted_param_tensors):
                param_group["param_names"] = extracted_param_names
            else:
                raise ValueError(
                    "all optimizer params should be with/without names. Some param names are missing")

        for param in param_group["params"]:
            if not isinstance(param, Parameter):
                raise TypeError(
                    "optimizer can only optimize Parameters, "
                    "but one of the params is " + _typename(param))

        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(
                    f"parameter group didn't specify a value of required optimization parameter {name}")
            param_group.setdefault(name, default)

        params = param_group["params"]
        if len(params) != len(set(params)):
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; "
                "in future, this will cause an error; "
                "see github.com/pytorch/pytorch/issues/40967 for more information",
                stacklevel=3)

        param_set = set()
        for group in self.param_groups:
            param_set.update(set(group["params"]))
            if ("param_names" in param_group) != ("param_names" in group):
                current_group_txt = (
                    "with names" if "param_names" in param_group else "without names")
                raise ValueError(
                    "all optimizer param groups should be with/without names. "
                    f"cannot add param group {current_group_txt} to the optimizer")

        if not param_set.isdisjoint(set(param_group["params"])):
            raise ValueError("some parameters appear in more than one parameter group")

        self.param_groups.append(param_group)
