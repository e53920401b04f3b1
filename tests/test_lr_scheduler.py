"""fastsgd.lr_scheduler against torch.optim.lr_scheduler (torch 2.13).

Each scenario runs twice, on twin optimizers: fastsgd.SGD and torch.optim.SGD
with the same three param groups (different lrs, momentum on).  Both are
stepped before their schedulers, and after every step the param groups
(lr, momentum, initial_lr, max_lr, ... everything but the params) and
get_last_lr() must be exactly equal, as must the schedulers' state_dict()s
at the end.  Errors and warnings are compared by type and message.
"""
import copy
import inspect
import math
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import fastsgd
from fastsgd import lr_scheduler as fast_sched

torch = pytest.importorskip("torch")
torch_sched = torch.optim.lr_scheduler

LRS = (0.1, 0.03, 0.007)
STEPS = 320
NAMES = [
    "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
    "ExponentialLR", "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
    "CyclicLR", "OneCycleLR", "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau",
    "LRScheduler",
]


def make_optimizer(lib, lrs=LRS, momentum=0.9):
    """An SGD over one small parameter per group, with grads, for `lib` (a module)."""
    groups = []
    for i, lr in enumerate(lrs):
        values = np.linspace(-1.0, 1.0, 4) * (i + 1)
        if lib is fast_sched:
            p = fastsgd.Parameter(values.copy())
            p.grad = values * 0.01
        else:
            p = torch.nn.Parameter(torch.from_numpy(values.copy()))
            p.grad = torch.from_numpy(values * 0.01)
        groups.append({"params": [p], "lr": lr})
    SGD = fastsgd.SGD if lib is fast_sched else torch.optim.SGD
    return SGD(groups, lr=0.5, momentum=momentum)


def groups_of(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


class Decay:
    """A callable object: its attributes go into state_dict()."""

    def __init__(self, rate=0.97):
        self.rate = rate

    def __call__(self, epoch):
        return self.rate**epoch


class Scale:
    def __init__(self):
        self.half_life = 3.0

    def __call__(self, x):
        return 0.5 ** (x / self.half_life)


# Each scenario: (lib, optimizer) -> scheduler; `lib` is fastsgd's or torch's module.
SCENARIOS = {
    "LambdaLR-per-group": lambda L, o: L.LambdaLR(
        o, [lambda e: 1 / (1 + e), Decay(), lambda e: 0.999**e * math.sin(e / 7 + 1)]),
    "LambdaLR-one": lambda L, o: L.LambdaLR(o, lambda e: e // 30 + 0.1),
    "MultiplicativeLR": lambda L, o: L.MultiplicativeLR(o, lambda e: 0.99 if e % 3 else 1.01),
    "MultiplicativeLR-per-group": lambda L, o: L.MultiplicativeLR(
        o, (Decay(0.995), Decay(1.001), lambda e: 1.0)),
    "StepLR": lambda L, o: L.StepLR(o, step_size=7, gamma=0.9),
    "StepLR-default": lambda L, o: L.StepLR(o, 30),
    "MultiStepLR": lambda L, o: L.MultiStepLR(o, milestones=[5, 40, 40, 200], gamma=0.7),
    "ConstantLR": lambda L, o: L.ConstantLR(o, factor=0.3, total_iters=40),
    "ConstantLR-default": lambda L, o: L.ConstantLR(o),
    "LinearLR": lambda L, o: L.LinearLR(o, start_factor=0.05, end_factor=0.9, total_iters=250),
    "LinearLR-default": lambda L, o: L.LinearLR(o),
    "ExponentialLR": lambda L, o: L.ExponentialLR(o, gamma=0.987),
    "PolynomialLR": lambda L, o: L.PolynomialLR(o, total_iters=290, power=2.5),
    "PolynomialLR-default": lambda L, o: L.PolynomialLR(o),
    "CosineAnnealingLR": lambda L, o: L.CosineAnnealingLR(o, T_max=37, eta_min=0.001),
    "CosineAnnealingLR-default": lambda L, o: L.CosineAnnealingLR(o, 100),
    "CosineAnnealingWarmRestarts": lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=13, eta_min=1e-4),
    "CosineAnnealingWarmRestarts-mult": lambda L, o: L.CosineAnnealingWarmRestarts(o, 5, T_mult=2),
    "CyclicLR-triangular": lambda L, o: L.CyclicLR(o, base_lr=0.01, max_lr=[0.1, 0.2, 0.3], step_size_up=23),
    "CyclicLR-triangular2": lambda L, o: L.CyclicLR(
        o, base_lr=[0.01, 0.02, 0.001], max_lr=0.5, step_size_up=17, step_size_down=29,
        mode="triangular2", base_momentum=[0.7, 0.75, 0.8], max_momentum=0.95),
    "CyclicLR-exp_range": lambda L, o: L.CyclicLR(
        o, 0.001, 0.1, step_size_up=31, mode="exp_range", gamma=0.993),
    "CyclicLR-scale_fn": lambda L, o: L.CyclicLR(
        o, 0.001, 0.1, step_size_up=11, scale_fn=Scale(), scale_mode="iterations"),
    "CyclicLR-no-momentum": lambda L, o: L.CyclicLR(o, 0.001, 0.1, step_size_up=9, cycle_momentum=False),
    "OneCycleLR-cos": lambda L, o: L.OneCycleLR(o, max_lr=[0.5, 1.0, 2.0], total_steps=STEPS + 1),
    "OneCycleLR-linear": lambda L, o: L.OneCycleLR(
        o, max_lr=0.4, epochs=11, steps_per_epoch=30, pct_start=0.25, anneal_strategy="linear",
        base_momentum=[0.8, 0.82, 0.84], max_momentum=0.97, div_factor=10.0, final_div_factor=100.0),
    "OneCycleLR-three-phase": lambda L, o: L.OneCycleLR(
        o, max_lr=0.9, total_steps=STEPS, three_phase=True),
    "OneCycleLR-no-momentum": lambda L, o: L.OneCycleLR(
        o, max_lr=0.9, total_steps=STEPS, cycle_momentum=False),
    "SequentialLR": lambda L, o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, total_iters=20), L.CosineAnnealingLR(o, T_max=100)], milestones=[20]),
    "SequentialLR-three": lambda L, o: L.SequentialLR(
        o, [L.ConstantLR(o, 0.5, total_iters=10), L.ExponentialLR(o, 0.99),
            L.StepLR(o, 25, gamma=0.5)], milestones=[10, 120]),
    "ChainedScheduler": lambda L, o: L.ChainedScheduler(
        [L.ConstantLR(o, factor=0.2, total_iters=30), L.ExponentialLR(o, gamma=0.995)]),
    "ChainedScheduler-optimizer": lambda L, o: L.ChainedScheduler(
        [L.MultiStepLR(o, [50, 90]), L.LinearLR(o, 0.25, total_iters=60),
         L.MultiplicativeLR(o, lambda e: 0.998)], optimizer=o),
    "SequentialLR-of-ChainedScheduler": lambda L, o: L.SequentialLR(
        o, [L.ChainedScheduler([L.LinearLR(o, 0.5, total_iters=15), L.StepLR(o, 4, 0.9)]),
            L.PolynomialLR(o, total_iters=200, power=0.5)], milestones=[40]),
}
CYCLING = [name for name in SCENARIOS if name.startswith(("CyclicLR", "OneCycleLR"))]


def twins(scenario):
    """(fastsgd optimizer, its scheduler, torch optimizer, its scheduler)."""
    fo, to = make_optimizer(fast_sched), make_optimizer(torch_sched)
    return fo, SCENARIOS[scenario](fast_sched, fo), to, SCENARIOS[scenario](torch_sched, to)


def assert_same(fo, fs, to, ts, where=""):
    assert groups_of(fo) == groups_of(to), where
    assert fs.get_last_lr() == ts.get_last_lr(), where


def run(fo, fs, to, ts, steps, start=0):
    for i in range(start, steps):
        fo.step()
        to.step()
        fs.step()
        ts.step()
        assert_same(fo, fs, to, ts, f"step {i}")


# ----------------------------------------------------------------- sequences


def trace(lib, scenario):
    """The groups and get_last_lr() after construction and after each step, the
    warnings given on the way, and the final state_dict()."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = make_optimizer(lib)
        sched = SCENARIOS[scenario](lib, opt)
        seen = [(groups_of(opt), sched.get_last_lr())]
        for _ in range(STEPS):
            opt.step()
            sched.step()
            seen.append((groups_of(opt), sched.get_last_lr()))
    return seen, [(w.category, str(w.message)) for w in caught], sched.state_dict()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sequence_matches_torch(scenario):
    seen, warned, state = trace(fast_sched, scenario)
    ref_seen, ref_warned, ref_state = trace(torch_sched, scenario)
    assert len(seen) == len(ref_seen) == STEPS + 1
    for i, (fast, ref) in enumerate(zip(seen, ref_seen)):
        assert fast == ref, f"after {i} steps"
    assert warned == ref_warned
    assert state == ref_state


@pytest.mark.parametrize("scenario", CYCLING)
def test_cycled_momentum_moves(scenario):
    """The cycling scenarios really cycle momentum (the equality above is not vacuous)."""
    fo, fs, _, _ = twins(scenario)
    seen = set()
    for _ in range(STEPS - 1):
        fo.step()
        fs.step()
        seen.add(fo.param_groups[1]["momentum"])
    if fs.cycle_momentum:
        assert len(seen) > 20
    else:
        assert seen == {0.9}


@pytest.mark.parametrize("name", NAMES)
def test_signature_matches_torch(name):
    fast, ref = getattr(fast_sched, name), getattr(torch_sched, name)
    params = [(p.name, p.kind, p.default) for p in inspect.signature(fast).parameters.values()]
    ref_params = [(p.name, p.kind, p.default) for p in inspect.signature(ref).parameters.values()]
    assert params == ref_params


def test_exports_match_torch():
    assert fast_sched.__all__ == torch_sched.__all__
    assert fastsgd.lr_scheduler is fast_sched and "lr_scheduler" in fastsgd.__all__


def test_module_does_not_import_torch():
    code = "import sys, fastsgd.lr_scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


CLOSED_FORM = ["StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
               "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts-mult",
               "LambdaLR-per-group", "CyclicLR-triangular2"]


@pytest.mark.parametrize("scenario", CLOSED_FORM)
def test_step_with_epoch_matches_torch(scenario):
    """The deprecated step(epoch): closed forms where torch has them, and its warning."""
    fo, fs, to, ts = twins(scenario)
    for epoch in [3, 4, 9, 2, 40, 41, 120, 7, 33, 260, 261, *range(11, 300, 5)]:
        fo.step()
        to.step()
        with warnings.catch_warnings(record=True) as fw:
            warnings.simplefilter("always")
            fs.step(epoch)
        with warnings.catch_warnings(record=True) as tw:
            warnings.simplefilter("always")
            ts.step(epoch)
        assert [str(w.message) for w in fw] == [str(w.message) for w in tw]
        assert_same(fo, fs, to, ts, f"epoch {epoch}")
    run(fo, fs, to, ts, 30)


def test_warm_restarts_fractional_epochs():
    fo, fs, to, ts = twins("CosineAnnealingWarmRestarts-mult")
    for i in range(200):
        fo.step()
        to.step()
        epoch = i / 7 + (i % 5) * 0.01
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fs.step(epoch)
            ts.step(epoch)
        assert_same(fo, fs, to, ts, f"epoch {epoch}")
        assert (fs.T_cur, fs.T_i, fs.last_epoch) == (ts.T_cur, ts.T_i, ts.last_epoch)


@pytest.mark.parametrize("scenario", ["ExponentialLR", "CosineAnnealingLR", "OneCycleLR-cos",
                                      "SequentialLR", "CyclicLR-exp_range"])
def test_array_lrs_are_updated_in_place(scenario):
    """A group lr given as a 0-d array follows the float sequence, in the same array."""
    ref = make_optimizer(fast_sched)
    opt = make_optimizer(fast_sched, lrs=[np.array(lr) for lr in LRS])
    arrays = [g["lr"] for g in opt.param_groups]
    ref_s, sched = SCENARIOS[scenario](fast_sched, ref), SCENARIOS[scenario](fast_sched, opt)
    for _ in range(STEPS - 1):
        ref.step()
        opt.step()
        ref_s.step()
        sched.step()
        assert [float(g["lr"]) for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
        assert all(g["lr"] is a for g, a in zip(opt.param_groups, arrays))
        assert sched.get_last_lr() == ref_s.get_last_lr()
        assert not any(x is a for x, a in zip(sched.get_last_lr(), arrays))


# ------------------------------------------------------------------ plateau


def metrics(n=STEPS, seed=0):
    """Improving, then noisy plateaus and drops, with exact repeats."""
    rng = np.random.default_rng(seed)
    values = [float(v) for v in np.concatenate([
        np.linspace(10, 1, 40), np.ones(10), 1 + rng.normal(0, 1e-4, 60), np.full(30, 0.99995)])]
    values += [min(values)] * 20  # exactly the best so far
    values += [float(v) for v in 0.5 + rng.normal(0, 0.1, n - len(values))]
    return values


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
@pytest.mark.parametrize("kwargs", [
    {},
    {"factor": 0.5, "patience": 3, "threshold": 1e-3, "cooldown": 4, "min_lr": [1e-3, 0, 1e-4]},
    {"factor": 0.9, "patience": 0, "threshold": 0.0, "min_lr": 2e-3, "eps": 1e-4},
], ids=["default", "cooldown-min_lrs", "patience0"])
def test_reduce_on_plateau_matches_torch(mode, threshold_mode, kwargs):
    fo, to = make_optimizer(fast_sched), make_optimizer(torch_sched)
    fs = fast_sched.ReduceLROnPlateau(fo, mode=mode, threshold_mode=threshold_mode, **kwargs)
    ts = torch_sched.ReduceLROnPlateau(to, mode=mode, threshold_mode=threshold_mode, **kwargs)
    sign = 1 if mode == "min" else -1
    for i, m in enumerate(metrics()):
        fo.step()
        to.step()
        fs.step(sign * m)
        ts.step(sign * m)
        assert_same(fo, fs, to, ts, f"step {i}")
        assert (fs.best, fs.num_bad_epochs, fs.cooldown_counter) == (
            ts.best, ts.num_bad_epochs, ts.cooldown_counter)
    assert fo.param_groups[0]["lr"] < LRS[0]  # it did reduce
    assert fs.state_dict() == ts.state_dict()


def test_reduce_on_plateau_array_metric_and_lr():
    opt = make_optimizer(fast_sched, lrs=[np.array(lr) for lr in LRS])
    sched = fast_sched.ReduceLROnPlateau(opt, patience=0)
    sched.step(np.array([1.0]))
    sched.step(np.array(2.0))
    assert [float(g["lr"]) for g in opt.param_groups] == [lr * 0.1 for lr in LRS]
    assert isinstance(opt.param_groups[0]["lr"], np.ndarray)


def test_reduce_on_plateau_new_group():
    """A param group added later: a scalar min_lr extends, a list raises torch's error."""
    results = []
    for L in (fast_sched, torch_sched):
        outcome = []
        for min_lr in (0.0, [0.0, 0.0, 0.0]):
            opt = make_optimizer(L)
            sched = L.ReduceLROnPlateau(opt, patience=0, min_lr=min_lr)
            extra = make_optimizer(L).param_groups[0]["params"]
            opt.add_param_group({"params": extra, "lr": 0.2})
            sched.step(1.0)
            try:
                sched.step(2.0)
                outcome.append([g["lr"] for g in opt.param_groups])
            except RuntimeError as e:
                outcome.append(str(e))
        results.append(outcome)
    assert results[0] == results[1]
    assert "differs from when `ReduceLROnPlateau` was initialized" in results[0][1]


# ----------------------------------------------------------------- resuming


RESUMABLE = [name for name in SCENARIOS]


@pytest.mark.filterwarnings("ignore::UserWarning")  # compared elsewhere
@pytest.mark.parametrize("scenario", RESUMABLE)
def test_state_dict_resume_matches_uninterrupted_and_torch(scenario):
    """torch's documented resume: new optimizer, new scheduler, then load both
    state dicts; the run goes on as if never interrupted, on both sides."""
    fo, fs, to, ts = twins(scenario)
    run(fo, fs, to, ts, 137)
    saved = {lib: copy.deepcopy((o.state_dict(), s.state_dict()))
             for lib, o, s in ((fast_sched, fo, fs), (torch_sched, to, ts))}
    run(fo, fs, to, ts, STEPS, start=137)

    resumed, keys_left = {}, []
    for lib in (fast_sched, torch_sched):
        opt = make_optimizer(lib)
        sched = SCENARIOS[scenario](lib, opt)
        opt_state, sched_state = saved[lib]
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
        keys_left.append(list(sched_state))  # what loading left in the caller's dict
        resumed[lib] = (opt, sched)
    assert keys_left[0] == keys_left[1]
    ro, rs = resumed[fast_sched]
    rto, rts = resumed[torch_sched]
    assert_same(ro, rs, rto, rts, "after loading")
    run(ro, rs, rto, rts, STEPS, start=137)
    assert_same(ro, rs, fo, fs, "resumed vs uninterrupted")
    assert rs.state_dict() == fs.state_dict()


def test_cyclic_state_dict_into_other_mode():
    """Loading restores mode, gamma and the scale function they make."""
    runs = []
    for L in (fast_sched, torch_sched):
        opt = make_optimizer(L)
        sched = SCENARIOS["CyclicLR-exp_range"](L, opt)
        for _ in range(50):
            opt.step()
            sched.step()
        other = L.CyclicLR(make_optimizer(L), 0.001, 0.1, step_size_up=31, mode="triangular2")
        other.load_state_dict(copy.deepcopy(sched.state_dict()))
        other.optimizer.load_state_dict(copy.deepcopy(opt.state_dict()))
        lrs = []
        for _ in range(100):
            other.optimizer.step()
            other.step()
            lrs.append(other.get_last_lr() + [g["momentum"] for g in other.optimizer.param_groups])
            opt.step()
            sched.step()
        assert groups_of(other.optimizer) == groups_of(opt)
        runs.append(lrs)
    assert runs[0] == runs[1]


LAST_EPOCH = [name for name in SCENARIOS if not name.startswith("ChainedScheduler")]


@pytest.mark.filterwarnings("ignore::UserWarning")  # compared elsewhere
@pytest.mark.parametrize("scenario", LAST_EPOCH)
def test_last_epoch_resume_matches_torch(scenario):
    """Resuming by constructing with last_epoch=k over a loaded optimizer state
    (which holds initial_lr, max_lr, ...): the same sequence as torch's."""
    fo, fs, to, ts = twins(scenario)
    run(fo, fs, to, ts, 100)
    resumed = []
    for lib, opt in ((fast_sched, fo), (torch_sched, to)):
        new_opt = make_optimizer(lib)
        new_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        sched = _with_last_epoch(scenario, lib, new_opt, 100)
        resumed.append((new_opt, sched))
    (ro, rs), (rto, rts) = resumed
    assert_same(ro, rs, rto, rts, "after construction")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _outcome(rs.get_lr) == _outcome(rts.get_lr)  # as seen just after resuming
    run(ro, rs, rto, rts, 250, start=100)


def _with_last_epoch(scenario, lib, opt, last_epoch):
    """The scenario's scheduler, each scheduler in it made with `last_epoch`."""
    def resuming(cls):
        return lambda *args, **kwargs: cls(*args, last_epoch=last_epoch, **kwargs)

    no_last_epoch = ("ChainedScheduler", "ReduceLROnPlateau", "LRScheduler")
    lib_resuming = SimpleNamespace(**{
        name: getattr(lib, name) if name in no_last_epoch else resuming(getattr(lib, name))
        for name in NAMES})
    return SCENARIOS[scenario](lib_resuming, opt)


@pytest.mark.parametrize("name", ["StepLR", "ExponentialLR", "CosineAnnealingLR", "LambdaLR"])
def test_last_epoch_without_initial_lr(name):
    args = {"StepLR": (3,), "ExponentialLR": (0.9,), "CosineAnnealingLR": (10,),
            "LambdaLR": (lambda e: 1.0,)}[name]
    errors = []
    for L in (fast_sched, torch_sched):
        opt = make_optimizer(L)
        opt.param_groups[0]["initial_lr"] = 0.1  # only group 1 lacks it
        with pytest.raises(KeyError) as info:
            getattr(L, name)(opt, *args, last_epoch=5)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "param_groups[1]" in errors[0]


def test_initial_lr_kept_by_second_scheduler():
    """initial_lr is set once: a second scheduler starts from it, not from the lr."""
    for_both = []
    for L in (fast_sched, torch_sched):
        opt = make_optimizer(L)
        first = L.ExponentialLR(opt, 0.5)
        opt.step()
        first.step()
        second = L.StepLR(opt, 2)
        for_both.append((groups_of(opt), second.base_lrs))
    assert for_both[0] == for_both[1]
    assert for_both[0][1] == list(LRS)


# --------------------------------------------------------- errors, warnings


def _outcome(fn):
    """("ok", what fn returns), or the type name and message of what it raises."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - compared to torch's
        return type(e).__name__, str(e)


ERRORS = {
    "LambdaLR-count": lambda L, o: L.LambdaLR(o, [abs, abs]),
    "MultiplicativeLR-count": lambda L, o: L.MultiplicativeLR(o, (abs,)),
    "MultiplicativeLR-callable": lambda L, o: L.MultiplicativeLR(o, [abs, 0.5, abs]),
    "ConstantLR-factor": lambda L, o: L.ConstantLR(o, factor=1.5),
    "ConstantLR-negative": lambda L, o: L.ConstantLR(o, factor=-0.1),
    "LinearLR-start": lambda L, o: L.LinearLR(o, start_factor=0),
    "LinearLR-end": lambda L, o: L.LinearLR(o, end_factor=1.1),
    "WarmRestarts-T_0": lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=0),
    "WarmRestarts-T_0-float": lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=2.0),
    "WarmRestarts-T_mult": lambda L, o: L.CosineAnnealingWarmRestarts(o, 5, T_mult=0),
    "WarmRestarts-eta_min": lambda L, o: L.CosineAnnealingWarmRestarts(o, 5, eta_min="0"),
    "WarmRestarts-negative-epoch": lambda L, o: L.CosineAnnealingWarmRestarts(o, 5).step(-1),
    "CyclicLR-mode": lambda L, o: L.CyclicLR(o, 0.1, 1.0, mode="square"),
    "CyclicLR-base_lr": lambda L, o: L.CyclicLR(o, [0.1, 0.2], 1.0),
    "CyclicLR-max_lr": lambda L, o: L.CyclicLR(o, 0.1, (1.0,)),
    "CyclicLR-base_momentum": lambda L, o: L.CyclicLR(o, 0.1, 1.0, base_momentum=[0.8]),
    "CyclicLR-momentums": lambda L, o: L.CyclicLR(o, 0.1, 1.0, base_momentum=[0.8], max_momentum=[1]),
    "CyclicLR-no-optimizer": lambda L, o: L.CyclicLR([o], 0.1, 1.0),
    "OneCycleLR-total_steps": lambda L, o: L.OneCycleLR(o, 1.0, total_steps=0),
    "OneCycleLR-total_steps-float": lambda L, o: L.OneCycleLR(o, 1.0, total_steps=10.0),
    "OneCycleLR-nothing": lambda L, o: L.OneCycleLR(o, 1.0, epochs=3),
    "OneCycleLR-epochs": lambda L, o: L.OneCycleLR(o, 1.0, epochs=0, steps_per_epoch=3),
    "OneCycleLR-steps_per_epoch": lambda L, o: L.OneCycleLR(o, 1.0, epochs=2, steps_per_epoch=2.5),
    "OneCycleLR-pct_start": lambda L, o: L.OneCycleLR(o, 1.0, 10, pct_start=1.5),
    "OneCycleLR-pct_start-int": lambda L, o: L.OneCycleLR(o, 1.0, 10, pct_start=1),
    "OneCycleLR-anneal": lambda L, o: L.OneCycleLR(o, 1.0, 10, anneal_strategy="cosine"),
    "OneCycleLR-max_lr": lambda L, o: L.OneCycleLR(o, [1.0], 10),
    "OneCycleLR-momentums": lambda L, o: L.OneCycleLR(o, 1.0, 10, base_momentum=[1], max_momentum=[2]),
    "OneCycleLR-too-many-steps": lambda L, o: [s.step() for s in [L.OneCycleLR(o, 1.0, 5)] for _ in range(6)],
    "OneCycleLR-no-optimizer": lambda L, o: L.OneCycleLR(None, 1.0, 10),
    "StepLR-no-optimizer": lambda L, o: L.StepLR("sgd", 3),
    "LambdaLR-no-optimizer": lambda L, o: L.LambdaLR(o.param_groups, abs),
    "Plateau-factor": lambda L, o: L.ReduceLROnPlateau(o, factor=1.0),
    "Plateau-mode": lambda L, o: L.ReduceLROnPlateau(o, mode="minimum"),
    "Plateau-threshold_mode": lambda L, o: L.ReduceLROnPlateau(o, threshold_mode="relative"),
    "Plateau-min_lr": lambda L, o: L.ReduceLROnPlateau(o, min_lr=[0.0, 0.1]),
    "Plateau-no-optimizer": lambda L, o: L.ReduceLROnPlateau(3),
    "Plateau-metric": lambda L, o: L.ReduceLROnPlateau(o).step("loss"),
    "SequentialLR-empty": lambda L, o: L.SequentialLR(o, [], []),
    "SequentialLR-milestones": lambda L, o: L.SequentialLR(o, [L.StepLR(o, 2), L.StepLR(o, 3)], [1, 2]),
    "SequentialLR-plateau": lambda L, o: L.SequentialLR(o, [L.StepLR(o, 2), L.ReduceLROnPlateau(o)], [3]),
    "SequentialLR-not-scheduler": lambda L, o: L.SequentialLR(o, [L.StepLR(o, 2), 0.5], [3]),
    "SequentialLR-other-optimizer": lambda L, o: L.SequentialLR(
        o, [L.StepLR(o, 2), L.StepLR(make_optimizer(L), 2)], [3]),
    "ChainedScheduler-empty": lambda L, o: L.ChainedScheduler([]),
    "ChainedScheduler-plateau": lambda L, o: L.ChainedScheduler([L.ReduceLROnPlateau(o)]),
    "ChainedScheduler-not-scheduler": lambda L, o: L.ChainedScheduler([L.StepLR(o, 2), "x"]),
    "ChainedScheduler-other-optimizer": lambda L, o: L.ChainedScheduler(
        [L.StepLR(o, 2)], optimizer=make_optimizer(L)),
    "LRScheduler-get_lr": lambda L, o: L.LRScheduler(o),
    "LambdaLR-group-added": lambda L, o: _group_added(L.LambdaLR(o, lambda e: 1.0)).step(),
    "CyclicLR-group-added": lambda L, o: _group_added(L.CyclicLR(o, 0.01, 0.1)).step(),
}


def _group_added(scheduler):
    """The scheduler, its optimizer given one more param group since it was made."""
    opt = scheduler.optimizer
    opt.add_param_group({"params": make_optimizer(fast_sched if isinstance(opt, fastsgd.Optimizer)
                                                  else torch_sched).param_groups[0]["params"]})
    return scheduler


@pytest.mark.filterwarnings("ignore::UserWarning")  # compared elsewhere
@pytest.mark.parametrize("case", ERRORS)
def test_errors_match_torch(case):
    fast = _outcome(lambda: ERRORS[case](fast_sched, make_optimizer(fast_sched)))
    ref = _outcome(lambda: ERRORS[case](torch_sched, make_optimizer(torch_sched)))
    assert fast[0] != "ok"
    assert fast == ref


def test_optimizer_type_is_checked():
    """Each library's schedulers refuse the other's optimizers, in the same words."""
    fast = _outcome(lambda: fast_sched.StepLR(make_optimizer(torch_sched), 3))
    ref = _outcome(lambda: torch_sched.StepLR(make_optimizer(fast_sched), 3))
    assert fast == ref == ("TypeError", "SGD is not an Optimizer")


def test_no_momentum_to_cycle():
    class Plain(fastsgd.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        def step(self, closure=None):
            pass

    opt = Plain([fastsgd.Parameter(np.zeros(2))])
    ref = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))])
    for make in (lambda L, o: L.CyclicLR(o, 0.1, 1.0), lambda L, o: L.OneCycleLR(o, 1.0, 10)):
        fast = _outcome(lambda make=make: make(fast_sched, opt))
        assert fast == _outcome(lambda make=make: make(torch_sched, ref))
        assert fast == ("ValueError",
                        "optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
    # Without momentum cycling it runs, and lr follows the cycle.
    sched = fast_sched.CyclicLR(opt, 0.1, 1.0, step_size_up=2, cycle_momentum=False)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.55


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(w.category, str(w.message)) for w in caught]


def _scheduler_first(make):
    """The scheduler stepped once before the optimizer, then in the right order."""
    def scenario(L, o):
        s = make(L, o)
        s.step()
        o.step()
        s.step()
    return scenario


def _step_overridden(L, o):
    s = L.ExponentialLR(o, 0.9)
    o.step = lambda closure=None: None
    o.step()
    s.step()


def _get_lr_outside_step(L, o):
    L.MultiStepLR(o, [1]).get_lr()


def _epoch_given(L, o):
    s = L.LinearLR(o)
    o.step()
    s.step(3)
    L.ReduceLROnPlateau(o).step(1.0, epoch=2)


def _right_order(L, o):
    s = L.CyclicLR(o, 0.01, 0.1, step_size_up=3)
    for _ in range(10):
        o.step()
        s.step()


WARNINGS = {
    "scheduler-step-first": (_scheduler_first(lambda L, o: L.StepLR(o, 2)), 1),
    "optimizer-step-overridden": (_step_overridden, 1),
    "get_lr-outside-step": (_get_lr_outside_step, 1),
    "epoch-deprecated": (_epoch_given, 2),
    "right-order": (_right_order, 0),
    # CosineAnnealingWarmRestarts.step does not check the order in torch either.
    "warm-restarts-step-first": (_scheduler_first(lambda L, o: L.CosineAnnealingWarmRestarts(o, 3)), 0),
}


@pytest.mark.parametrize("case", WARNINGS)
def test_warnings_match_torch(case):
    fn, count = WARNINGS[case]
    fast = _warnings_of(lambda: fn(fast_sched, make_optimizer(fast_sched)))
    ref = _warnings_of(lambda: fn(torch_sched, make_optimizer(torch_sched)))
    assert fast == ref
    assert len(fast) == count


def test_optimizer_step_wrapped_once():
    """Several schedulers on one optimizer wrap its step once; it still returns
    the closure's loss, and marks the optimizer as stepped."""
    opt = make_optimizer(fast_sched)
    fast_sched.StepLR(opt, 2)
    wrapped = opt.step
    fast_sched.ExponentialLR(opt, 0.9)
    assert opt.step is wrapped and wrapped._wrapped_by_lr_sched
    assert not getattr(opt, "_opt_called", False)
    assert opt.step(lambda: 1.5) == 1.5
    assert opt._opt_called is True
