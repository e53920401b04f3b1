"""torch's TensorIterator, modelled for the 16-bit ops of an SGD step on strided arrays.

torch 2.13 computes an elementwise op on float16/bfloat16 tensors in a vector
body and a scalar remainder that round differently (see fastsgd.reference).
Which elements fall in the remainder depends on how TensorIterator lays the
op's tensors out: it tries a fast setup (every tensor contiguous, or channels
last, or dense with equal strides: one run over all elements in memory
order), else it sorts the dimensions by stride, merges the ones it can, and
runs the innermost dimension row by row, the vector body only over rows that
are contiguous in every tensor; each run's last ``n % 32`` elements are
scalar.  It also allocates the op's new tensors (``grad.add(param)``,
``torch.clone``) in a layout of its choosing, which later ops see.

This module follows aten/src/ATen/TensorIterator.cpp (fast_set_up,
reorder_dimensions, allocate_or_resize_outputs, coalesce_dimensions) and
cpu/Loops.h (VectorizedLoop2d) at one thread, with strides counted in
elements (a step's arrays share one dtype).  fastsgd.reference and the
native step of strided 16-bit tensors both take their roundings from here;
tests/test_half_precision.py checks it against torch.
"""
import numpy as np

from ._native.kernels import HALF_CHUNK as CHUNK
from ._native.kernels import STEP_OPS

# The ops of a step, one bit each in a step's modes (csrc/fastsgd.h's FASTSGD_OP_*)
NEG, WEIGHT_DECAY, MUL, BUF, NESTEROV, PARAM = (
    STEP_OPS[op] for op in ("neg", "weight_decay", "mul", "buf", "nesterov", "param"))


def _contiguous(shape, strides):
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _channels_last(shape, strides):
    if len(shape) != 4:
        return False
    expected = 1
    for d in (1, 3, 2, 0):
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def non_overlapping_and_dense(shape, strides):
    """torch's is_non_overlapping_and_dense: the elements fill one block of
    memory, in some order of the dimensions."""
    if len(shape) == 1:
        return shape[0] < 2 or strides[0] == 1
    order = sorted(range(len(shape)), key=lambda d: (shape[d] < 2, strides[d] if shape[d] >= 2
                                                      else 0))
    expected = 1
    for d in order:
        if shape[d] < 2:
            return True
        if strides[d] != expected:
            return False
        expected *= shape[d]
    return True


def _contiguous_strides(shape):
    strides, expected = [], 1
    for size in reversed(shape):
        strides.append(expected)
        expected *= max(size, 1)
    return tuple(reversed(strides))


def _channels_last_strides(shape):
    strides, expected = [0] * 4, 1
    for d in (1, 3, 2, 0):
        strides[d] = expected
        expected *= max(shape[d], 1)
    return tuple(strides)


def _fast_setup(shape, operands):
    """The layout of torch's fast setup ('contiguous', 'channels_last',
    'dense'), or None.  operands: strides per tensor, None for a new output."""
    defined = [s for s in operands if s is not None]
    if all(_contiguous(shape, s) for s in defined):
        return "contiguous"
    if all(_channels_last(shape, s) for s in defined):
        return "channels_last"
    if all(non_overlapping_and_dense(shape, s) for s in defined) and all(
            s == defined[0] for s in defined):
        return "dense"
    return None


def _reorder(shape, operands):
    """TensorIterator's permutation: iteration dimension k is shape's perm[k]
    (innermost first), by insertion sort on the operands' strides."""
    ndim = len(shape)
    perm = list(range(ndim - 1, -1, -1))
    if ndim == 1:
        return [0]

    def should_swap(dim0, dim1):
        for strides in operands:
            if strides is None:
                continue
            s0, s1 = strides[dim0], strides[dim1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 < s1:
                return -1
            if s0 > s1:
                return 1
            if shape[dim0] > shape[dim1]:
                return 1
        return 0

    for i in range(1, ndim):
        dim1 = i
        for dim0 in range(i - 1, -1, -1):
            comparison = should_swap(perm[dim0], perm[dim1])
            if comparison > 0:
                perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
                dim1 = dim0
            elif comparison < 0:
                break
    return perm


def _general_output_strides(shape, perm):
    """A new output's strides: dense in the iteration order."""
    if perm == list(range(len(shape) - 1, -1, -1)):
        return _contiguous_strides(shape)
    strides, expected = [0] * len(shape), 1
    for d in perm:
        strides[d] = expected
        expected *= shape[d]
    return tuple(strides)


def _layout(shape, operands, same_shapes=True):
    """(output strides, inner dims, inner strides per operand): the strides
    of the op's new output (if operands[0] is None), and the dimensions of
    shape that TensorIterator merges into its innermost run, innermost first,
    with each operand's stride along that run.  same_shapes: no operand is a
    0-d scalar (which rules the fast setup out)."""
    shape = tuple(shape)
    if not shape:
        return (), [], [1] * len(operands)
    setup = _fast_setup(shape, operands) if same_shapes else None
    if setup is not None:
        if setup == "contiguous":
            layout = _contiguous_strides(shape)
        elif setup == "channels_last":
            layout = _channels_last_strides(shape)
        else:
            layout = next(s for s in reversed(operands) if s is not None)
        perm = sorted(range(len(shape)), key=lambda d: (layout[d], d))
        operands = [layout] * len(operands)  # one dense run over all elements
    else:
        perm = _reorder(shape, operands)
        if operands[0] is None:
            operands = [_general_output_strides(shape, perm)] + list(operands[1:])
    out = operands[0]
    # coalesce_dimensions, on the innermost run only
    group, run_size = [perm[0]], shape[perm[0]]
    run_strides = [s[perm[0]] for s in operands]
    for d in perm[1:]:
        if run_size == 1:
            run_strides = [s[d] for s in operands]
        elif shape[d] != 1 and any(run_size * rs != s[d] for rs, s in zip(run_strides, operands)):
            break
        group.append(d)
        run_size *= shape[d]
    return out, group, run_strides


def vector_elements(shape, operands, scalar_inputs=0):
    """Where the op's vector body computes, a bool array of shape: the op's
    tensors' strides in operands (output first, None for a new one);
    scalar_inputs more inputs are CPU scalars (``buf.mul_(m)``), which shape
    nothing but coalescing."""
    # a scalar's strides are 0: it coalesces with anything, orders nothing,
    # and cpu_kernel_vec takes it out of the loop
    _, group, run_strides = _layout(shape, operands, same_shapes=not scalar_inputs)
    shape = tuple(shape)
    if not group:
        return np.zeros(shape, bool)  # one element: the scalar code
    n = int(np.prod([shape[d] for d in group]))
    contiguous = all(s == 1 for s in run_strides)
    # cpu_kernel_vec also vectorizes a run where one input is broadcast
    broadcast = [i for i, s in enumerate(run_strides) if s == 0 and i > 0]
    if not contiguous and not (len(broadcast) == 1 and all(
            s == 1 for i, s in enumerate(run_strides) if i != broadcast[0])):
        return np.zeros(shape, bool)
    position = np.zeros(shape, np.int64)
    weight = 1
    for d in group:
        axis_shape = [1] * len(shape)
        axis_shape[d] = shape[d]
        position += (np.arange(shape[d], dtype=np.int64) * weight).reshape(axis_shape)
        weight *= shape[d]
    return position < n - n % CHUNK


def result_strides(shape, operands):
    """The strides torch gives the new output of an op over operands."""
    return _layout(shape, [None] + list(operands))[0]


def clone_strides(shape, strides):
    """torch.clone(x)'s strides (memory_format=torch.preserve_format)."""
    if non_overlapping_and_dense(shape, strides):
        return tuple(strides)
    return result_strides(shape, [strides])


def step_modes(shape, param, grad, buf, *, maximize, weight_decay, momentum, nesterov):
    """The roundings of one SGD step of a 16-bit tensor as torch's for-loop
    SGD makes them: a uint8 array of shape, bit op (NEG ... PARAM) set where
    that op's vector body computes the element.  param, grad, buf: the
    arrays' strides (buf None: a first step, or no momentum)."""
    modes = np.zeros(tuple(shape), np.uint8)

    def op(bit, operands, scalar_inputs=0):
        modes[vector_elements(shape, operands, scalar_inputs)] |= bit

    d = grad
    if maximize:
        op(NEG, [None, d])
        d = result_strides(shape, [d])
    if weight_decay:
        op(WEIGHT_DECAY, [None, d, param])
        d = result_strides(shape, [d, param])
    if momentum:
        if buf is None:
            buf = clone_strides(shape, d)
        else:
            op(MUL, [buf, buf], scalar_inputs=1)
            op(BUF, [buf, buf, d])
        if nesterov:
            op(NESTEROV, [None, d, buf])
            d = result_strides(shape, [d, buf])
        else:
            d = buf
    op(PARAM, [param, param, d])
    return modes


def first_buffer_strides(shape, param, grad, *, maximize, weight_decay):
    """The strides of the momentum buffer torch's first step makes
    (``torch.clone`` of the step's gradient)."""
    d = grad
    if maximize:
        d = result_strides(shape, [d])
    if weight_decay:
        d = result_strides(shape, [d, param])
    return clone_strides(shape, d)


def element_strides(array):
    """A numpy array's strides in elements."""
    return tuple(s // array.itemsize for s in array.strides)


def empty_strided(shape, strides, dtype):
    """An uninitialised array with these (dense) strides, in elements."""
    dtype = np.dtype(dtype)
    flat = np.empty(int(np.prod(shape)), dtype)
    return np.lib.stride_tricks.as_strided(flat, tuple(shape),
                                           tuple(s * dtype.itemsize for s in strides),
                                           writeable=True)
