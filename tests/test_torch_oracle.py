"""A stateful torch oracle: hypothesis drives a fastsgd.SGD and a torch.optim.SGD(foreach=False)
twin through random sequences of steps, grads (inf, NaN, missing, shared), option changes
(valid and of the wrong type), added param groups, state_dict round trips (direct, through
fastsgd.save/load and torch.save/load, and crossed between the libraries), deepcopies,
schedulers and clipping, on float32, float64, float16 and bfloat16 params.

After every rule the twins agree bit for bit: parameters, grads, momentum buffers,
param_groups and state_dict().  Invalid input raises the same exception type and message on
both sides (a wrong-typed option: the same type, docs/guide/numpy.md "Differences from
torch"); fastsgd changes nothing then, and torch, which may have stepped part of the way, is
given fastsgd's values back.  clip_grad_norm_'s totals agree within the bounds
fastsgd/clip_grad.py states, then torch's clipped grads are copied to fastsgd's.

The default run is short; `-m slow` runs the long one (docs/reliability.md has its figures).
"""
import copy
import io
import math
import os
import tempfile
import time
import warnings

import numpy as np
import pytest

import fastsgd

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
SHAPES = [(), (3,), (2, 3), (33,), (4, 1, 5)]
UNIT = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53,
        np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}

VALID = {"lr": [0.0, 1e-3, 0.01, 0.1, 0.5, 1.0, 3.0, np.float32(0.25)],
         "momentum": [0.0, 0.5, 0.9, 1.0],
         "dampening": [0.0, 0.1, 0.5],
         "weight_decay": [0.0, 1e-4, 0.01, 0.5],
         "nesterov": [False, True],
         "maximize": [False, True]}
WRONG = {"lr": [10**400, 2**64, 1j, "0.1", None, [0.1], np.ones(2), 1e300],
         "momentum": [2**64, -2**63 - 1, 1j, "0.9", None, np.ones(2)],
         "dampening": [2**64, 1j, "0.5", None, [0.1]],
         "weight_decay": [10**400, 1j, "x", None, True, np.ones(2), -3.5e38],
         "nesterov": [np.array([True, False])],
         "maximize": [np.ones(3)]}
SCHEDULERS = {"StepLR": {"step_size": 2, "gamma": 0.5},
              "ExponentialLR": {"gamma": 0.9},
              "MultiStepLR": {"milestones": [1, 3], "gamma": 0.1},
              "CosineAnnealingLR": {"T_max": 5, "eta_min": 1e-3},
              "LinearLR": {"start_factor": 0.5, "total_iters": 3}}

FIGURES = {"sequences": 0, "rules": 0}  # of a run, printed by the long run

pytestmark = pytest.mark.skipif(
    fastsgd.cpu_capability() != torch.backends.cpu.get_cpu_capability().lower(),
    reason="bit-identical steps need fastsgd's kernel to round as torch's does")


def to_torch(array):
    array = np.array(array)  # own memory, 0-d included
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16).copy()
    return tensor.numpy().copy()


def bits(array):
    array = np.ascontiguousarray(array)
    return array.view(f"u{array.dtype.itemsize}")


def same_bits(fast, ref):
    fast, ref = np.asarray(fast), to_numpy(ref)
    return (fast.dtype == ref.dtype and fast.shape == ref.shape
            and np.array_equal(bits(fast), bits(ref)))


def tree_map(fn, obj):
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree_map(fn, v) for v in obj]
    return fn(obj) if isinstance(obj, (np.ndarray, torch.Tensor)) else obj


def same_value(a, b):
    """An option or state_dict entry of fastsgd's against torch's."""
    if isinstance(b, torch.Tensor):
        return same_bits(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return type(a) is type(b) and a == b


def torch_message(error):
    """torch's message in fastsgd's words (docs/guide/numpy.md: "Parameters" for "Tensors")."""
    return (str(error).replace("Tensors", "Parameters").replace("tensors", "parameters")
            .replace("Tensor", "Parameter").replace("tensor", "parameter"))


class TorchOracle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's 16-bit results depend on its thread count
        self.tmp = tempfile.TemporaryDirectory()
        self.fast_sched = self.torch_sched = None
        FIGURES["sequences"] += 1

    def teardown(self):
        torch.set_num_threads(self.threads)
        self.tmp.cleanup()

    # ------------------------------------------------------------ helpers

    def new_params(self, data):
        seed = data.draw(st.integers(0, 2**32 - 1), label="param seed")
        rng = np.random.default_rng(seed)
        fast, ref = [], []
        for _ in range(data.draw(st.integers(1, 3), label="params in the group")):
            dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
            shape = data.draw(st.sampled_from(SHAPES), label="shape")
            array = np.asarray(rng.standard_normal(shape), np.float32).astype(dtype)
            fast.append(fastsgd.Parameter(array.copy()))
            ref.append(torch.nn.Parameter(to_torch(array)))
        return fast, ref

    def draw_options(self, data):
        return {key: data.draw(st.sampled_from(values), label=key)
                for key, values in VALID.items() if data.draw(st.booleans(), label=f"set {key}")}

    def refresh_params(self):
        self.fp = [p for g in self.fast_opt.param_groups for p in g["params"]]
        self.tp = [p for g in self.torch_opt.param_groups for p in g["params"]]

    def both(self, fast_call, torch_call, same_message=True):
        """Run both; they return or raise alike.  After an error fastsgd has
        changed nothing (it validates first): torch gets fastsgd's values."""
        outcomes = []
        for call in (fast_call, torch_call):
            try:
                outcomes.append((None, call()))
            except Exception as error:  # noqa: BLE001 - compared below
                outcomes.append((error, None))
        (fast_error, fast_result), (torch_error, torch_result) = outcomes
        assert type(fast_error) is type(torch_error), (fast_error, torch_error)
        if fast_error is not None:
            if same_message:
                assert str(fast_error) in (str(torch_error), torch_message(torch_error)), (
                    fast_error, torch_error)
            self.give_torch_fastsgds_values()
            return None, None
        return fast_result, torch_result

    def give_torch_fastsgds_values(self):
        with torch.no_grad():
            for f, t in zip(self.fp, self.tp):
                t.copy_(to_torch(f))
                if f.grad is None:
                    t.grad = None
                elif t.grad is None:
                    t.grad = to_torch(f.grad)
                else:
                    t.grad.copy_(to_torch(f.grad))
                state = self.fast_opt.state.get(f, {})
                if "momentum_buffer" in state:
                    self.torch_opt.state[t]["momentum_buffer"] = to_torch(
                        state["momentum_buffer"])
                elif t in self.torch_opt.state:
                    self.torch_opt.state[t].pop("momentum_buffer", None)

    # -------------------------------------------------------------- rules

    @initialize(data=st.data())
    def build(self, data):
        fast_groups, torch_groups = [], []
        for _ in range(data.draw(st.integers(1, 2), label="groups")):
            fast, ref = self.new_params(data)
            options = self.draw_options(data)
            fast_groups.append({"params": fast, **options})
            torch_groups.append({"params": ref, **options})
        defaults = {"lr": data.draw(st.sampled_from(VALID["lr"][1:]), label="default lr"),
                    "momentum": data.draw(st.sampled_from(VALID["momentum"]), label="momentum")}
        self.fast_opt = fastsgd.SGD(fast_groups, foreach=False, **defaults)
        self.torch_opt = torch.optim.SGD(torch_groups, foreach=False, **defaults)
        self.refresh_params()

    @rule(data=st.data())
    def set_grads(self, data):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="grad seed"))
        for i, (f, t) in enumerate(zip(self.fp, self.tp)):
            kind = data.draw(st.sampled_from(["normal", "normal", "none", "special", "shared",
                                              "keep"]), label="grad")
            if kind == "keep":
                continue
            if kind == "none":
                f.grad = t.grad = None
                continue
            if kind == "shared":
                other = next((j for j in range(i) if self.fp[j].grad is not None
                              and self.fp[j].grad.shape == f.shape
                              and self.fp[j].grad.dtype == f.dtype), None)
                if other is not None:
                    f.grad, t.grad = self.fp[other].grad, self.tp[other].grad
                    continue
            scale = data.draw(st.sampled_from([1.0, 1e-3, 1e3]), label="scale")
            grad = np.asarray(scale * rng.standard_normal(f.shape), np.float32).astype(f.dtype)
            if kind == "special" and grad.size:
                flat = grad.reshape(-1)
                flat[rng.integers(0, flat.size, 2)] = rng.choice([np.inf, -np.inf, np.nan], 2)
            f.grad, t.grad = grad, to_torch(grad)

    @rule()
    def step(self):
        self.both(self.fast_opt.step, self.torch_opt.step)

    @rule(data=st.data())
    def set_option(self, data):
        group = data.draw(st.integers(0, len(self.fast_opt.param_groups) - 1), label="group")
        key = data.draw(st.sampled_from(sorted(VALID)), label="key")
        value = data.draw(st.sampled_from(VALID[key]), label="value")
        self.fast_opt.param_groups[group][key] = value
        self.torch_opt.param_groups[group][key] = value

    @rule(data=st.data())
    def set_wrong_option(self, data):
        """Where torch reads every option: each param has a grad and, with
        momentum, a buffer (one valid step first).  The same exception type,
        then the option is set back."""
        group = data.draw(st.integers(0, len(self.fast_opt.param_groups) - 1), label="group")
        options = self.fast_opt.param_groups[group]
        keys = [k for k in sorted(WRONG)
                if options["momentum"] != 0 or k not in ("momentum", "dampening", "nesterov")]
        key = data.draw(st.sampled_from(keys), label="key")
        value = data.draw(st.sampled_from(WRONG[key]), label="value")
        for f, t in zip(self.fp, self.tp):
            if f.grad is None:
                f.grad = np.ones(f.shape, f.dtype)
                t.grad = to_torch(f.grad)
        self.step()
        previous = options[key]
        self.fast_opt.param_groups[group][key] = value
        self.torch_opt.param_groups[group][key] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.both(self.fast_opt.step, self.torch_opt.step, same_message=False)
        self.fast_opt.param_groups[group][key] = previous
        self.torch_opt.param_groups[group][key] = previous

    @rule(data=st.data(), kind=st.sampled_from(["valid", "valid", "repeated", "set", "tensor"]))
    def add_param_group(self, data, kind):
        fast, ref = self.new_params(data)
        options = self.draw_options(data)
        if kind == "repeated":  # a param already in a group
            fast, ref = fast + self.fp[:1], ref + self.tp[:1]
        fast_params, torch_params = ((set(fast), set(ref)) if kind == "set" else
                                     (fast[0], ref[0]) if kind == "tensor" else (fast, ref))
        self.both(lambda: self.fast_opt.add_param_group({"params": fast_params, **options}),
                  lambda: self.torch_opt.add_param_group({"params": torch_params, **options}))
        self.refresh_params()

    @rule(how=st.sampled_from(["direct", "file", "crossed"]))
    def reload_state_dict(self, how):
        fast_sd, torch_sd = self.fast_opt.state_dict(), self.torch_opt.state_dict()
        if how == "direct":
            fast_in, torch_in = copy.deepcopy(fast_sd), copy.deepcopy(torch_sd)
        elif how == "file":
            path = os.path.join(self.tmp.name, "state")
            fastsgd.save(fast_sd, path)
            fast_in = fastsgd.load(path)
            buffer = io.BytesIO()
            torch.save(torch_sd, buffer)
            buffer.seek(0)
            torch_in = torch.load(buffer, weights_only=False)  # numpy scalar options
        else:  # each loads the other's, its tensors turned into arrays and back
            fast_in, torch_in = tree_map(to_numpy, torch_sd), tree_map(to_torch, fast_sd)
        self.both(lambda: self.fast_opt.load_state_dict(fast_in),
                  lambda: self.torch_opt.load_state_dict(torch_in))

    @rule()
    def deepcopy_optimizer(self):
        self.fast_opt, self.torch_opt = copy.deepcopy(self.fast_opt), copy.deepcopy(self.torch_opt)
        self.refresh_params()
        self.fast_sched = self.torch_sched = None

    @rule(name=st.sampled_from(sorted(SCHEDULERS)))
    def make_scheduler(self, name):
        kwargs = SCHEDULERS[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.fast_sched, self.torch_sched = self.both(
                lambda: getattr(fastsgd.lr_scheduler, name)(self.fast_opt, **kwargs),
                lambda: getattr(torch.optim.lr_scheduler, name)(self.torch_opt, **kwargs))

    @precondition(lambda self: self.fast_sched is not None)
    @rule()
    def scheduler_step(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.both(self.fast_sched.step, self.torch_sched.step)
        assert same_value(self.fast_sched.get_last_lr(), self.torch_sched.get_last_lr())

    @rule(max_norm=st.sampled_from([0.0, 0.1, 1.0, 1e3]),
          norm_type=st.sampled_from([2.0, 1.0, 3.0, 0.5, math.inf]))
    def clip_grad_norm(self, max_norm, norm_type):
        grads = [f.grad for f in self.fp if f.grad is not None]
        total, ref_total = self.both(
            lambda: fastsgd.clip_grad_norm_(self.fp, max_norm, norm_type),
            lambda: torch.nn.utils.clip_grad_norm_(self.tp, max_norm, norm_type))
        if total is None or not grads:
            return
        ref_total = to_numpy(ref_total)
        assert total.dtype == ref_total.dtype
        total, ref_total = float(total), float(ref_total)
        if not (math.isfinite(total) and math.isfinite(ref_total)):
            assert same_value(total, ref_total)
        else:  # fastsgd/clip_grad.py's bounds, for the largest grad and the coarsest dtype
            n, k, m = max(g.size for g in grads), len(grads), max(1.0, 1.0 / norm_type)
            u = max(UNIT[g.dtype] for g in grads)
            bound = m * ((n / 8 + 4) * 2.0**-53 + (k + 3) * u) + m * (n + k + 3) * u + 2 * u
            assert abs(total - ref_total) <= bound * abs(ref_total) + 2.0**-126
        for f, t in zip(self.fp, self.tp):  # the twins go on from torch's clipped grads
            if f.grad is not None:
                f.grad[...] = to_numpy(t.grad)

    @rule(clip_value=st.sampled_from([0.0, 0.5, 1.0, math.inf, -math.inf, math.nan, 1e5]))
    def clip_grad_value(self, clip_value):
        if all(f.grad is None for f in self.fp):  # torch 2.13 fails inside (numpy.md)
            fastsgd.clip_grad_value_(self.fp, clip_value)
            return
        self.both(lambda: fastsgd.clip_grad_value_(self.fp, clip_value),
                  lambda: torch.nn.utils.clip_grad_value_(self.tp, clip_value))

    # ---------------------------------------------------------- invariant

    @invariant()
    def twins_agree(self):
        FIGURES["rules"] += 1
        assert len(self.fp) == len(self.tp)
        for f, t in zip(self.fp, self.tp):
            assert same_bits(f, t)
            assert (f.grad is None) == (t.grad is None)
            if f.grad is not None:
                assert same_bits(f.grad, t.grad)
            fast_state = self.fast_opt.state.get(f, {})
            torch_state = self.torch_opt.state.get(t, {})
            assert fast_state.keys() == torch_state.keys()
            for key in fast_state:
                assert same_value(fast_state[key], torch_state[key]), key
        for fg, tg in zip(self.fast_opt.param_groups, self.torch_opt.param_groups, strict=True):
            assert fg.keys() == tg.keys()
            assert all(same_value(fg[k], tg[k]) for k in fg if k != "params")
        fast_sd, torch_sd = self.fast_opt.state_dict(), self.torch_opt.state_dict()
        assert same_value(fast_sd, torch_sd)


# The default run is the same sequences every time (derandomize); the long one explores.
FAST_RUN = settings(max_examples=40, stateful_step_count=20, deadline=None, database=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))
LONG_RUN = settings(max_examples=2000, stateful_step_count=30, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def test_torch_oracle():
    TorchOracle.TestCase.settings = FAST_RUN
    TorchOracle.TestCase().runTest()


@pytest.mark.slow
def test_torch_oracle_long_run():
    TorchOracle.TestCase.settings = LONG_RUN
    FIGURES.update(sequences=0, rules=0)
    started = time.monotonic()
    TorchOracle.TestCase().runTest()
    print(f"\ntorch oracle: {FIGURES['sequences']} sequences, {FIGURES['rules']} rules "
          f"(initialisation included), {time.monotonic() - started:.0f} s")
