"""fastsgd.swa_utils against torch.optim.swa_utils and fastsgd.reference: AveragedModel's
averages bit for bit (default, SWA and EMA multi-tensor functions, per-array functions) for all
four dtypes, SWALR's learning rates exactly, and torch's errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastsgd
from fastsgd import reference, swa_utils

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16),
          np.dtype(ml_dtypes.bfloat16)]
TORCH_DTYPE = dict(zip(DTYPES, [torch.float32, torch.float64, torch.float16, torch.bfloat16]))
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# across torch's vector bodies and scalar remainders
SHAPES = [(1,), (7,), (33,), (65,), (3, 5, 7), (), (1000,), (0,), (70_001,)]
# the kernels that round as torch's do here, and fastsgd.reference's fma flag for each
FUSED = torch.backends.cpu.get_cpu_capability().lower() != "default"
TORCH_KERNELS = [c for c in fastsgd.available_capabilities() if (c != "default") == FUSED]


def bits(x):
    if isinstance(x, torch.Tensor):
        x = to_numpy(x)
    x = np.asarray(x)
    return x.view(UINT[x.dtype.itemsize])


def to_torch(array):
    array = np.array(array)
    if array.dtype.itemsize == 2 and array.dtype != np.float16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor, dtype=None):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


@pytest.fixture
def kernel():
    previous = fastsgd.cpu_capability()
    yield fastsgd.set_cpu_capability
    fastsgd.set_cpu_capability(previous)


def models(rng, dtypes):
    """Model values per update: (fastsgd Parameters, a torch ParameterList) of the same values."""
    values = [np.asarray(rng.standard_normal(s) * 3, np.float32).astype(dtypes[i % len(dtypes)])
              for i, s in enumerate(SHAPES)]
    fast = [fastsgd.Parameter(v.copy()) for v in values]
    ref = torch.nn.ParameterList([torch.nn.Parameter(to_torch(v)) for v in values])
    return fast, ref


def move(rng, fast, ref):
    """New model values, as after some training steps."""
    for p, t in zip(fast, ref):
        p[...] = (np.asarray(p, np.float32) + rng.standard_normal(p.shape)).astype(p.dtype)
        with torch.no_grad():
            t.copy_(to_torch(p))


MODES = {
    "default": ({}, {}),
    "swa_multi": ({"multi_avg_fn": swa_utils.get_swa_multi_avg_fn()},
                  {"multi_avg_fn": torch.optim.swa_utils.get_swa_multi_avg_fn()}),
    "ema_multi": ({"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.9)},
                  {"multi_avg_fn": torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)}),
    "ema_multi_default_decay": ({"multi_avg_fn": swa_utils.get_ema_multi_avg_fn()},
                                {"multi_avg_fn": torch.optim.swa_utils.get_ema_multi_avg_fn()}),
    "ema": ({"avg_fn": swa_utils.get_ema_avg_fn(0.75)},
            {"avg_fn": torch.optim.swa_utils.get_ema_avg_fn(0.75)}),
    "swa": ({"avg_fn": swa_utils.get_swa_avg_fn()},
            {"avg_fn": torch.optim.swa_utils.get_swa_avg_fn()}),
}


@pytest.mark.parametrize("capability", TORCH_KERNELS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtypes", [[d] for d in DTYPES] + [DTYPES],
                         ids=[d.name for d in DTYPES] + ["mixed"])
def test_averaged_model_is_torchs_bit_for_bit(kernel, capability, mode, dtypes):
    kernel(capability)
    rng = np.random.default_rng(len(mode))
    fast, ref = models(rng, dtypes)
    ours_kw, theirs_kw = MODES[mode]
    ours = swa_utils.AveragedModel(fast, **ours_kw)
    theirs = torch.optim.swa_utils.AveragedModel(ref, **theirs_kw)
    for _ in range(5):
        move(rng, fast, ref)
        ours.update_parameters(fast)
        theirs.update_parameters(ref)
        for a, t in zip(ours.parameters(), theirs.module.parameters()):
            assert a.dtype == to_numpy(t).dtype
            np.testing.assert_array_equal(bits(a), bits(t))
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state["n_averaged"].dtype == np.int64 and ours_state["n_averaged"].shape == ()
    assert ours_state["n_averaged"] == theirs_state["n_averaged"].item() == 5


@pytest.mark.parametrize("capability", fastsgd.available_capabilities())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_the_kernels_are_the_numpy_reference(kernel, capability, dtype):
    kernel(capability)
    rng = np.random.default_rng(1)
    fused = capability != "default"
    for shape in SHAPES:
        avg = np.asarray(rng.standard_normal(shape), np.float32).astype(dtype)
        cur = np.asarray(rng.standard_normal(shape) * 5, np.float32).astype(dtype)
        for weight in (1 / 3, 0.001, 0.5, 0.9, 1.0, 0.0):
            ours = avg.copy()
            fastsgd._native.lerp_arrays([ours], [cur], weight)
            np.testing.assert_array_equal(bits(ours), bits(reference.lerp(avg, cur, weight, fused)))
        for count in (2.0, 3.0, 7.0, 1000.0):
            ours = avg.copy()
            fastsgd._native.mean_arrays([ours], [cur], count)
            np.testing.assert_array_equal(bits(ours), bits(reference.running_mean(avg, cur, count)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_multi_avg_fns_called_directly_take_torchs_weights(dtype):
    """An int n_averaged gives the double 1 / (n + 1), as in torch."""
    rng = np.random.default_rng(2)
    avg = np.asarray(rng.standard_normal(100), np.float32).astype(dtype)
    cur = np.asarray(rng.standard_normal(100), np.float32).astype(dtype)
    for n in (1, 2, 4, 6):
        for ours_fn, torch_fn in [(swa_utils.get_swa_multi_avg_fn(),
                                   torch.optim.swa_utils.get_swa_multi_avg_fn()),
                                  (swa_utils.get_ema_multi_avg_fn(0.6),
                                   torch.optim.swa_utils.get_ema_multi_avg_fn(0.6))]:
            ours, theirs = avg.copy(), to_torch(avg)
            ours_fn([ours], [cur], n)
            torch_fn([theirs], [to_torch(cur)], n)
            np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_one_native_call_per_dtype_and_the_averages_are_copies():
    params = [fastsgd.Parameter(np.ones(3, np.float32)), fastsgd.Parameter(np.ones((2, 2)).T)]
    model = swa_utils.AveragedModel(params)
    averages = list(model.parameters())
    assert all(isinstance(a, fastsgd.Parameter) for a in averages)
    assert not np.shares_memory(averages[0], params[0])
    assert averages[1].flags.f_contiguous  # the model's memory order
    model.update_parameters(params)
    params[0][...] = 3.0
    model.update_parameters(params)
    np.testing.assert_array_equal(averages[0], 2.0)  # (1 + 3) / 2
    assert model.n_averaged == 2 and model.n_averaged.dtype == np.int64


def test_state_dict_round_trip_and_its_refusals(tmp_path):
    rng = np.random.default_rng(3)
    fast, _ = models(rng, DTYPES)
    model = swa_utils.AveragedModel(fast, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.5))
    for _ in range(3):
        for p in fast:
            p[...] = (np.asarray(p, np.float32) + 1).astype(p.dtype)
        model.update_parameters(fast)
    state = model.state_dict()
    assert state["n_averaged"] is model.n_averaged  # torch's holds its buffer itself
    other = swa_utils.AveragedModel(fast)
    fastsgd.save(state, tmp_path / "averages.ckpt")  # a checkpoint keeps it
    other.load_state_dict(fastsgd.load(tmp_path / "averages.ckpt"))
    assert other.n_averaged == 3 and other.n_averaged is not model.n_averaged
    for a, b in zip(other.parameters(), model.parameters()):
        np.testing.assert_array_equal(bits(a), bits(b))
    before = [np.array(a) for a in other.parameters()]
    bad = {"params": state["params"][:-1], "n_averaged": np.array(9)}
    with pytest.raises(ValueError, match="state_dict holds 8 params, but the AveragedModel "
                                         "averages 9"):
        other.load_state_dict(bad)
    bad = {"params": [p.astype(np.float64) for p in state["params"]], "n_averaged": 1}
    with pytest.raises(ValueError, match=r"state_dict\['params'\]\[0\] has dtype float64"):
        other.load_state_dict(bad)
    with pytest.raises(KeyError, match="n_averaged"):
        other.load_state_dict({"params": state["params"]})
    assert other.n_averaged == 3
    for a, b in zip(other.parameters(), before):
        np.testing.assert_array_equal(bits(a), bits(b))


def test_update_parameters_checks_everything_before_it_writes():
    params = [fastsgd.Parameter(np.zeros(4, np.float32)), fastsgd.Parameter(np.zeros(3))]
    model = swa_utils.AveragedModel(params)
    model.update_parameters(params)
    cases = [
        ([np.ones(4, np.float32)], ValueError, "update_parameters got 1 params, but the "
                                               "AveragedModel averages 2"),
        ([np.ones(4, np.float32), np.ones(3, np.float32)], ValueError,
         r"params\[1\] has dtype float32 and shape \(3,\), but its average has dtype float64"),
        ([np.ones(4, np.float32), np.ones(4)], ValueError, r"params\[1\] has dtype float64 and "
                                                           r"shape \(4,\)"),
        ([np.ones(4, np.float32), np.ones(6)[::2]], ValueError,
         r"params\[1\] must be contiguous in the memory order of its average \(C\)"),
        ([np.ones(4, np.float32), [1.0, 2.0, 3.0]], TypeError,
         r"params\[1\] must be a numpy array, but got list"),
        ([np.ones(4, np.float32), np.ones(3, np.int64)], TypeError,
         r"params\[1\] must be float32, float64, float16 or bfloat16, but got int64"),
    ]
    for current, error, message in cases:
        with pytest.raises(error, match=message):
            model.update_parameters(current)
        assert model.n_averaged == 1
        for a in model.parameters():
            np.testing.assert_array_equal(a, 0.0)


def test_the_native_entry_checks_every_pair_before_it_writes():
    a, b = np.zeros(4, np.float32), np.zeros(4)
    cases = [
        ([a, b], [np.ones(4, np.float32)], ValueError, "got 2 averaged arrays and 1 current"),
        ([a, b], [np.ones(4, np.float32), np.ones(4, np.float32)], TypeError,
         r"params\[1\]: current array has dtype float32, but the parameter has dtype float64"),
        ([a, np.zeros(8)[::2]], [np.ones(4, np.float32), np.ones(4)], ValueError,
         r"params\[1\]: averaged array must be contiguous"),
        ([a, b], [np.ones(4, np.float32), np.ones(5)], ValueError,
         r"params\[1\]: current array has shape \(5,\)"),
        ([a, b[:3]], [np.ones(4, np.float32), b[1:]], ValueError,
         r"params\[1\]: the current array shares part of the averaged array's memory"),
        ([a, np.ones(4, np.float32).view(np.int32)], [a, a], TypeError,
         r"params\[1\]: averaged array must be float32"),
    ]
    for averaged, current, error, message in cases:
        for call in (fastsgd._native.lerp_arrays, fastsgd._native.mean_arrays):
            with pytest.raises(error, match=message):
                call(averaged, current, 0.5)
            np.testing.assert_array_equal(a, 0.0)
    ro = np.zeros(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\]: averaged array is read-only"):
        fastsgd._native.lerp_arrays([ro], [np.ones(4)], 0.5)
    # an array averaged with itself is allowed (and unchanged)
    same = np.arange(5.0)
    fastsgd._native.lerp_arrays([same], [same], 0.3)
    np.testing.assert_array_equal(same, np.arange(5.0))


def test_averaged_model_arguments_as_torchs():
    params = [fastsgd.Parameter(np.ones(2))]
    fn = swa_utils.get_swa_avg_fn()
    with pytest.raises(AssertionError) as ours:
        swa_utils.AveragedModel(params, avg_fn=fn, multi_avg_fn=swa_utils.get_swa_multi_avg_fn())
    with pytest.raises(AssertionError) as theirs:
        torch.optim.swa_utils.AveragedModel(torch.nn.Linear(1, 1), avg_fn=fn, multi_avg_fn=fn)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="use_buffers=True has no meaning"):
        swa_utils.AveragedModel(params, use_buffers=True)
    with pytest.raises(TypeError):
        swa_utils.AveragedModel(params, None)  # torch's positional device has no counterpart
    for decay in (-0.1, 1.5):
        for name in ("get_ema_avg_fn", "get_ema_multi_avg_fn"):
            with pytest.raises(ValueError) as ours:
                getattr(swa_utils, name)(decay)
            with pytest.raises(ValueError) as theirs:
                getattr(torch.optim.swa_utils, name)(decay)
            assert str(ours.value) == str(theirs.value)


# ------------------------------------------------------------------- SWALR

LRS = [0.1, 0.05, 0.3]


def optimizers():
    fast = fastsgd.SGD([{"params": [fastsgd.Parameter(np.ones(2))], "lr": lr} for lr in LRS])
    ref = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr}
                           for lr in LRS])
    return fast, ref


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 5, 10])
@pytest.mark.parametrize("swa_lr", [0.01, [0.01, 0.2, 0.001]], ids=["one", "per_group"])
def test_swalr_is_torchs_exactly(strategy, anneal_epochs, swa_lr):
    fast, ref = optimizers()
    ours = swa_utils.SWALR(fast, swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    theirs = torch.optim.swa_utils.SWALR(ref, swa_lr, anneal_epochs=anneal_epochs,
                                         anneal_strategy=strategy)
    assert ours.get_last_lr() == theirs.get_last_lr()
    assert [g["swa_lr"] for g in fast.param_groups] == [g["swa_lr"] for g in ref.param_groups]
    for epoch in range(14):
        fast.step()
        ref.step()
        ours.step()
        theirs.step()
        assert ours.get_last_lr() == theirs.get_last_lr(), epoch
        assert [g["lr"] for g in fast.param_groups] == [g["lr"] for g in ref.param_groups]
        if epoch == 3:  # a resumed copy continues alike
            state, theirs_state = ours.state_dict(), theirs.state_dict()
            assert set(state) == set(theirs_state)
            fresh = swa_utils.SWALR(optimizers()[0], 0.5, anneal_strategy="linear")
            fresh.load_state_dict(state)
            assert fresh.anneal_func is fresh._cosine_anneal if strategy == "cos" else True
    if anneal_epochs < 13:
        assert ours.get_last_lr() == ([swa_lr] * 3 if not isinstance(swa_lr, list) else swa_lr)


def test_swalr_after_another_scheduler_as_torchs():
    fast, ref = optimizers()
    ours_first = fastsgd.lr_scheduler.StepLR(fast, 2, gamma=0.5)
    theirs_first = torch.optim.lr_scheduler.StepLR(ref, 2, gamma=0.5)
    for _ in range(3):
        fast.step(), ref.step(), ours_first.step(), theirs_first.step()
    ours = swa_utils.SWALR(fast, 0.02, anneal_epochs=3)
    theirs = torch.optim.swa_utils.SWALR(ref, 0.02, anneal_epochs=3)
    for _ in range(5):
        fast.step(), ref.step(), ours.step(), theirs.step()
        assert ours.get_last_lr() == theirs.get_last_lr()


@pytest.mark.parametrize("kwargs", [{"anneal_strategy": "exp"}, {"anneal_epochs": -1},
                                    {"anneal_epochs": 2.0}, {"swa_lr": [0.1, 0.2]}],
                         ids=["strategy", "negative", "float", "lengths"])
def test_swalr_errors_are_torchs(kwargs):
    fast, ref = optimizers()
    kwargs = {"swa_lr": 0.05, **kwargs}
    with pytest.raises(ValueError) as ours:
        swa_utils.SWALR(fast, **kwargs)
    with pytest.raises(ValueError) as theirs:
        torch.optim.swa_utils.SWALR(ref, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_swalr_get_lr_outside_step_warns_as_torch():
    fast, _ = optimizers()
    scheduler = swa_utils.SWALR(fast, 0.05)
    with pytest.warns(UserWarning, match="please use `get_last_lr\\(\\)`"):
        scheduler.get_lr()


@pytest.mark.skipif(not FUSED, reason="this process already runs torch's default kernels")
def test_averaged_model_at_torchs_default_capability():
    """torch fixes its kernels at import: a child with torch at "default" compares
    fastsgd's "default" kernel (unfused lerp) with it."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "averaged_model_is_torchs"], env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\n30 passed" in result.stdout
