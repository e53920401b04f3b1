"""Input rules of a step: every input of every group is checked before any
array is written, and a rejected step names the group and parameter."""
import numpy as np
import pytest

import fastsgd

# p.grad = g refuses a grad of the wrong type, dtype or shape
# (tests/test_grad_assignment.py); a step still checks, for a grad changed
# after assignment.  Writing the raw slot stands for that here.
set_grad_unchecked = fastsgd.Parameter._grad.__set__


def make_optimizer(rng, dtype=np.float32, momentum=0.9):
    """Two groups of three parameters, each with a grad and (after one step)
    a momentum buffer."""
    groups = [[fastsgd.Parameter(rng.standard_normal(n).astype(dtype)) for n in (5, 8, 3)]
              for _ in range(2)]
    opt = fastsgd.SGD([{"params": groups[0]}, {"params": groups[1], "lr": 0.5}],
                      lr=0.1, momentum=momentum)
    for p in groups[0] + groups[1]:
        p.grad = rng.standard_normal(p.shape).astype(dtype)
    opt.step()
    return opt, groups


def snapshot(opt):
    arrays = []
    for group in opt.param_groups:
        for p in group["params"]:
            arrays.append(np.array(p))
            state = opt.state.get(p, {})
            arrays.append(np.array(state["momentum_buffer"]) if "momentum_buffer" in state else None)
    return arrays, len(opt.state)


def assert_untouched(opt, before):
    after = snapshot(opt)
    assert after[1] == before[1], "state entries were added"
    for a, b in zip(after[0], before[0]):
        if b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b)


# Each case damages group 1, parameter 2 (the last tensor stepped), so that
# a step that wrote before validating would have written groups 0 and 1.
def grad_wrong_dtype(p, opt):
    set_grad_unchecked(p, p.grad.astype(np.float64))


def grad_wrong_shape(p, opt):
    set_grad_unchecked(p, np.zeros(p.size + 1, p.dtype))


def grad_is_list(p, opt):
    set_grad_unchecked(p, p.grad.tolist())


def grad_is_int_array(p, opt):
    set_grad_unchecked(p, np.zeros(p.shape, np.int64))


def grad_of_strided_param_is_another_param(p, opt):
    param = fastsgd.Parameter(np.zeros((p.size, 2), p.dtype)[:, 0])
    param.grad = opt.param_groups[1]["params"][0][:p.size]
    opt.param_groups[1]["params"][2] = param


def grad_partially_overlaps_param(p, opt):
    raw = np.zeros(p.size + 1, p.dtype)
    param = fastsgd.Parameter(raw[:-1])
    param.grad = raw[1:]
    opt.param_groups[1]["params"][2] = param


def buffer_wrong_shape(p, opt):
    opt.state[p]["momentum_buffer"] = np.zeros(p.size + 2, p.dtype)


def buffer_wrong_dtype(p, opt):
    opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].astype(np.float64)


def buffer_read_only(p, opt):
    opt.state[p]["momentum_buffer"].flags.writeable = False


def buffer_is_the_grad(p, opt):
    opt.state[p]["momentum_buffer"] = p.grad


def buffer_is_the_param(p, opt):
    opt.state[p]["momentum_buffer"] = p.view(np.ndarray)


def param_read_only(p, opt):
    p.flags.writeable = False


def param_overlaps_itself(p, opt):
    raw = np.zeros(p.size, p.dtype)
    param = np.lib.stride_tricks.as_strided(raw, (p.size, 2), (raw.itemsize, 0), writeable=True)
    param = param.view(fastsgd.Parameter)
    param.grad = np.zeros(param.shape, p.dtype)
    opt.param_groups[1]["params"][2] = param


def buffer_overlaps_itself(p, opt):
    raw = np.zeros(1, p.dtype)
    opt.state[p]["momentum_buffer"] = np.lib.stride_tricks.as_strided(
        raw, p.shape, (0,), writeable=True)


def param_byte_swapped(p, opt):
    # Parameter() refuses it; a view can still make one.
    param = np.zeros(p.size, p.dtype.newbyteorder()).view(fastsgd.Parameter)
    param.grad = np.zeros(p.size, param.dtype)
    opt.param_groups[1]["params"][2] = param


def lr_is_a_string(p, opt):
    opt.param_groups[1]["lr"] = "fast"


# torch's error for an in-place op on a tensor whose elements overlap
OVERLAP = ("unsupported operation: more than one element of the written-to tensor refers to a "
           "single memory location. Please clone() the tensor before performing the operation.")

CASES = {
    grad_wrong_dtype: (TypeError, "param_groups[1]['params'][2]: grad has dtype float64, "
                                  "but the parameter has dtype float32"),
    grad_wrong_shape: (ValueError, "param_groups[1]['params'][2]: grad has shape (4,), "
                                   "but the parameter has shape (3,)"),
    grad_is_list: (TypeError, "param_groups[1]['params'][2]: grad must be a numpy array, "
                              "but got list"),
    grad_is_int_array: (TypeError, "param_groups[1]['params'][2]: grad must be float32, "
                                   "float64, float16 or bfloat16, but got int64"),
    grad_of_strided_param_is_another_param: (
        ValueError, "param_groups[1]['params'][2]: is stepped through contiguous copies (it is "
                    "not contiguous), and its parameter, grad or momentum_buffer shares memory "
                    "with those of param_groups[1]['params'][0]; such a tensor must share "
                    "memory with no other tensor of its group"),
    grad_partially_overlaps_param: (ValueError, "param_groups[1]['params'][2]: grad partially "
                                                "overlaps the parameter's memory"),
    buffer_wrong_shape: (ValueError, "param_groups[1]['params'][2]: momentum_buffer has "
                                     "shape (5,), but the parameter has shape (3,)"),
    buffer_wrong_dtype: (TypeError, "param_groups[1]['params'][2]: momentum_buffer has dtype "
                                    "float64, but the parameter has dtype float32"),
    buffer_read_only: (ValueError, "param_groups[1]['params'][2]: momentum_buffer is read-only"),
    buffer_is_the_grad: (ValueError, "param_groups[1]['params'][2]: momentum_buffer shares "
                                     "memory with the parameter or its grad"),
    buffer_is_the_param: (ValueError, "param_groups[1]['params'][2]: momentum_buffer shares "
                                      "memory with the parameter or its grad"),
    param_read_only: (ValueError, "param_groups[1]['params'][2]: parameter is read-only"),
    param_overlaps_itself: (ValueError, f"param_groups[1]['params'][2]: parameter: {OVERLAP}"),
    buffer_overlaps_itself: (ValueError, f"param_groups[1]['params'][2]: momentum_buffer: "
                                         f"{OVERLAP}"),
    param_byte_swapped: (ValueError, "param_groups[1]['params'][2]: parameter must be aligned "
                                     "and in native byte order"),
    lr_is_a_string: (TypeError, "param_groups[1]['lr'] must be a real number, but got str"),
}


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_rejected_step_names_the_input_and_writes_nothing(damage):
    rng = np.random.default_rng(0)
    opt, groups = make_optimizer(rng)
    damage(groups[1][2], opt)
    before = snapshot(opt)
    error, message = CASES[damage]
    with pytest.raises(error) as excinfo:
        opt.step()
    assert str(excinfo.value).startswith(message)
    assert_untouched(opt, before)


def test_first_step_failure_creates_no_state():
    """A step that fails adds no momentum buffers, even for valid groups."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal(4).astype(np.float32)
    good = fastsgd.Parameter(values.copy())
    bad = fastsgd.Parameter(rng.standard_normal(4).astype(np.float32))
    good.grad = np.ones(4, np.float32)
    set_grad_unchecked(bad, np.ones(5, np.float32))
    opt = fastsgd.SGD([{"params": [good]}, {"params": [bad]}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert len(opt.state) == 0
    np.testing.assert_array_equal(good, values)


def test_functional_errors_name_the_list_position():
    p = fastsgd.Parameter(np.zeros(3))
    with pytest.raises(ValueError, match=r"^params\[1\]: grad has shape"):
        fastsgd.functional.sgd([p, p], [np.zeros(3), np.zeros(2)], [], weight_decay=0,
                               momentum=0, lr=0.1, dampening=0, nesterov=False,
                               maximize=False)


def test_grad_that_is_its_parameter_steps_like_torch():
    """Exact aliasing is allowed: each element is read before it is written
    (torch refuses a tensor as its own grad, as p.grad = p does, but takes
    one sharing its memory)."""
    values = np.linspace(-1, 1, 11)
    p = fastsgd.Parameter(values.copy())
    p.grad = p.view(np.ndarray)
    fastsgd.SGD([p], lr=0.25).step()
    np.testing.assert_array_equal(p, values + np.float64(-0.25) * values)


def test_differentiable_in_a_group_is_refused_before_any_write():
    rng = np.random.default_rng(2)
    opt, groups = make_optimizer(rng)
    opt.param_groups[1]["differentiable"] = True
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="no autograd"):
        opt.step()
    assert_untouched(opt, before)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_one_element_array_hyperparameters_step_like_floats(shape):
    """torch takes a 1-element Tensor lr; fastsgd a 1-element array of any shape."""
    values = np.linspace(-1, 1, 9)
    p, q = fastsgd.Parameter(values.copy()), fastsgd.Parameter(values.copy())
    p.grad = q.grad = np.cos(values)
    fastsgd.SGD([p], lr=np.full(shape, 0.1), momentum=np.full(shape, 0.9)).step()
    fastsgd.SGD([q], lr=0.1, momentum=0.9).step()
    np.testing.assert_array_equal(p, q)
