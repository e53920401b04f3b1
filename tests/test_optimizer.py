"""fastsgd's Optimizer/SGD bookkeeping against torch 2.13's, scenario by scenario.

Each test runs one scenario on fastsgd and on torch.optim and compares what
comes out: param groups, state dicts, exception types and messages, warnings,
hook call order, numbers.  Where fastsgd differs on purpose (it says
"Parameter" where torch says "Tensor", copies arrays on load, has no autograd)
the test asserts fastsgd's documented behaviour instead.
"""
import contextlib
import copy
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import fastsgd

torch = pytest.importorskip("torch")
from torch.optim import optimizer as torch_optimizer  # noqa: E402


@dataclass(frozen=True)
class Lib:
    """One side of the comparison: its arrays and its optimizer API."""

    name: str
    param: Callable  # numpy array -> a new parameter (own memory)
    array: Callable  # numpy array -> a new plain array/tensor (own memory)
    numpy: Callable  # array/tensor -> numpy view of it
    SGD: type
    Optimizer: type
    required: Any
    register_global_pre_hook: Callable
    register_global_post_hook: Callable

    def __repr__(self):
        return self.name


FAST = Lib(
    "fastsgd",
    param=lambda a: fastsgd.Parameter(np.array(a)),
    array=np.array,
    numpy=np.asarray,
    SGD=fastsgd.SGD,
    Optimizer=fastsgd.Optimizer,
    required=fastsgd.required,
    register_global_pre_hook=fastsgd.register_optimizer_step_pre_hook,
    register_global_post_hook=fastsgd.register_optimizer_step_post_hook,
)
TORCH = Lib(
    "torch",
    param=lambda a: torch.nn.Parameter(torch.from_numpy(np.array(a))),
    array=lambda a: torch.from_numpy(np.array(a)),
    numpy=lambda t: t.detach().numpy(),
    SGD=torch.optim.SGD,
    Optimizer=torch.optim.Optimizer,
    required=torch_optimizer.required,
    register_global_pre_hook=torch_optimizer.register_optimizer_step_pre_hook,
    register_global_post_hook=torch_optimizer.register_optimizer_step_post_hook,
)

SHAPES = [(7, 9), (5,), (2, 3, 4), (3,)]

# Bit-identical numbers need fastsgd's kernel to round as torch's does.
same_rounding = pytest.mark.skipif(
    fastsgd.cpu_capability() != torch.backends.cpu.get_cpu_capability().lower(),
    reason="fastsgd and torch run kernels of different CPU capabilities "
           "(set FASTSGD_CPU_CAPABILITY and ATEN_CPU_CAPABILITY alike)")


# ------------------------------------------------------------------ helpers

def start_arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]


def twin_params(arrays):
    """The same values as fastsgd Parameters and as torch Parameters."""
    return [FAST.param(a) for a in arrays], [TORCH.param(a) for a in arrays]


def make_sgd(lib, arrays, named=False, **defaults):
    """SGD over `arrays` in two groups (params 0-1 with lr 0.1, params 2-3 with lr 0.01)."""
    params = [lib.param(a) for a in arrays]
    items = [(f"p{i}", p) for i, p in enumerate(params)] if named else params
    groups = [{"params": items[:2], "lr": 0.1}, {"params": items[2:], "lr": 0.01}]
    return lib.SGD(groups, **defaults), params


def no_grad(step, i):
    # Param 1 misses step 0 and param 3 steps 0-3: state appears late and out of order.
    return (i == 1 and step == 0) or (i == 3 and step < 4)


def train(lib, opt, params, steps):
    """One opt.step() per step in `steps`, with grads that depend only on the step."""
    for step in steps:
        rng = np.random.default_rng(100 + step)
        for i, p in enumerate(params):
            grad = rng.standard_normal(tuple(p.shape)).astype(lib.numpy(p).dtype)
            p.grad = None if no_grad(step, i) else lib.array(grad)
        opt.step()


def trained(lib, steps=3, dtype=np.float32, named=False, momentum=0.9, **defaults):
    """make_sgd + train; the params keep the grads of the last step."""
    opt, params = make_sgd(lib, start_arrays(dtype), named=named, momentum=momentum, **defaults)
    train(lib, opt, params, range(steps))
    return opt, params


def without_params(group):
    return {k: v for k, v in group.items() if k != "params"}


def index_of(obj, items):
    """Position of `obj` in `items` by identity (== on arrays is element-wise)."""
    return next(i for i, x in enumerate(items) if x is obj)


def convert(obj, fn):
    """obj with every array/tensor inside dicts, lists and tuples replaced by fn(it)."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: convert(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(convert(v, fn) for v in obj)
    return obj


def assert_same_error(exc_type, scenario):
    """scenario(lib) raises exactly exc_type, with the same message, under torch and fastsgd."""
    with pytest.raises(exc_type) as e_torch:
        scenario(TORCH)
    with pytest.raises(exc_type) as e_fast:
        scenario(FAST)
    assert type(e_fast.value) is type(e_torch.value) is exc_type
    assert str(e_fast.value) == str(e_torch.value)
    return str(e_fast.value)


def warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(w.category, str(w.message)) for w in caught]


# -------------------------------------------------------------- constructor

PARAMS_ARGUMENT = ("params argument given to the optimizer should be an iterable of "
                   "Parameters or dicts, but got ")


@pytest.mark.parametrize("wrap, typename", [
    (fastsgd.Parameter, "fastsgd.Parameter"),
    (np.asarray, "numpy.ndarray"),
])
def test_constructor_rejects_a_lone_array(wrap, typename):
    arr = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError) as e_fast:
        fastsgd.SGD(wrap(arr))
    with pytest.raises(TypeError) as e_torch:
        torch.optim.SGD(TORCH.param(arr))
    assert str(e_fast.value) == PARAMS_ARGUMENT + typename
    # torch says Tensors and names the tensor type; the rest is the same.
    torch_message = str(e_torch.value).replace("Tensors", "Parameters")
    assert torch_message.replace("torch.FloatTensor", typename) == str(e_fast.value)


def test_constructor_rejects_a_lone_torch_tensor():
    # fastsgd does not know torch: it iterates the tensor's rows, as torch
    # does with a lone numpy array, and rejects the first row.
    with pytest.raises(TypeError) as e_fast:
        fastsgd.SGD(torch.ones(2, 3))
    assert str(e_fast.value) == (
        "optimizer can only optimize Parameters, but one of the params is torch.Tensor")


@pytest.mark.parametrize("non_param, typename", [
    (np.ones(3), "numpy.ndarray"),
    (1.5, "float"),
])
def test_constructor_rejects_a_non_parameter(non_param, typename):
    p_fast, p_torch = twin_params([np.ones(3)])
    with pytest.raises(TypeError) as e_fast:
        fastsgd.SGD(p_fast + [non_param])
    with pytest.raises(TypeError) as e_torch:
        torch.optim.SGD(p_torch + [non_param])
    assert str(e_fast.value) == (
        "optimizer can only optimize Parameters, but one of the params is " + typename)
    assert str(e_torch.value).replace("Tensors", "Parameters") == str(e_fast.value)


@pytest.mark.parametrize("empty", [list, tuple, lambda: iter([])],
                         ids=["list", "tuple", "iterator"])
def test_constructor_rejects_an_empty_parameter_list(empty):
    message = assert_same_error(ValueError, lambda lib: lib.SGD(empty()))
    assert message == "optimizer got an empty parameter list"


@pytest.mark.parametrize("form, expected", [
    ("list", [[0, 1, 2, 3]]),
    ("tuple", [[0, 1, 2, 3]]),
    ("generator", [[0, 1, 2, 3]]),
    ("dicts", [[0, 1], [2], [3]]),
])
def test_constructor_makes_groups(form, expected):
    def scenario(lib):
        params = [lib.param(a) for a in start_arrays()]
        given = {
            "list": params,
            "tuple": tuple(params),
            "generator": (p for p in params),
            "dicts": [{"params": params[:2]}, {"params": params[2:3]}, {"params": [params[3]]}],
        }[form]
        opt = lib.SGD(given, lr=0.1)
        assert all(type(g["params"]) is list for g in opt.param_groups)
        return [[index_of(p, params) for p in g["params"]] for g in opt.param_groups]

    assert scenario(FAST) == scenario(TORCH) == expected


def test_groups_get_defaults_in_torch_order():
    def scenario(lib):
        params = [lib.param(a) for a in start_arrays()]
        given = [{"params": params[:2], "lr": 0.5, "momentum": 0.9},
                 {"weight_decay": 0.01, "params": params[2:], "custom": "kept"}]
        opt = lib.SGD(given, lr=0.1, dampening=0.25, maximize=True)
        # setdefault: the user's own dicts become the groups
        assert all(g is d for g, d in zip(opt.param_groups, given))
        return [list(g) for g in opt.param_groups], [without_params(g) for g in opt.param_groups]

    fast_keys, fast_values = scenario(FAST)
    torch_keys, torch_values = scenario(TORCH)
    assert fast_keys == torch_keys
    assert fast_values == torch_values
    assert [g["lr"] for g in fast_values] == [0.5, 0.1]  # own values win over defaults


# ----------------------------------------------------------- SGD validation

@pytest.mark.parametrize("kwargs, exc_type", [
    (dict(lr=-0.1), ValueError),
    (dict(momentum=-0.5), ValueError),
    (dict(weight_decay=-1e-4), ValueError),
    (dict(nesterov=True, momentum=0), ValueError),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError),
    (dict(fused=True, foreach=True), RuntimeError),
    (dict(fused=True, differentiable=True), RuntimeError),
])
def test_sgd_rejects_bad_hyperparameters(kwargs, exc_type):
    assert_same_error(exc_type, lambda lib: lib.SGD([lib.param(np.ones(3))], **kwargs))


def test_sgd_rejects_differentiable():
    # torch accepts differentiable=True; fastsgd has no autograd to offer.
    with pytest.raises(RuntimeError) as e_fast:
        fastsgd.SGD([FAST.param(np.ones(3))], differentiable=True)
    assert str(e_fast.value) == "fastsgd has no autograd: differentiable=True is not supported"


# ---------------------------------------------------------- add_param_group

def one_group_sgd(lib, named=False):
    """SGD over one param, plus three params not in it yet."""
    params = [lib.param(a) for a in start_arrays()]
    opt = lib.SGD([("p0", params[0])] if named else params[:1], lr=0.1)
    return opt, params


@pytest.mark.parametrize("not_a_dict", [list, tuple], ids=["list", "tuple"])
def test_add_param_group_rejects_a_non_dict(not_a_dict):
    def scenario(lib):
        opt, params = one_group_sgd(lib)
        opt.add_param_group(not_a_dict(params[1:]))

    assert_same_error(TypeError, scenario)


def test_add_param_group_wraps_a_lone_parameter():
    def scenario(lib):
        opt, params = one_group_sgd(lib)
        opt.add_param_group({"params": params[1], "lr": 0.5})
        group = opt.param_groups[1]
        return type(group["params"]), [index_of(p, params) for p in group["params"]]

    assert scenario(FAST) == scenario(TORCH) == (list, [1])


def test_add_param_group_rejects_a_set():
    def scenario(lib):
        opt, params = one_group_sgd(lib)
        opt.add_param_group({"params": set(params[1:])})

    assert_same_error(TypeError, scenario)


def required_lr_optimizer(lib):
    """A base Optimizer whose lr is required, with a first group that gives it."""
    params = [lib.param(a) for a in start_arrays()]
    opt = lib.Optimizer([{"params": params[:1], "lr": 0.3}], {"lr": lib.required, "momentum": 0})
    return opt, params


def test_required_default_is_kept_when_given():
    groups = [required_lr_optimizer(lib)[0].param_groups for lib in (FAST, TORCH)]
    assert [without_params(g) for g in groups[0]] == [without_params(g) for g in groups[1]] \
        == [{"lr": 0.3, "momentum": 0}]


@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_required_default_must_be_given(where):
    def scenario(lib):
        if where == "constructor":
            lib.Optimizer([lib.param(np.ones(3))], {"lr": lib.required})
        else:
            opt, params = required_lr_optimizer(lib)
            opt.add_param_group({"params": params[1:]})

    message = assert_same_error(ValueError, scenario)
    assert message.endswith("required optimization parameter lr")


def test_duplicate_parameter_warns_like_torch():
    def scenario(lib):
        opt, params = one_group_sgd(lib)
        duplicated = [params[1], params[2], params[1]]
        return warnings_of(lambda: opt.add_param_group({"params": duplicated}))

    fast = scenario(FAST)
    assert fast == scenario(TORCH)
    assert [category for category, _ in fast] == [UserWarning]


def test_parameter_in_two_groups_is_rejected():
    def scenario(lib):
        opt, params = one_group_sgd(lib)
        opt.add_param_group({"params": [params[1], params[0]]})

    assert_same_error(ValueError, scenario)


def test_named_parameters_give_param_names():
    def scenario(lib):
        params = [lib.param(a) for a in start_arrays()]
        opt = lib.SGD([("w", params[0]), ("b", params[1])], lr=0.1)
        opt.add_param_group({"params": [("x.w", params[2]), ("x.b", params[3])], "lr": 0.5})
        return ([g["param_names"] for g in opt.param_groups],
                [[index_of(p, params) for p in g["params"]] for g in opt.param_groups],
                [list(g) for g in opt.param_groups])

    fast = scenario(FAST)
    assert fast == scenario(TORCH)
    assert fast[:2] == ([["w", "b"], ["x.w", "x.b"]], [[0, 1], [2, 3]])


def test_named_and_unnamed_parameters_do_not_mix_in_a_group():
    def scenario(lib):
        opt, params = one_group_sgd(lib, named=True)
        opt.add_param_group({"params": [("p1", params[1]), params[2]]})

    assert_same_error(ValueError, scenario)


@pytest.mark.parametrize("named_optimizer", [True, False], ids=["named+unnamed", "unnamed+named"])
def test_named_and_unnamed_groups_do_not_mix(named_optimizer):
    def scenario(lib):
        opt, params = one_group_sgd(lib, named=named_optimizer)
        new = [params[1]] if named_optimizer else [("p1", params[1])]
        opt.add_param_group({"params": new})

    assert_same_error(ValueError, scenario)


# --------------------------------------------------------------- state_dict

@same_rounding
def test_state_dict_matches_torch():
    fast, ref = (trained(lib)[0].state_dict() for lib in (FAST, TORCH))

    assert list(fast) == list(ref) == ["state", "param_groups"]
    assert fast["param_groups"] == ref["param_groups"]
    assert [list(g) for g in fast["param_groups"]] == [list(g) for g in ref["param_groups"]]
    assert all(list(g)[-1] == "params" for g in fast["param_groups"])
    assert all(type(i) is int for g in fast["param_groups"] for i in g["params"])
    # Key order too: param 1 (no grad at step 0) gets state after param 2;
    # param 3 (no grad yet) has none.
    assert list(fast["state"]) == list(ref["state"]) == [0, 2, 1]
    for index, state in fast["state"].items():
        assert list(state) == list(ref["state"][index]) == ["momentum_buffer"]
        np.testing.assert_array_equal(state["momentum_buffer"],
                                      ref["state"][index]["momentum_buffer"].numpy())


def test_state_dict_holds_the_optimizers_own_arrays():
    for lib in (FAST, TORCH):
        opt, params = trained(lib)
        state = opt.state_dict()["state"]
        for index in (0, 1, 2):
            assert state[index]["momentum_buffer"] is opt.state[params[index]]["momentum_buffer"]


def test_state_dict_without_momentum_has_no_state():
    fast, ref = (trained(lib, momentum=0)[0].state_dict() for lib in (FAST, TORCH))
    assert fast["state"] == ref["state"] == {}
    assert fast["param_groups"] == ref["param_groups"]


# ---------------------------------------------------------- load_state_dict

@pytest.mark.parametrize("edit", [
    lambda sd: sd["param_groups"].pop(),
    lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0], params=[4])),
    lambda sd: sd["param_groups"][0]["params"].pop(),
    lambda sd: sd["param_groups"][1]["params"].append(4),
], ids=["fewer groups", "more groups", "smaller group", "larger group"])
def test_load_state_dict_rejects_other_group_layouts(edit):
    def scenario(lib):
        opt, _ = trained(lib)
        state_dict = opt.state_dict()
        edit(state_dict)
        opt.load_state_dict(state_dict)

    assert_same_error(ValueError, scenario)


def test_load_state_dict_casts_state_to_the_param_dtype():
    buffer64 = np.linspace(-1, 1, 63).reshape(7, 9)  # float64, not exact in float32

    def scenario(lib):
        opt, params = trained(lib)  # float32 params
        state_dict = opt.state_dict()
        state_dict["state"][0]["momentum_buffer"] = lib.array(buffer64)
        state_dict["state"][0]["history"] = (lib.array(buffer64[0]), 1.5)  # nested: cast too
        state_dict["state"][0]["step"] = lib.array(np.array(3.0))  # "step" is never cast
        opt.load_state_dict(state_dict)
        state = opt.state[params[0]]
        assert lib.numpy(state["step"]).dtype == np.float64
        return lib.numpy(state["momentum_buffer"]), lib.numpy(state["history"][0]), \
            state["history"][1:]

    fast, ref = scenario(FAST), scenario(TORCH)
    for fast_array, ref_array, expected in zip(fast, ref, (buffer64, buffer64[0])):
        assert fast_array.dtype == ref_array.dtype == np.float32
        np.testing.assert_array_equal(fast_array, ref_array)
        np.testing.assert_array_equal(fast_array, expected.astype(np.float32))
    assert fast[2] == ref[2] == (1.5,)


def test_load_state_dict_keeps_the_state_of_non_params():
    extra = {"note": [1, 2]}

    def scenario(lib):
        opt, _ = trained(lib)
        state_dict = opt.state_dict()
        state_dict["state"]["extra"] = extra
        opt.load_state_dict(state_dict)
        assert opt.state["extra"] is extra  # kept as is, not copied
        return list(opt.state_dict()["state"])

    assert scenario(FAST) == scenario(TORCH) == [0, 2, 1, "extra"]


def test_load_state_dict_keeps_extra_group_keys():
    def scenario(lib):
        opt, _ = trained(lib)
        state_dict = opt.state_dict()
        state_dict["param_groups"][1]["custom"] = "kept"
        state_dict["param_groups"][1]["lr"] = 0.25
        saved = copy.deepcopy(state_dict["param_groups"])
        opt.load_state_dict(state_dict)
        # The caller's groups are neither modified nor taken over.
        assert all(type(i) is int for g in state_dict["param_groups"] for i in g["params"])
        assert state_dict["param_groups"] == saved
        assert not any(g is s for g, s in zip(opt.param_groups, state_dict["param_groups"]))
        return [list(g) for g in opt.param_groups], [without_params(g) for g in opt.param_groups]

    fast = scenario(FAST)
    assert fast == scenario(TORCH)
    assert fast[1][1]["custom"] == "kept" and fast[1][1]["lr"] == 0.25


@pytest.mark.parametrize("saved_names, expected", [
    (None, [["p0", "p1"], ["p2", "p3"]]),  # loaded groups without names: the optimizer's stay
    ("new", [["new0", "new1"], ["new2", "new3"]]),  # loaded names replace them
])
def test_load_state_dict_param_names(saved_names, expected):
    def scenario(lib):
        opt, _ = trained(lib, named=True)
        state_dict = opt.state_dict()
        for group in state_dict["param_groups"]:
            if saved_names is None:
                del group["param_names"]
            else:
                group["param_names"] = [f"{saved_names}{i}" for i in group["params"]]
        opt.load_state_dict(state_dict)
        return [g["param_names"] for g in opt.param_groups], [list(g) for g in opt.param_groups]

    fast = scenario(FAST)
    assert fast == scenario(TORCH)
    assert fast[0] == expected


def test_load_state_dict_copies_the_loaded_arrays():
    # Documented difference from torch, which may keep the loaded tensors:
    # fastsgd copies, so training never writes into the dict it loaded, even
    # when its arrays are read-only.
    source, source_params = trained(FAST)
    state_dict = convert(source.state_dict(), np.array)
    for state in state_dict["state"].values():
        state["momentum_buffer"].flags.writeable = False
    snapshot = copy.deepcopy(state_dict)

    opt, params = make_sgd(FAST, source_params)
    opt.load_state_dict(state_dict)
    train(FAST, opt, params, range(3, 6))

    for index, state in state_dict["state"].items():
        assert opt.state[params[index]]["momentum_buffer"] is not state["momentum_buffer"]
        np.testing.assert_array_equal(state["momentum_buffer"],
                                      snapshot["state"][index]["momentum_buffer"])
    assert not np.array_equal(opt.state[params[0]]["momentum_buffer"],
                              snapshot["state"][0]["momentum_buffer"])


@same_rounding
@pytest.mark.parametrize("saved_steps", [1, 5])  # state for fewer / more params than in use
def test_load_state_dict_replaces_the_state_of_a_used_optimizer(saved_steps):
    def scenario(lib):
        saved, _ = trained(lib, steps=saved_steps, nesterov=True, weight_decay=1e-3)
        opt, params = trained(lib, steps=2, momentum=0.5)
        opt.load_state_dict(saved.state_dict())
        train(lib, opt, params, range(5, 8))
        return [lib.numpy(x).copy() for p in params
                for x in (p, opt.state[p]["momentum_buffer"])]

    fast, ref = scenario(FAST), scenario(TORCH)
    assert all(np.array_equal(f, r) for f, r in zip(fast, ref, strict=True))


# ------------------------------------------------------------------ interop

@same_rounding
@pytest.mark.parametrize("src, dst", [(TORCH, FAST), (FAST, TORCH)],
                         ids=["torch->fastsgd", "fastsgd->torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_state_dict_interop_is_bit_identical(src, dst, dtype, nesterov):
    hyper = dict(momentum=0.9, nesterov=nesterov, weight_decay=1e-3, foreach=False)
    src_opt, src_params = trained(src, dtype=dtype, **hyper)

    # The destination starts from the source's params with default
    # hyperparameters: all else it knows comes from the state dict.
    dst_opt, dst_params = make_sgd(dst, [src.numpy(p) for p in src_params])
    dst_opt.load_state_dict(convert(src_opt.state_dict(), lambda x: dst.array(src.numpy(x))))
    assert [without_params(g) for g in dst_opt.param_groups] == \
        [without_params(g) for g in src_opt.param_groups]

    train(src, src_opt, src_params, range(3, 6))
    train(dst, dst_opt, dst_params, range(3, 6))

    for p, q in zip(src_params, dst_params):
        assert src.numpy(p).dtype == dst.numpy(q).dtype == dtype
        assert np.array_equal(src.numpy(p), dst.numpy(q))
        src_buffer = src.numpy(src_opt.state[p]["momentum_buffer"])
        dst_buffer = dst.numpy(dst_opt.state[q]["momentum_buffer"])
        assert src_buffer.dtype == dst_buffer.dtype == dtype
        assert np.array_equal(src_buffer, dst_buffer)


# --------------------------------------------------------- zero_grad, step

@pytest.mark.parametrize("kwargs", [{}, {"set_to_none": True}], ids=["default", "True"])
def test_zero_grad_sets_grads_to_none(kwargs):
    opt, params = trained(FAST)
    assert params[3].grad is None and params[0].grad is not None
    opt.zero_grad(**kwargs)
    assert all(p.grad is None for p in params)


def test_zero_grad_without_set_to_none_zeroes_in_place():
    opt, params = trained(FAST)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g for p, g in zip(params, grads))
    assert params[3].grad is None
    assert all(not np.any(p.grad) for p in params[:3])


def test_step_returns_the_closures_value():
    def scenario(lib):
        opt, params = trained(lib, steps=1)
        calls = []

        def closure():
            calls.append(lib.numpy(params[0]).copy())
            return 3.5

        before = lib.numpy(params[0]).copy()
        loss = opt.step(closure)
        # called once, before the update
        assert len(calls) == 1 and np.array_equal(calls[0], before)
        return loss, opt.step()

    assert scenario(FAST) == scenario(TORCH) == (3.5, None)


# -------------------------------------------------------------------- hooks

def address_free(message):
    return re.sub(r" at 0x[0-9a-fA-F]+", "", message)


def test_step_hooks_run_in_torchs_order():
    def scenario(lib):
        opt, _ = trained(lib, steps=1)
        log = []

        def hook(label):
            def record(optimizer, args, kwargs):
                log.append((label, optimizer is opt, len(args), args[0] is opt, tuple(kwargs)))
            return record

        with lib.register_global_post_hook(hook("global post")), \
                lib.register_global_pre_hook(hook("global pre")):
            opt.register_step_post_hook(hook("post 1"))
            opt.register_step_pre_hook(hook("pre 1"))
            opt.register_step_pre_hook(hook("pre 2"))
            opt.register_step_post_hook(hook("post 2"))
            opt.step(closure=lambda: log.append("step"))
        return [entry if entry == "step" else entry[0] for entry in log], set(log) - {"step"}

    order, calls = scenario(FAST)
    assert (order, calls) == scenario(TORCH)
    assert order == ["global pre", "pre 1", "pre 2", "step", "post 1", "post 2", "global post"]
    assert {call[1:] for call in calls} == {(True, 1, True, ("closure",))}


@pytest.mark.parametrize("replace", [
    lambda opt, args, kwargs: ((opt, lambda: "replaced"), kwargs),
    lambda opt, args, kwargs: ((opt,), {"closure": lambda: "replaced"}),
], ids=["args", "kwargs"])
def test_step_pre_hook_can_replace_the_arguments(replace):
    def scenario(lib):
        opt, _ = trained(lib, steps=1)
        seen = []
        opt.register_step_pre_hook(replace)
        opt.register_step_post_hook(
            lambda o, args, kwargs: seen.append((len(args), sorted(kwargs))))
        return opt.step(), seen

    fast = scenario(FAST)
    assert fast == scenario(TORCH)
    assert fast[0] == "replaced"


@pytest.mark.parametrize("result", [5, (1, 2, 3), ["args", "kwargs"]],
                         ids=["int", "3-tuple", "list"])
def test_step_pre_hook_returning_other_things_fails(result):
    def message(lib):
        opt, _ = trained(lib, steps=1)
        opt.register_step_pre_hook(lambda *args: result)
        with pytest.raises(RuntimeError) as error:
            opt.step()
        assert type(error.value) is RuntimeError
        return address_free(str(error.value))

    assert message(FAST) == message(TORCH)


@pytest.mark.parametrize("kind", ["pre", "post", "global pre", "global post"])
def test_step_hooks_run_at_every_step_until_removed(kind):
    def scenario(lib):
        opts = [trained(lib, steps=1)[0] for _ in range(2)]
        register = {
            "pre": opts[0].register_step_pre_hook,
            "post": opts[0].register_step_post_hook,
            "global pre": lib.register_global_pre_hook,
            "global post": lib.register_global_post_hook,
        }[kind]
        calls = []
        handle = register(lambda opt, args, kwargs: calls.append(index_of(opt, opts)))
        try:
            for _ in range(2):
                for opt in opts:
                    opt.step()
        finally:
            handle.remove()
        for opt in opts:
            opt.step()
        return calls

    expected = [0, 1, 0, 1] if kind.startswith("global") else [0, 0]
    assert scenario(FAST) == scenario(TORCH) == expected


def test_state_dict_hooks():
    def scenario(lib):
        opt, _ = trained(lib)
        log = []

        def post(label, replace):
            def hook(optimizer, state_dict):
                log.append((label, optimizer is opt, sorted(state_dict)))
                if replace:
                    return {**state_dict, "added by": label}
            return hook

        opt.register_state_dict_pre_hook(lambda o: log.append(("pre A", o is opt)))
        opt.register_state_dict_pre_hook(lambda o: log.append(("pre B", o is opt)), prepend=True)
        opt.register_state_dict_pre_hook(lambda o: log.append("removed")).remove()
        opt.register_state_dict_post_hook(post("post A", replace=True))
        opt.register_state_dict_post_hook(post("post B", replace=False), prepend=True)
        opt.register_state_dict_post_hook(post("post C", replace=False))
        opt.register_state_dict_post_hook(post("removed", replace=True)).remove()
        result = opt.state_dict()
        return log, sorted(result), result["added by"]

    fast = scenario(FAST)
    assert fast == scenario(TORCH)
    assert fast == ([("pre B", True), ("pre A", True),
                     ("post B", True, ["param_groups", "state"]),
                     ("post A", True, ["param_groups", "state"]),
                     ("post C", True, ["added by", "param_groups", "state"])],
                    ["added by", "param_groups", "state"], "post A")


def test_load_state_dict_hooks():
    def scenario(lib):
        opt, _ = trained(lib)
        state_dict = opt.state_dict()
        log = []

        def pre(label, new_lr=None):
            def hook(optimizer, loading):
                log.append((label, optimizer is opt, loading["param_groups"][0]["lr"]))
                loading[label] = "seen"  # in place: a copy, not the caller's dict
                if new_lr is not None:
                    groups = copy.deepcopy(loading["param_groups"])
                    groups[0]["lr"] = new_lr
                    return {**loading, "param_groups": groups}
            return hook

        def post(label):
            def hook(optimizer):
                log.append((label, optimizer is opt, opt.param_groups[0]["lr"]))
            return hook

        opt.register_load_state_dict_pre_hook(pre("pre A", new_lr=0.5))
        opt.register_load_state_dict_pre_hook(pre("pre B"), prepend=True)
        opt.register_load_state_dict_pre_hook(pre("pre C"))
        opt.register_load_state_dict_pre_hook(pre("removed", new_lr=9.0)).remove()
        opt.register_load_state_dict_post_hook(post("post A"))
        opt.register_load_state_dict_post_hook(post("post B"), prepend=True)
        opt.register_load_state_dict_post_hook(post("removed")).remove()
        opt.load_state_dict(state_dict)
        caller_lr = state_dict["param_groups"][0]["lr"]
        return log, opt.param_groups[0]["lr"], caller_lr, sorted(state_dict)

    fast = scenario(FAST)
    assert fast == scenario(TORCH)
    # pre A's dict is what is loaded; the caller's dict is left alone
    assert fast == ([("pre B", True, 0.1), ("pre A", True, 0.1), ("pre C", True, 0.5),
                     ("post B", True, 0.5), ("post A", True, 0.5)], 0.5, 0.1,
                    ["param_groups", "state"])


# --------------------------------------------------------------------- repr

@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("defaults", [{}, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)],
                         ids=["defaults", "nesterov"])
def test_repr_matches_torch(named, defaults):
    fast, ref = (str(make_sgd(lib, start_arrays(), named=named, **defaults)[0])
                 for lib in (FAST, TORCH))
    assert fast == ref
    assert fast.startswith("SGD (\nParameter Group 0\n") and "Parameter Group 1" in fast


# ---------------------------------------------------------- pickle, deepcopy

COPIERS = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "deepcopy": copy.deepcopy,
}


def group_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS)
def test_copied_optimizer_keeps_groups_state_and_links(copier):
    opt, params = trained(FAST, nesterov=True, weight_decay=1e-3)
    clone = copier(opt)
    clone_params = group_params(clone)

    assert [without_params(g) for g in clone.param_groups] == \
        [without_params(g) for g in opt.param_groups]
    assert all(type(q) is fastsgd.Parameter and q is not p and np.array_equal(q, p)
               for p, q in zip(params, clone_params))
    # State is keyed by the clone's own params, in the same order.
    assert [index_of(k, clone_params) for k in clone.state] == \
        [index_of(k, params) for k in opt.state] == [0, 2, 1]
    for p, q in zip(params, clone_params):
        if p in opt.state:
            assert not np.shares_memory(clone.state[q]["momentum_buffer"],
                                        opt.state[p]["momentum_buffer"])
            np.testing.assert_array_equal(clone.state[q]["momentum_buffer"],
                                          opt.state[p]["momentum_buffer"])

    train(FAST, opt, params, range(3, 6))
    train(FAST, clone, clone_params, range(3, 6))
    for p, q in zip(params, clone_params):
        assert np.array_equal(p, q)
        assert np.array_equal(opt.state[p]["momentum_buffer"], clone.state[q]["momentum_buffer"])


@pytest.mark.parametrize("order", ["C", "F"])
def test_parameter_deepcopy_drops_grad_and_attributes_as_torch(order):
    p = fastsgd.Parameter(np.asarray(np.arange(6.0).reshape(2, 3), order=order))
    p.grad, p.tag = np.ones((2, 3)), ["weight"]
    t = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    t.grad, t.tag = torch.ones(2, 3), ["weight"]
    q, u = copy.deepcopy(p), copy.deepcopy(t)
    assert (q.grad, u.grad) == (None, None)
    assert not hasattr(q, "tag") and not hasattr(u, "tag")
    assert type(q) is fastsgd.Parameter and np.array_equal(q, p) and not np.shares_memory(q, p)
    assert q.flags.f_contiguous == p.flags.f_contiguous
    memo = {}
    assert p.__deepcopy__(memo) is memo[id(p)] is p.__deepcopy__(memo)


def test_deepcopied_optimizer_steps_nothing_until_grads_are_set():
    """torch's copy.deepcopy(optimizer) has params without grads: its step is
    a no-op, and so is fastsgd's."""
    results = []
    for lib in (FAST, TORCH):
        opt, _ = trained(lib, steps=2)
        clone = copy.deepcopy(opt)
        before = [np.array(lib.numpy(p)) for p in group_params(clone)]
        clone.step()
        results.append([np.array_equal(lib.numpy(p), b)
                        for p, b in zip(group_params(clone), before)])
    assert results[0] == results[1] and all(results[0])


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS)
def test_copied_optimizer_has_no_hooks(copier):
    def scenario(lib):
        opt, _ = trained(lib, steps=1)
        calls = []
        # Closures: pickling would fail if hooks were pickled.
        opt.register_step_pre_hook(lambda *args: calls.append("step pre"))
        opt.register_step_post_hook(lambda *args: calls.append("step post"))
        opt.register_state_dict_pre_hook(lambda *args: calls.append("state_dict pre"))
        opt.register_state_dict_post_hook(lambda *args: calls.append("state_dict post"))
        opt.register_load_state_dict_pre_hook(lambda *args: calls.append("load pre"))
        opt.register_load_state_dict_post_hook(lambda *args: calls.append("load post"))
        clone = copier(opt)
        clone.step()
        clone.load_state_dict(clone.state_dict())
        clone_calls = list(calls)
        # while the original keeps them
        opt.step()
        return clone_calls, calls

    assert scenario(FAST) == scenario(TORCH) == ([], ["step pre", "step post"])


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameter_pickle_drops_grad_only(protocol, order, dtype):
    p = fastsgd.Parameter(np.asarray(np.arange(12.0).reshape(3, 4), dtype=dtype, order=order))
    p.grad = np.ones_like(p)
    p.tag = "weight"
    q = pickle.loads(pickle.dumps(p, protocol=protocol))
    assert type(q) is fastsgd.Parameter
    assert (q.dtype, q.shape, q.flags.f_contiguous) == (p.dtype, p.shape, p.flags.f_contiguous)
    assert np.array_equal(q, p) and not np.shares_memory(q, p)
    assert q.tag == "weight"
    assert q.grad is None


# ----------------------------------------------------------- Parameter basics

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameter_shares_memory_with_a_float_array(dtype):
    arr = np.zeros((2, 3), dtype)
    p = fastsgd.Parameter(arr)
    assert np.shares_memory(p, arr) and p.dtype == dtype and p.grad is None
    arr[0, 0] = 5
    assert p[0, 0] == 5


@pytest.mark.parametrize("data", [np.arange(3), [1, 2, 3], np.ones(3, np.complex64)],
                         ids=["int array", "int list", "complex64"])
def test_parameter_rejects_non_float_data(data):
    with pytest.raises(TypeError, match="Parameter needs float32, float64, float16 or bfloat16 data"):
        fastsgd.Parameter(data)
    # an explicit dtype converts, as np.asarray does (warning as it does for complex data)
    complex_data = np.iscomplexobj(data)
    with pytest.warns(np.exceptions.ComplexWarning) if complex_data else contextlib.nullcontext():
        assert fastsgd.Parameter(data, dtype=np.float32).dtype == np.float32


def test_parameter_hashes_by_identity():
    p, q = fastsgd.Parameter(np.zeros(3)), fastsgd.Parameter(np.zeros(3))
    table = {p: "p", q: "q"}
    p += 1  # the key does not depend on the values
    assert (table[p], table[q]) == ("p", "q")
    assert hash(p) == object.__hash__(p) != hash(q)


@pytest.mark.parametrize("operation", [
    lambda p, x: p + 1,
    lambda p, x: -p,
    lambda p, x: p[0],
    lambda p, x: p[:, 1:],
    lambda p, x: np.sum(p, axis=0),
    lambda p, x: np.concatenate([p, p]),
    lambda p, x: np.reshape(p, -1),
    lambda p, x: np.transpose(p),
    lambda p, x: p @ x,
], ids=["add", "neg", "index", "slice", "sum", "concatenate", "reshape", "transpose", "matmul"])
def test_parameter_operations_give_plain_arrays(operation):
    p = fastsgd.Parameter(np.arange(6.0).reshape(2, 3))
    result = operation(p, np.ones(3))
    assert type(result) is np.ndarray
    np.testing.assert_array_equal(result, operation(np.asarray(p), np.ones(3)))


def test_parameter_in_place_update_keeps_the_parameter():
    arr = np.zeros((2, 3), np.float32)
    p = same = fastsgd.Parameter(arr)
    p.grad = np.ones_like(arr)
    p -= 1
    assert p is same and type(p) is fastsgd.Parameter
    assert np.all(arr == -1) and np.all(p.grad == 1)


# ------------------------------------------- options of the wrong type set on a group

WRONG_OPTIONS = [(key, value) for key in ("lr", "momentum", "dampening", "weight_decay")
                 for value in (10**400, 2**64, -2**63 - 1, 1j, np.complex64(1), np.ones(2),
                               "0.9", None, [0.1], 1e300, -3.5e38)]
WRONG_OPTIONS += [("weight_decay", True), ("nesterov", np.array([True, False])),
                  ("maximize", np.ones(3)), ("nesterov", "yes"), ("maximize", None)]


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")  # torch's too
@pytest.mark.parametrize("key, value", WRONG_OPTIONS, ids=lambda x: repr(x)[:24])
def test_wrong_typed_options_raise_torchs_exception_types(key, value):
    """Set on a group after construction, once every param has its momentum
    buffer (torch reads momentum and dampening only then): fastsgd raises
    the type torch raises, before anything changes, or steps as torch does."""
    outcomes = []
    for lib in (FAST, TORCH):
        params = [lib.param(a) for a in start_arrays()[:2]]
        opt = lib.SGD(params, lr=0.1, momentum=0.5, **({"foreach": False} if lib is TORCH else {}))
        for p in params:
            p.grad = lib.array(np.ones(tuple(p.shape), np.float32))
        opt.step()
        opt.param_groups[0][key] = value
        before = [np.array(lib.numpy(p)) for p in params]
        buffers = [np.array(lib.numpy(opt.state[p]["momentum_buffer"])) for p in params]
        try:
            opt.step()
            outcomes.append(("stepped", [np.array(lib.numpy(p)) for p in params]))
        except Exception as error:  # noqa: BLE001 - the type is what is compared
            outcomes.append((type(error), None))
            if lib is FAST:  # validated before anything was written
                assert all(np.array_equal(lib.numpy(p), b) for p, b in zip(params, before))
                assert all(np.array_equal(lib.numpy(opt.state[p]["momentum_buffer"]), b)
                           for p, b in zip(params, buffers))
    (fast, fast_values), (torch_, torch_values) = outcomes
    assert fast == torch_
    if fast == "stepped":
        for f, t in zip(fast_values, torch_values):
            np.testing.assert_array_equal(f, t)
