"""fastsgd.torch.SGD against torch.optim.SGD(foreach=False): the same bits on real torch.nn
models, torch's machinery (schedulers, GradScaler, hooks, state_dict), and its refusals."""
import copy
import itertools
import os
import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")
from test_optimizer import WRONG_OPTIONS  # noqa: E402

import fastsgd  # noqa: E402
import fastsgd.torch  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPTIONS = [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"lr": 0.03, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1, "maximize": True},
    {"lr": 0.02, "weight_decay": 0.05, "maximize": True},
]


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    # 37 features: 16-bit tensors with both torch's vector body and scalar remainder
    return torch.nn.Sequential(torch.nn.Linear(40, 37), torch.nn.Tanh(),
                               torch.nn.Linear(37, 3)).to(dtype)


def twins(dtype, options, groups=False):
    """The same model twice, one under torch.optim.SGD(foreach=False), one under
    fastsgd.torch.SGD."""
    pairs = []
    for cls, extra in ((torch.optim.SGD, {"foreach": False}), (fastsgd.torch.SGD, {})):
        model = make_model(dtype)
        params = ([{"params": model[0].parameters()},
                   {"params": model[2].parameters(), "lr": 0.01, "momentum": 0.0}]
                  if groups else model.parameters())
        pairs.append((model, cls(params, **options, **extra)))
    return pairs


def train_step(model, opt, x, skip=()):
    opt.zero_grad()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        if name in skip:
            p.grad = None  # a grad missing on this step
    opt.step()


def assert_same(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        assert p._version == q._version
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        if "momentum_buffer" in opt_a.state[p]:
            buf_a, buf_b = opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"]
            assert torch.equal(buf_a, buf_b)
            assert buf_b.dtype == buf_a.dtype and buf_b.stride() == buf_a.stride()
            assert not buf_b.requires_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_same_bits_as_torch(dtype, options, tensor_reads):
    pairs = twins(dtype, options)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    for step in range(5):
        skip = ("0.bias",) if step == 2 else ("2.weight",) if step == 3 else ()
        for model, opt in pairs:
            train_step(model, opt, x, skip)
        assert_same(*pairs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_param_groups(dtype):
    pairs = twins(dtype, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, groups=True)
    x = torch.randn(8, 40).to(dtype)
    for _ in range(4):
        for model, opt in pairs:
            train_step(model, opt, x)
        assert_same(*pairs)


def test_tensor_hyperparameters():
    options = {"lr": torch.tensor(0.05), "momentum": 0.9, "weight_decay": torch.tensor(1e-2)}
    pairs = twins(torch.float32, options)
    x = torch.randn(8, 40)
    for _ in range(3):
        for model, opt in pairs:
            train_step(model, opt, x)
        assert_same(*pairs)


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3),
], ids=["StepLR", "OneCycleLR", "CosineAnnealingWarmRestarts"])
def test_schedulers(make_scheduler):
    pairs = twins(torch.float32, {"lr": 0.1, "momentum": 0.9})
    schedulers = [make_scheduler(opt) for _, opt in pairs]
    x = torch.randn(8, 40)
    for _ in range(8):
        for (model, opt), scheduler in zip(pairs, schedulers):
            train_step(model, opt, x)
            scheduler.step()
        assert_same(*pairs)
        assert pairs[0][1].param_groups[0]["lr"] == pairs[1][1].param_groups[0]["lr"]


def test_grad_scaler_on_cpu():
    pairs = twins(torch.float32, {"lr": 0.1, "momentum": 0.9})
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
               for _ in pairs]
    x = torch.randn(8, 40)
    for step in range(6):
        for (model, opt), scaler in zip(pairs, scalers):
            opt.zero_grad()
            loss = model(x).square().mean()
            if step == 3:
                loss = loss * float("inf")  # an overflow: the step is skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert_same(*pairs)
        assert scalers[0].get_scale() == scalers[1].get_scale()


def test_hooks_and_closure():
    model = make_model(torch.float32)
    opt = fastsgd.torch.SGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    x = torch.randn(4, 40)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        calls.append(("closure", torch.is_grad_enabled()))
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert calls == [("pre", opt), ("closure", True), ("post", opt)]
    assert loss is not None and loss.requires_grad
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("direction", ["torch to fastsgd", "fastsgd to torch"])
def test_state_dict_swap_mid_run(direction):
    options = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
    x = torch.randn(8, 40)
    reference_model = make_model(torch.float32)
    reference = torch.optim.SGD(reference_model.parameters(), foreach=False, **options)
    first, second = ((torch.optim.SGD, fastsgd.torch.SGD) if direction == "torch to fastsgd"
                     else (fastsgd.torch.SGD, torch.optim.SGD))
    model = make_model(torch.float32)
    opt = first(model.parameters(), **options)
    for _ in range(3):
        train_step(reference_model, reference, x)
        train_step(model, opt, x)
    saved = copy.deepcopy(opt.state_dict())
    opt = second(model.parameters(), **options)
    opt.load_state_dict(saved)
    for _ in range(3):
        train_step(reference_model, reference, x)
        train_step(model, opt, x)
        assert_same((reference_model, reference), (model, opt))
    assert opt.state_dict()["state"].keys() == reference.state_dict()["state"].keys()


def test_is_torch_sgd_and_copies():
    model = make_model(torch.float32)
    opt = fastsgd.torch.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD)
    train_step(model, opt, torch.randn(4, 40))
    clone = copy.deepcopy(opt)
    clone.step()  # a copy has its own stepper


def test_version_counter_catches_a_saved_parameter():
    """A parameter saved for backward and then stepped fails backward as with torch."""
    errors = []
    for cls in (torch.optim.SGD, fastsgd.torch.SGD):
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p], lr=0.1)
        p.grad = torch.ones(3)
        loss = (p * p).sum()  # saves p
        opt.step()
        with pytest.raises(RuntimeError) as info:
            loss.backward()
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "modified by an inplace operation" in errors[1]


# In a fresh interpreter: memory freed by earlier tests' advised buffers may come
# back from the allocator to a later tensor with the advice still on it.
_HUGE_PAGES_CHECK = """
import sys, torch, fastsgd.torch

def advised_huge(address):  # the mapping holding address was madvise()d MADV_HUGEPAGE
    inside = False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError(hex(address) + " is not mapped")

big = torch.zeros(2048, 1024)  # 8 MiB
p = torch.nn.Parameter(big if sys.argv[1] == "contiguous" else torch.zeros(2048, 2048)[:, ::2])
small = torch.nn.Parameter(torch.zeros(1000))
opt = fastsgd.torch.SGD([p, small], lr=0.1, momentum=0.9)
p.grad, small.grad = torch.ones_like(p), torch.ones(1000)
opt.step()
assert advised_huge(opt.state[p]["momentum_buffer"].data_ptr() + (4 << 20))
assert not advised_huge(big.data_ptr() + (4 << 20))  # torch's own allocation
"""


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="needs Linux with transparent huge pages")
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_large_momentum_buffers_ask_for_huge_pages(layout):
    """As numpy's arrays of 4 MiB and more do, so that the adapter streams its
    buffers as fastsgd.SGD streams numpy's; torch's allocator does not ask."""
    subprocess.run([sys.executable, "-c", _HUGE_PAGES_CHECK, layout], check=True, timeout=120)


def test_core_does_not_import_torch():
    code = "import fastsgd, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------ refusals


def state_of(opt):
    return [t.detach().clone() for group in opt.param_groups for t in group["params"]] + [
        s["momentum_buffer"].clone() for s in opt.state.values() if "momentum_buffer" in s]


def refused(opt, error, match):
    """opt.step() raises error (matching match) and writes nothing."""
    before = state_of(opt)
    with pytest.raises(error, match=match):
        opt.step()
    after = state_of(opt)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def stepped_pair(n=3):
    params = [torch.nn.Parameter(torch.randn(4, 5)) for _ in range(n)]
    opt = fastsgd.torch.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn(4, 5)
    opt.step()  # buffers exist: a refusal must leave them too
    for p in params:
        p.grad = torch.randn(4, 5)
    return params, opt


def test_refuses_differentiable_and_fused():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match="differentiable=True"):
        fastsgd.torch.SGD([p], differentiable=True)
    with pytest.raises(RuntimeError, match="fused=True"):
        fastsgd.torch.SGD([p], fused=True)
    opt = fastsgd.torch.SGD([p], lr=torch.tensor(0.1, requires_grad=True))
    p.grad = torch.ones(2)
    refused(opt, RuntimeError, "requires grad")


def test_refuses_sparse_grads(tensor_reads):
    params, opt = stepped_pair()
    params[2].grad = torch.randn(4, 5).to_sparse()
    refused(opt, RuntimeError, r"\['params'\]\[2\]: its grad is torch.sparse_coo")


def test_refuses_grads_that_no_longer_match(tensor_reads):
    params, opt = stepped_pair()
    params[1].grad.resize_(20)
    refused(opt, RuntimeError, r"\['params'\]\[1\]: its grad has shape \(20,\)")
    params[1].grad = torch.randn(4, 5)
    params[0].data = params[0].data.double()  # the grad stays float32
    refused(opt, TypeError, r"\['params'\]\[0\]: its grad is torch.float32")


def test_refuses_a_parameter_twice_and_shared_memory(tensor_reads):
    params, opt = stepped_pair()
    opt.param_groups[0]["params"].append(params[0])
    refused(opt, ValueError, r"\['params'\]\[3\] is param_groups\[0\]\['params'\]\[0\] again")
    opt.param_groups[0]["params"].pop()
    base = torch.randn(30)
    a, b = torch.nn.Parameter(base[:20].view(4, 5)), torch.nn.Parameter(base[10:].view(4, 5))
    a.grad, b.grad = torch.randn(4, 5), torch.randn(4, 5)
    opt.add_param_group({"params": [a, b]})
    refused(opt, RuntimeError, "share memory")
    opt.param_groups.pop()
    params[2].grad = params[0].detach()  # a grad that is another parameter
    refused(opt, RuntimeError, r"\['params'\]\[2\]: its grad shares memory")


def test_refuses_unsupported_dtypes_and_devices(tensor_reads):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    p.grad = torch.ones(3, dtype=torch.complex64)
    refused(fastsgd.torch.SGD([p], lr=0.1), TypeError, "complex64")
    m = torch.nn.Parameter(torch.ones(3, device="meta"))
    m.grad = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors"):
        fastsgd.torch.SGD([m], lr=0.1).step()


def negated(shape, seed, contiguous):
    """A lazily negated view (its negative bit set): torch.imag of a conjugate, strided;
    or, contiguous, torch's private _neg_view (such a grad takes the fast path)."""
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        view = torch._neg_view(torch.randn(shape, generator=generator))
    else:
        view = torch.imag(torch.complex(torch.randn(shape, generator=generator),
                                        torch.randn(shape, generator=generator)).conj())
    assert view.is_neg() and view.is_contiguous() == contiguous
    return view


def test_negated_grads_as_torch_and_negated_tensors_it_writes_refused(tensor_reads):
    """DLPack's views do not carry torch's negative bit: a negated grad (autograd can
    leave one through complex ops) steps with the values torch reads from it; a
    parameter or buffer that is one, whose memory the kernel would write as stored,
    is refused before any write."""
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    params = [torch.nn.Parameter(torch.randn(4, 5)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fastsgd.torch.SGD(params, **options)
    reference = torch.optim.SGD(twins, **options, foreach=False)
    for step in range(3):
        for k, (p, q) in enumerate(zip(params, twins)):
            p.grad = negated((4, 5), seed=10 * step + k, contiguous=step > 0)
            q.grad = p.grad.clone()  # (clone() resolves the bit)
        opt.step()
        reference.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twins))
    opt.state[params[1]]["momentum_buffer"] = negated((4, 5), seed=99, contiguous=True)
    refused(opt, RuntimeError, r"\['params'\]\[1\]: its momentum buffer has its negative bit")
    p = torch.nn.Parameter(negated((3,), seed=7, contiguous=True))
    p.grad = torch.ones(3)
    refused(fastsgd.torch.SGD([p], lr=0.1), RuntimeError,
            r"\['params'\]\[0\]: the parameter has its negative bit")


def test_inference_tensors_written_only_in_inference_mode_as_torch(tensor_reads):
    """torch's in-place ops write an inference tensor (made under torch.inference_mode)
    only in that mode: outside it torch's step raises, once it has written the tensor.
    fastsgd.torch.SGD refuses before any write, and in that mode steps as torch."""
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    outside = "Inplace update to inference tensor outside InferenceMode is not allowed"

    def inference_twins(tensors):
        with torch.inference_mode():
            twins = [t.clone() for t in tensors]
        for t, twin in zip(tensors, twins):
            twin.grad = t.grad.clone()
        return twins, torch.optim.SGD(twins, **options, foreach=False)

    with torch.inference_mode():  # (the strided one is staged)
        params = [torch.randn(4, 5), torch.randn(3), torch.randn(6, 4)[:, 1]]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt = fastsgd.torch.SGD(params, **options)
    refused(opt, RuntimeError,
            r"\['params'\]\[0\]: the parameter is an inference tensor: " + outside)
    twins, reference = inference_twins(params)
    with pytest.raises(RuntimeError, match=outside):
        reference.step()
    twins, reference = inference_twins(params)  # (torch's step wrote one)
    for _ in range(2):
        with torch.inference_mode():
            opt.step()
            reference.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twins))
        assert all(opt.state[p]["momentum_buffer"].is_inference()
                   and reference.state[q]["momentum_buffer"].is_inference()
                   for p, q in zip(params, twins))

    # normal parameters whose momentum buffers were made in inference mode, refused
    # when first seen and when checked and cached in an earlier step
    params = [torch.nn.Parameter(torch.randn(4, 5)) for _ in range(2)]
    opt = fastsgd.torch.SGD(params, **options)
    for p in params:
        p.grad = torch.randn(4, 5)
    buffer_refused = r"\['params'\]\[0\]: its momentum buffer is an inference tensor: "
    with torch.inference_mode():
        opt.step()
    refused(opt, RuntimeError, buffer_refused + outside)
    with torch.inference_mode():
        opt.step()
    refused(opt, RuntimeError, buffer_refused + outside)
    for state in opt.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].clone()  # a normal tensor
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_alpha_overflow_as_torch(dtype):
    errors = []
    for cls, extra in ((torch.optim.SGD, {"foreach": False}), (fastsgd.torch.SGD, {})):
        p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        p.grad = torch.ones(4, dtype=dtype)
        with pytest.raises(RuntimeError) as info:
            cls([p], lr=1e40 if dtype == torch.bfloat16 else 1e5, **extra).step()
        errors.append(str(info.value))
    assert "without overflow" in errors[0] and "without overflow" in errors[1]


def test_every_combination_of_flags():
    """momentum x nesterov x weight_decay x maximize x dampening, three steps each."""
    x = torch.randn(6, 40)
    for momentum, nesterov, weight_decay, maximize, dampening in itertools.product(
            (0.0, 0.9), (False, True), (0.0, 0.01), (False, True), (0.0, 0.2)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        options = dict(lr=0.05, momentum=momentum, nesterov=nesterov,
                       weight_decay=weight_decay, maximize=maximize, dampening=dampening)
        pairs = twins(torch.float32, options)
        for _ in range(3):
            for model, opt in pairs:
                train_step(model, opt, x)
        assert_same(*pairs)


def test_steps_from_two_threads_take_turns():
    params = [torch.nn.Parameter(torch.randn(1000)) for _ in range(8)]
    twins_ = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins_):
        p.grad = torch.randn(1000)
        q.grad = p.grad.clone()
    opt = fastsgd.torch.SGD(params, lr=0.01, momentum=0.9)
    reference = torch.optim.SGD(twins_, lr=0.01, momentum=0.9, foreach=False)
    workers = [threading.Thread(target=lambda: [opt.step() for _ in range(50)])
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    for _ in range(100):
        reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins_))


def test_a_step_run_during_a_step_of_the_same_optimizer_raises():
    stepping = []

    class Reentrant(torch.nn.Parameter):
        def __hash__(self):
            if stepping:
                opt.step()  # the state lookup of a step runs this
            return id(self)

    p = Reentrant(torch.ones(3))
    p.grad = torch.ones(3)
    opt = fastsgd.torch.SGD([p], lr=0.1, momentum=0.9)
    stepping.append(True)
    with pytest.raises(RuntimeError, match="during a step of the same optimizer"):
        opt.step()


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")  # torch's too
@pytest.mark.parametrize("key, value", WRONG_OPTIONS, ids=lambda x: repr(x)[:24])
def test_wrong_typed_options_raise_the_types_torch_raises_before_any_write(key, value):
    """The adapter reads a group's options with the numpy path's rules: the
    exception torch raises for a wrong-typed option set after construction,
    with every parameter and buffer left as it was (or torch's step)."""
    outcomes = []
    for cls in (fastsgd.torch.SGD, torch.optim.SGD):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 7)) for _ in range(2)]
        opt = cls(params, lr=0.1, momentum=0.5, foreach=False)
        for p in params:
            p.grad = torch.ones(7)
        opt.step()
        opt.param_groups[0][key] = value
        before = [t.detach().clone() for p in params
                  for t in (p, opt.state[p]["momentum_buffer"])]
        try:
            with torch.no_grad():
                opt.step()
            outcomes.append(("stepped", [p.detach().clone() for p in params]))
        except Exception as error:  # noqa: BLE001 - the type is what is compared
            outcomes.append((type(error), None))
            if cls is fastsgd.torch.SGD:
                after = [t for p in params for t in (p, opt.state[p]["momentum_buffer"])]
                assert all(torch.equal(a, b) for a, b in zip(after, before))
    (fast, fast_values), (torch_, torch_values) = outcomes
    assert fast == torch_
    if fast == "stepped":
        assert all(torch.equal(f, t) for f, t in zip(fast_values, torch_values))
