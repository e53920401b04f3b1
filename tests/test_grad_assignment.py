"""`p.grad = g` is checked at assignment with torch's exception types and
messages (numpy's names for types, dtypes and shapes); what it accepts that
torch has no analogue for (numpy scalars, read-only and non-contiguous
grads) is decided here, and the native step still reads the grad slot."""
import copy
import pickle
import re

import numpy as np
import pytest

import fastsgd

torch = pytest.importorskip("torch")


def torch_error(param_shape, grad):
    """The exception torch 2.13 raises for ``tensor.grad = grad``."""
    param = torch.nn.Parameter(torch.zeros(param_shape))
    with pytest.raises(Exception) as info:
        param.grad = grad
    return info.value


def in_fastsgd_words(message, grad_shape=None, param_shape=None):
    """torch's message in fastsgd's nouns: an ndarray where torch says a
    Tensor, a parameter where it says a tensor, numpy's shapes."""
    message = message.replace("a Tensor or None", "an ndarray or None")
    message = message.replace("tensor", "parameter")
    if grad_shape is not None:
        message = message.replace(f"'{list(grad_shape)}'", f"'{grad_shape}'")
        message = message.replace(f"'{list(param_shape)}'", f"'{param_shape}'")
    return message


def assign_error(param, grad):
    with pytest.raises(Exception) as info:
        param.grad = grad
    return info.value


@pytest.mark.parametrize("grad, torch_grad", [
    ([[0.0, 0.0]] * 3, [[0.0, 0.0]] * 3),
    (1.0, 1.0),
    ("x", "x"),
    (torch.zeros(3, 2), np.zeros((3, 2), np.float32)),  # the other library's array
], ids=["list", "float", "str", "torch-tensor"])
def test_a_non_array_raises_torchs_type_error(grad, torch_grad):
    p = fastsgd.Parameter(np.zeros((3, 2), np.float32))
    error, expected = assign_error(p, grad), torch_error((3, 2), torch_grad)
    assert type(error) is type(expected) is TypeError
    if isinstance(grad, torch.Tensor):  # each names the array type it wants
        assert str(error) == ("assigned grad expected to be an ndarray or None but got grad "
                              "of type torch.Tensor")
        assert str(expected).endswith("but got grad of type numpy.ndarray")
    else:
        assert str(error) == in_fastsgd_words(str(expected))
    assert p.grad is None


@pytest.mark.parametrize("param_shape, grad_shape", [((3, 2), (2, 3)), ((3, 2), (6,)),
                                                     ((), (1,)), ((4,), ())])
def test_another_shape_raises_torchs_runtime_error(param_shape, grad_shape):
    p = fastsgd.Parameter(np.zeros(param_shape, np.float32))
    error = assign_error(p, np.zeros(grad_shape, np.float32))
    expected = torch_error(param_shape, torch.zeros(grad_shape))
    assert type(error) is type(expected) is RuntimeError
    assert str(error) == in_fastsgd_words(str(expected), grad_shape, param_shape)


@pytest.mark.parametrize("grad_dtype", [np.float64, np.float16, np.int32, np.dtype(">f4")])
def test_another_dtype_raises_torchs_runtime_error(grad_dtype):
    # torch 2.13's message goes on about Tensor.grad_dtype, which fastsgd has
    # not: fastsgd's is torch's message from before grad_dtype.
    p = fastsgd.Parameter(np.zeros(3, np.float32))
    error = assign_error(p, np.zeros(3, grad_dtype))
    expected = torch_error(3, torch.zeros(3, dtype=torch.float64))
    assert type(error) is type(expected) is RuntimeError
    assert str(expected).startswith("attempting to assign a gradient with dtype 'double' to a "
                                    "tensor with ")
    assert str(error) == (f"attempting to assign a gradient with dtype '{np.dtype(grad_dtype)}' "
                          f"to a parameter with dtype 'float32'. Please ensure that the gradient "
                          f"and the parameter have the same dtype")


def test_a_dtype_error_comes_before_a_shape_error_as_in_torch():
    p = fastsgd.Parameter(np.zeros(3, np.float32))
    expected = torch_error(3, torch.zeros(4, dtype=torch.float64))
    assert "dtype" in str(expected)
    assert "dtype 'float64'" in str(assign_error(p, np.zeros(4)))


def test_a_parameter_cannot_be_its_own_grad_as_in_torch():
    p = fastsgd.Parameter(np.zeros(3, np.float32))
    t = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="^can't assign Variable as its own grad$"):
        t.grad = t
    with pytest.raises(RuntimeError, match="^can't assign a Parameter as its own grad$"):
        p.grad = p
    # A view of it is no longer "itself": the step's rule (a grad may share
    # all of its parameter's memory) applies.
    p.grad = p.view(np.ndarray)
    fastsgd.SGD([p], lr=0.5).step()
    assert np.array_equal(p, np.zeros(3))


def test_a_refused_grad_leaves_the_old_one():
    p = fastsgd.Parameter(np.zeros(3))
    g = np.ones(3)
    p.grad = g
    for bad in [np.ones(4), np.ones(3, np.float32), [1.0, 1.0, 1.0]]:
        with pytest.raises((TypeError, RuntimeError)):
            p.grad = bad
        assert p.grad is g


def test_none_and_del_clear_the_grad_as_in_torch():
    p = fastsgd.Parameter(np.zeros(3))
    p.grad = np.ones(3)
    p.grad = None
    assert p.grad is None
    p.grad = np.ones(3)
    del p.grad
    assert p.grad is None
    fastsgd.SGD([p], lr=1.0).step()  # no grad: not stepped
    assert np.array_equal(p, np.zeros(3))


def test_the_grad_assigned_is_the_grad_stepped():
    # Arrays (subclasses and other Parameters included) are kept as given,
    # never copied: the step reads the very array.
    class Tagged(np.ndarray):
        pass

    p = fastsgd.Parameter(np.zeros((2, 3), np.float32))
    for g in [np.ones((2, 3), np.float32), np.ones((2, 3), np.float32).view(Tagged),
              fastsgd.Parameter(np.ones((2, 3), np.float32))]:
        p.grad = g
        assert p.grad is g
    fastsgd.SGD([p], lr=1.0).step()
    assert np.array_equal(p, -np.ones((2, 3)))


def test_a_numpy_scalar_is_a_0d_grad():
    # numpy (and autograd) give a 0-d result as a numpy scalar; torch, which
    # has no scalar type, refuses Python and numpy scalars alike.  A numpy
    # scalar is taken as the 0-d array it converts to; a Python float is not.
    assert isinstance(torch_error((), np.float32(2.0)), TypeError)
    p = fastsgd.Parameter(np.float32(1.0))
    p.grad = np.float32(2.0)
    assert type(p.grad) is np.ndarray and p.grad.shape == () and p.grad.dtype == np.float32
    fastsgd.SGD([p], lr=0.5).step()
    assert p == 0.0
    p.grad = np.array(2.0, np.float32)
    with pytest.raises(RuntimeError, match="with dtype 'float64'"):
        p.grad = np.float64(2.0)
    with pytest.raises(TypeError, match="got grad of type float$"):
        p.grad = 2.0
    with pytest.raises(RuntimeError, match=re.escape("of size '()' to a parameter of size '(3,)'")):
        fastsgd.Parameter(np.zeros(3, np.float32)).grad = np.float32(2.0)


def test_a_read_only_grad_is_stepped_and_refused_by_what_writes_grads():
    # A step only reads grads, so a read-only grad (np.asarray of another
    # library's array, np.broadcast_to) is accepted; clipping and unscaling
    # write grads and refuse it, before writing any.
    p, q = fastsgd.Parameter(np.zeros(3)), fastsgd.Parameter(np.zeros(3))
    read_only = np.ones(3)
    read_only.flags.writeable = False
    p.grad, q.grad = np.full(3, 100.0), read_only
    assert q.grad is read_only
    with pytest.raises(ValueError, match=r"^params\[1\]: grad is read-only$"):
        fastsgd.clip_grad_norm_([p, q], max_norm=1.0)
    with pytest.raises(ValueError, match=r"^params\[1\]: grad is read-only$"):
        fastsgd.clip_grad_value_([p, q], clip_value=1.0)
    assert np.array_equal(p.grad, np.full(3, 100.0))
    opt = fastsgd.SGD([p, q], lr=1.0)
    scaler = fastsgd.amp.GradScaler(init_scale=4.0)
    scaler.scale(np.float32(1.0))
    with pytest.raises(ValueError, match=r"^params\[1\]: grad is read-only$"):
        scaler.unscale_(opt)
    assert np.array_equal(p.grad, np.full(3, 100.0))
    opt.step()
    assert np.array_equal(q, -np.ones(3))


def test_a_non_contiguous_grad_is_accepted_at_assignment():
    # Whether a step takes it is the step's rule (docs/guide/input-rules.md).
    p = fastsgd.Parameter(np.zeros((4, 2), np.float32))
    strided = np.ones((4, 4), np.float32)[:, ::2]
    p.grad = strided
    assert p.grad is strided
    p.grad = np.ones((2, 4), np.float32).T
    assert p.grad.flags.f_contiguous


def test_the_native_step_reads_the_renamed_slot():
    # The step reads .grad at the _grad slot's offset: a grad set through
    # the property is the grad stepped, on the fast path and after re-staging.
    params = [fastsgd.Parameter(np.zeros(5, np.float32)) for _ in range(3)]
    opt = fastsgd.SGD(params, lr=1.0, momentum=0.5)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = None if (i + step) % 3 == 0 else np.full(5, float(i + 1), np.float32)
        opt.step()
    ref = [fastsgd.Parameter(np.zeros(5, np.float32)) for _ in range(3)]
    ref_opt = fastsgd.reference.SGD(ref, lr=1.0, momentum=0.5)
    for step in range(3):
        for i, p in enumerate(ref):
            p.grad = None if (i + step) % 3 == 0 else np.full(5, float(i + 1), np.float32)
        ref_opt.step()
    for p, r in zip(params, ref):
        assert np.array_equal(p, r)


def test_copies_keep_their_grad_rules():
    p = fastsgd.Parameter(np.zeros(3))
    p.grad = np.ones(3)
    for copied in [copy.deepcopy(p), pickle.loads(pickle.dumps(p)), p.copy(), p.reshape(3)]:
        with pytest.raises(RuntimeError, match="of size"):
            copied.grad = np.ones(4)
        copied.grad = np.ones(3)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_step_reads_the_slot_not_the_property(monkeypatch, momentum):
    # The native step finds the _grad slot's offset at import; were it lost,
    # every step would fall back to the property, correct but slower.
    params = [fastsgd.Parameter(np.zeros(4, np.float32)) for _ in range(3)]
    for p in params:
        p.grad = np.ones(4, np.float32)
    opt = fastsgd.SGD(params, lr=0.5, momentum=momentum)
    opt.step()
    reads = []
    checked = fastsgd.Parameter.grad
    monkeypatch.setattr(fastsgd.Parameter, "grad",
                        property(lambda p: reads.append(p) or checked.fget(p), checked.fset))
    opt.step()
    fastsgd.functional.sgd(params, [np.ones(4, np.float32)] * 3, [None] * 3, weight_decay=0.0,
                           momentum=momentum, lr=0.5, dampening=0.0, nesterov=False,
                           maximize=False)
    assert reads == []
    assert all(np.all(p <= -1.45) for p in params)  # three steps taken
