"""fastsgd.torch.SGD on non-contiguous tensors (stepped through the numpy path's staged
copies) and the step's fast reads (state looked up by a known hash, torch's getters
called directly), against torch.optim.SGD(foreach=False): the same bits, the same
buffer layouts, and the same refusals."""
import copy
import sys

import pytest

torch = pytest.importorskip("torch")
from test_torch_adapter import OPTIONS, refused, stepped_pair  # noqa: E402

import fastsgd.torch  # noqa: E402


def strided_tensors(dtype):
    """(parameters, grad makers): every parameter or grad layout torch can express that
    is not contiguous, the bases the views come from kept in the parameters' views."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    params = [
        randn(8, 6).t(),                       # transposed
        randn(5, 12)[:, ::3],                  # a step
        randn(4, 6, 2)[..., 0],                # [..., 0]
        randn(3, 4, 5).permute(2, 0, 1),       # a permutation, neither C nor F order
        randn(5, 10)[:, :0],                   # zero-size view
        randn(7, 9)[1:6, 2:8],                 # a window
        randn(5, 4),                           # contiguous, with strided grads below
        randn(4, 5),                           # contiguous, with a broadcast grad
        randn(4, 5),                           # contiguous, its buffer transposed
    ]
    params = [torch.nn.Parameter(p) for p in params]
    shapes = [tuple(p.shape) for p in params]
    makers = [
        lambda s, sh=shapes[0]: randn(*sh[::-1]).t() if s % 2 else randn(*sh),
        lambda s, sh=shapes[1]: randn(*sh),
        lambda s, sh=shapes[2]: randn(sh[0], sh[1], 3)[..., 1],
        lambda s, sh=shapes[3]: randn(4, 5, 3).permute(1, 2, 0) if s % 2 else randn(*sh),
        lambda s, sh=shapes[4]: randn(*sh),
        lambda s, sh=shapes[5]: randn(*sh).t().contiguous().t(),
        lambda s, sh=shapes[6]: randn(5, 8)[:, ::2] if s < 2 else randn(*sh),
        lambda s, sh=shapes[7]: randn(1, 5).expand(*sh),
        lambda s, sh=shapes[8]: randn(*sh[::-1]).t() if s == 0 else randn(*sh),
    ]
    return params, makers


def run_both(make, options, steps=4, between=None):
    """The same parameters and grads stepped by torch and by fastsgd.torch."""
    runs = []
    for cls, extra in ((torch.optim.SGD, {"foreach": False}), (fastsgd.torch.SGD, {})):
        params, makers = make()
        opt = cls(params, **options, **extra)
        for step in range(steps):
            for p, grad_of in zip(params, makers):
                p.grad = grad_of(step)
            opt.step()
            if between is not None:
                opt = between(opt, step)
        runs.append((params, opt))
    return runs


def assert_same_run(runs):
    (params_t, opt_t), (params_f, opt_f) = runs
    for p, q in zip(params_t, params_f):
        assert torch.equal(p, q) and p.stride() == q.stride()
        assert p._version == q._version
        # the views' bases hold the same numbers: nothing written outside the views
        assert torch.equal(p._base, q._base) if p._base is not None else q._base is None
        assert opt_t.state[p].keys() == opt_f.state[q].keys()
        if "momentum_buffer" in opt_t.state[p]:
            a, b = opt_t.state[p]["momentum_buffer"], opt_f.state[q]["momentum_buffer"]
            assert torch.equal(a, b)
            assert a.stride() == b.stride() and not b.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_strided_tensors_as_torch(dtype, options):
    assert_same_run(run_both(lambda: strided_tensors(dtype), options))


@pytest.mark.parametrize("direction", ["torch to fastsgd", "fastsgd to torch"])
def test_strided_state_dict_crosses_both_ways(direction):
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}
    classes = [torch.optim.SGD, fastsgd.torch.SGD]
    if direction == "fastsgd to torch":
        classes.reverse()

    def swap(opt, step):
        if step != 1:
            return opt
        saved = copy.deepcopy(opt.state_dict())
        other = classes[1] if isinstance(opt, classes[0]) else classes[0]
        params = [p for group in opt.param_groups for p in group["params"]]
        new = other(params, **options, **({"foreach": False} if other is torch.optim.SGD
                                            else {}))
        new.load_state_dict(saved)
        return new

    reference = run_both(lambda: strided_tensors(torch.float32), options)[0]
    params, makers = strided_tensors(torch.float32)
    opt = classes[0](params, **options)
    for step in range(4):
        for p, grad_of in zip(params, makers):
            p.grad = grad_of(step)
        opt.step()
        opt = swap(opt, step)
    assert_same_run([reference, (params, opt)])


def test_channels_last_convolution_as_torch():
    """A real module whose weights are not contiguous: a channels-last conv net, whose
    grads autograd lays out as the weights."""
    x = torch.randn(4, 3, 10, 10).to(memory_format=torch.channels_last)
    models, opts = [], []
    for cls, extra in ((torch.optim.SGD, {"foreach": False}), (fastsgd.torch.SGD, {})):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)
        models.append(model)
        opts.append(cls(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, **extra))
    assert not models[1][0].weight.is_contiguous()
    for _ in range(4):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q) and p.stride() == q.stride()
        a, b = opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"]
        assert torch.equal(a, b) and a.stride() == b.stride()


def test_transposed_linear_weight_as_torch():
    """nn.Linear whose weight is made non-contiguous (a transposed layout)."""
    x = torch.randn(6, 10)
    runs = []
    for cls, extra in ((torch.optim.SGD, {"foreach": False}), (fastsgd.torch.SGD, {})):
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 7)
        model.weight = torch.nn.Parameter(model.weight.detach().t().contiguous().t())
        opt = cls(model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.1, **extra)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs.append(model)
    assert not runs[1].weight.is_contiguous()
    assert all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))


# ------------------------------------------------------------------ refusals


def test_refuses_a_self_overlapping_parameter():
    params, opt = stepped_pair()
    tiled = torch.nn.Parameter(torch.zeros(5).expand(4, 5))
    tiled.grad = torch.ones(4, 5)
    opt.add_param_group({"params": [tiled]})
    refused(opt, RuntimeError,
            r"param_groups\[1\]\['params'\]\[0\].*more than one element of the written-to")


def test_interleaved_views_as_torch(tensor_reads):
    """Two columns of one matrix interleave without sharing an element: stepped as
    torch steps them, their buffers too (numpy's exact test decides, their extents
    meeting)."""
    runs = []
    for cls, extra in ((torch.optim.SGD, {"foreach": False}), (fastsgd.torch.SGD, {})):
        base = torch.linspace(-1, 1, 18).reshape(6, 3)
        columns = [torch.nn.Parameter(base[:, k]) for k in range(3)]
        opt = cls(columns, lr=0.1, momentum=0.9, weight_decay=0.01, **extra)
        for step in range(3):
            for k, column in enumerate(columns):
                column.grad = torch.full((6,), float(step + k))
            opt.step()
        runs.append((base, [opt.state[c]["momentum_buffer"] for c in columns]))
    (base, buffers), (base_fast, buffers_fast) = runs
    assert torch.equal(base, base_fast)
    assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_fast))


def test_grads_between_a_strided_parameters_elements_as_torch(tensor_reads):
    """A grad in a strided parameter's extent sharing none of its elements: a flat
    one past flat parameters inside the extent, and a strided one interleaving
    with its own parameter, stepped as torch steps them."""
    runs = []
    for cls, extra in ((torch.optim.SGD, {"foreach": False}), (fastsgd.torch.SGD, {})):
        base = torch.linspace(-1, 1, 50).reshape(10, 5)
        pairs = torch.linspace(0, 1, 20).reshape(10, 2)
        params = [torch.nn.Parameter(base[:, 0]), torch.nn.Parameter(base[0, 1:]),
                  torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(pairs[:, 0])]
        opt = cls(params, lr=0.1, momentum=0.9, **extra)
        for step in range(3):
            params[0].grad, params[1].grad = torch.full((10,), step + 1.0), torch.ones(4)
            params[2].grad = base[5, 1:]  # between the column's elements
            params[3].grad = pairs[:, 1]  # between its own parameter's
            opt.step()
        runs.append((base, pairs, params[2].detach()))
    for ours, theirs in zip(*runs):
        assert torch.equal(ours, theirs)


def test_refuses_strided_tensors_sharing_memory():
    params, opt = stepped_pair()
    base = torch.zeros(6, 3)
    left, right = torch.nn.Parameter(base[:, 0:2]), torch.nn.Parameter(base[:, 1:3])
    left.grad, right.grad = torch.ones(6, 2), torch.ones(6, 2)
    opt.add_param_group({"params": [left, right]})
    refused(opt, RuntimeError, r"\['params'\]\[0\] and param_groups\[1\]\['params'\]\[1\] "
                               r"share memory")
    opt.param_groups.pop()
    # a grad sharing one element with a strided parameter, within its extent past
    # flat parameters inside it: found wherever it falls among them
    base = torch.zeros(10, 5)
    inside = [torch.nn.Parameter(base[:, 0]), torch.nn.Parameter(base[0, 1:]),
              torch.nn.Parameter(base[1, 1:]), torch.nn.Parameter(torch.zeros(4))]
    for p in inside:
        p.grad = torch.ones_like(p)
    inside[3].grad = base[5, :4]  # base[5, 0] is the column's
    opt.add_param_group({"params": inside})
    refused(opt, RuntimeError, r"param_groups\[1\]\['params'\]\[3\]: its grad shares memory")
    opt.param_groups.pop()
    strided = torch.nn.Parameter(torch.zeros(4, 8)[:, ::2])
    strided.grad = params[0].detach()[:, :4]  # a grad within another parameter
    opt.add_param_group({"params": [strided]})
    refused(opt, RuntimeError, r"param_groups\[1\]\['params'\]\[0\]: its grad shares memory")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_strided_16_bit_tensors_as_torch(dtype, options):
    """Each op of a strided 16-bit tensor rounded as torch's loop of that op
    reaches the element (at one torch thread, the reference of 16-bit steps)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_same_run(run_both(lambda: strided_tensors(dtype), options))
    finally:
        torch.set_num_threads(previous)


def test_strided_bfloat16_without_ml_dtypes_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes fails
    p = torch.nn.Parameter(torch.ones(5, 4, dtype=torch.bfloat16).t())
    p.grad = torch.ones(4, 5, dtype=torch.bfloat16)
    refused(fastsgd.torch.SGD([p], lr=0.1), RuntimeError,
            r"\['params'\]\[0\].*needs ml_dtypes")


# --------------------------------------------- the step's reads, and what they catch


def test_changes_between_steps_are_caught():
    """What a step re-reads of tensors it has seen: a grad changed after it was
    assigned, a parameter moved, a buffer or the whole state replaced."""
    params, opt = stepped_pair()
    params[1].grad.data = torch.randn(5, 4)  # the right size, the wrong shape
    refused(opt, RuntimeError, r"\['params'\]\[1\]: its grad has shape \(5, 4\)")
    params[1].grad = torch.randn(4, 5)
    params[1].grad.t_()  # transposed in place: a shape the parameter does not have
    refused(opt, RuntimeError, r"\['params'\]\[1\]: its grad has shape \(5, 4\)")
    params[1].grad = torch.randn(4, 5)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.SGD(twins, lr=0.1, momentum=0.9, foreach=False)
    reference.load_state_dict(copy.deepcopy(opt.state_dict()))
    for q, p in zip(twins, params):
        q.grad = p.grad.clone()
    for run in (opt, reference):
        ps = run.param_groups[0]["params"]
        ps[0].data = ps[0].data.clone()  # moved
        run.state[ps[2]]["momentum_buffer"] = torch.full((4, 5), 0.5)  # replaced
        run.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    # a new state object, with copies of the reference's buffers
    opt.state = {p: {"momentum_buffer": reference.state[q]["momentum_buffer"].clone()}
                 for p, q in zip(params, twins)}
    for run in (opt, reference):
        run.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


def test_parameter_types_with_their_own_hash_or_grad(tensor_reads):
    """A parameter type hashing otherwise than Tensor, or with a grad property of its
    own, is read the ordinary way: state[p] hashes it, p.grad runs its property, as
    torch's step does."""
    reads = []

    class OtherHash(torch.nn.Parameter):
        def __hash__(self):
            return id(self) + 1  # a lookup with Tensor's hash would miss

    class CountsGrad(torch.nn.Parameter):
        @property
        def grad(self):
            reads.append(self)
            return torch._C.TensorBase.grad.__get__(self)

        @grad.setter
        def grad(self, value):
            torch._C.TensorBase.grad.__set__(self, value)

    for kind in (OtherHash, CountsGrad):
        params = [kind(torch.linspace(-1, 1, 6)) for _ in range(3)]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = fastsgd.torch.SGD(params, lr=0.1, momentum=0.9)
        reference = torch.optim.SGD(twins, lr=0.1, momentum=0.9, foreach=False)
        for step in range(3):
            for p, q in zip(params, twins):
                p.grad = torch.full((6,), float(step + 1))
                q.grad = p.grad.clone()
            reads.clear()
            opt.step()
            assert len(reads) >= (3 if kind is CountsGrad else 0)  # every parameter
            reference.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twins))
        assert all(torch.equal(opt.state[p]["momentum_buffer"],
                               reference.state[q]["momentum_buffer"])
                   for p, q in zip(params, twins))


def test_a_buffer_replaced_in_place_keeps_the_step_in_valid_memory():
    """`buf.data = x` moves a cached buffer without any counter seeing it: the step
    keeps the memory it checked alive and writes there, never into memory freed
    since (filled here by new tensors, which must stay as they are)."""
    params, opt = stepped_pair()
    opt.step()  # a later step: the buffers are cached
    buf = opt.state[params[0]]["momentum_buffer"]
    buf.data = torch.zeros(4, 5)
    fillers = [torch.full((4, 5), 7.0) for _ in range(64)]  # likely in the freed block
    opt.step()
    assert all(torch.equal(f, torch.full((4, 5), 7.0)) for f in fillers)
    opt.state[params[0]]["momentum_buffer"] = buf.clone()  # replacing it is seen
    twin = torch.nn.Parameter(params[0].detach().clone())
    reference = torch.optim.SGD([twin], lr=0.1, momentum=0.9, foreach=False)
    reference.state[twin]["momentum_buffer"] = buf.clone()
    twin.grad = params[0].grad.clone()
    opt.step()
    reference.step()
    assert torch.equal(params[0], twin)


def test_a_parameter_whose_layout_changes_between_steps():
    """A parameter moved to other strides (by .data) keeps its buffer, laid out as
    before: the buffer's layout is checked again against the parameter's."""
    def make():
        g = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(6, 4, generator=g).t()),
                  torch.nn.Parameter(torch.randn(4, 6, generator=g))]
        def grad_of(p):  # laid out as the parameter, as autograd lays it out
            grad = torch.randn(p.shape[::-1], generator=g).t()
            return grad if not p.is_contiguous() else grad.contiguous()
        return params, [lambda s, p=p: grad_of(p) for p in params]

    def relayout(opt, step):
        if step == 1:
            for p in opt.param_groups[0]["params"]:
                p.data = (p.data.contiguous() if not p.is_contiguous()
                          else p.data.t().contiguous().t())
        return opt

    assert_same_run(run_both(make, {"lr": 0.1, "momentum": 0.9}, between=relayout))
