"""A step caches what it gathered from param_groups and state; every way of
changing them must be seen by the next step.  Each case changes something
between steps, then compares with fastsgd.reference doing the same."""
import numpy as np
import pytest

import fastsgd
from fastsgd import reference


def twin_optimizers(rng, momentum=0.9):
    values = [rng.standard_normal(n) for n in (5, 9, 3)]
    extra = rng.standard_normal(9)
    twins = []
    for cls in (fastsgd.SGD, reference.SGD):
        params = [fastsgd.Parameter(v.copy()) for v in values]
        spare = fastsgd.Parameter(extra.copy())
        twins.append((cls(params, lr=0.1, momentum=momentum, dampening=0.1), params, spare))
    return twins


def step_both(twins, rng):
    grads = [rng.standard_normal(p.shape) for p in twins[0][1]] + \
            [rng.standard_normal(twins[0][2].shape)]
    for opt, params, spare in twins:
        for p, g in zip(params + [spare], grads):
            p.grad = g.copy()
        opt.step()


def assert_same(twins):
    (fast, fast_params, fast_spare), (ref, ref_params, ref_spare) = twins
    for a, b in zip(fast_params + [fast_spare], ref_params + [ref_spare]):
        np.testing.assert_array_equal(a, b)
    assert len(fast.state) == len(ref.state)
    for a, b in zip(fast_params + [fast_spare], ref_params + [ref_spare]):
        if a in fast.state and "momentum_buffer" in fast.state[a]:
            np.testing.assert_array_equal(fast.state[a]["momentum_buffer"],
                                          ref.state[b]["momentum_buffer"])


def replace_buffer(opt, params, spare):
    opt.state[params[1]]["momentum_buffer"] = np.full(9, 0.5)


def replace_state_with_plain_dict(opt, params, spare):
    opt.state[params[0]] = {"momentum_buffer": np.full(5, -1.0)}


def write_into_plain_dict_state_later(opt, params, spare):
    replace_state_with_plain_dict(opt, params, spare)
    opt.state[params[0]]["momentum_buffer"] = np.full(5, 2.0)


def delete_state_entry(opt, params, spare):
    del opt.state[params[2]]


def delete_buffer_key(opt, params, spare):
    del opt.state[params[2]]["momentum_buffer"]


def clear_state(opt, params, spare):
    opt.state.clear()


def update_buffer_dict(opt, params, spare):
    opt.state[params[1]].update(momentum_buffer=np.zeros(9))


def swap_a_param(opt, params, spare):
    opt.param_groups[0]["params"][1] = spare


def replace_params_list(opt, params, spare):
    opt.param_groups[0]["params"] = [params[2], params[0]]


def change_hyperparameters(opt, params, spare):
    opt.param_groups[0].update(lr=0.02, momentum=0.5, weight_decay=0.1, nesterov=True,
                               dampening=0)


def momentum_off_then_on(opt, params, spare):
    opt.param_groups[0]["momentum"] = 0


def add_group(opt, params, spare):
    opt.add_param_group({"params": [spare], "lr": 0.3})


def load_state_dict(opt, params, spare):
    sd = opt.state_dict()
    sd["state"] = {i: {"momentum_buffer": np.full(p.shape, 0.25)} for i, p in enumerate(params)}
    opt.load_state_dict(sd)


def replace_the_state_object(opt, params, spare):
    from collections import defaultdict
    state = defaultdict(dict)
    state[params[0]]["momentum_buffer"] = np.full(5, 3.0)
    opt.state = state


def setdefault_and_pop(opt, params, spare):
    opt.state[params[0]].pop("momentum_buffer")
    opt.state[params[1]].setdefault("momentum_buffer", None)
    opt.state[params[1]]["momentum_buffer"] = np.ones(9)


CHANGES = [replace_buffer, replace_state_with_plain_dict, write_into_plain_dict_state_later,
           delete_state_entry, delete_buffer_key, clear_state, update_buffer_dict,
           swap_a_param, replace_params_list, change_hyperparameters, momentum_off_then_on,
           add_group, load_state_dict, replace_the_state_object, setdefault_and_pop]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_next_step_sees_the_change(change):
    rng = np.random.default_rng(0)
    twins = twin_optimizers(rng)
    for _ in range(2):
        step_both(twins, rng)
    for opt, params, spare in twins:
        change(opt, params, spare)
    for _ in range(3):
        step_both(twins, rng)
        assert_same(twins)


def test_in_place_change_of_an_array_is_checked_every_step():
    rng = np.random.default_rng(1)
    (opt, params, _), _ = twin_optimizers(rng)
    for p in params:
        p.grad = np.ones_like(p)
    opt.step()
    opt.state[params[1]]["momentum_buffer"].flags.writeable = False
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: momentum_buffer is read-only"):
        opt.step()
