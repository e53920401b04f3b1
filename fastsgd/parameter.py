"""fastsgd.Parameter: a trainable numpy array with a `.grad`."""
import sys

import numpy as np

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
_ndarray = np.ndarray  # a module global: one lookup on every grad assignment


def is_bfloat16(dtype):
    """Whether dtype is ml_dtypes' bfloat16 (its type number is assigned when
    ml_dtypes registers it: compare the scalar type, never the number; and
    no bfloat16 array exists before ml_dtypes is imported)."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and np.dtype(dtype).type is getattr(ml_dtypes, "bfloat16", None)


class Parameter(np.ndarray):
    """A float32, float64, float16 or bfloat16 array that an optimizer updates
    in place (bfloat16: ``ml_dtypes.bfloat16``).

    ``Parameter(array)`` shares memory with ``array`` when it is already an
    ndarray of one of those dtypes (as ``torch.nn.Parameter`` wraps a
    tensor); anything else is converted with ``np.asarray(data,
    dtype=dtype)``, which must give one of them.

    ``.grad`` is ``None`` or an ndarray of the parameter's shape and dtype,
    set by the user's backward pass and checked when assigned, as torch
    checks ``tensor.grad = g`` (same exception types and messages, numpy's
    names for dtypes, shapes and types): another dtype or shape raises
    ``RuntimeError``, anything but an ndarray or ``None`` ``TypeError``.  A
    numpy scalar is taken as the 0-d array it converts to.
    Read-only and non-contiguous grads are accepted there; the functions
    that cannot take them (a step, clipping, unscaling) say so.  A
    Parameter hashes by identity, so it can key ``optimizer.state``; ``==``
    stays numpy's element-wise compare.

    Arithmetic, numpy functions and indexing give plain ndarrays, never new
    Parameters: only what the user wraps is trainable.

    Copies: ``copy.deepcopy`` keeps values, dtype, shape and memory order
    but neither ``.grad`` nor attributes, as torch's deepcopy of a Parameter
    (so ``copy.deepcopy(optimizer).step()`` moves nothing until grads are
    set).  ``pickle`` keeps values, dtype, shape, memory order and attributes
    but not ``.grad`` -- as ``torch.save`` of a Parameter drops its grad --
    so a checkpoint never carries stale grads.
    """

    # .grad is a property over the _grad slot, which the native step reads at
    # a fixed offset (fastsgd/_native/objects.pxd) without the property.
    __slots__ = ("_grad", "__dict__")
    __hash__ = object.__hash__  # type: ignore[assignment]  # ndarray's is None

    def __new__(cls, data, dtype=None):
        array = np.asarray(data, dtype=dtype)
        if array.dtype not in _FLOAT_DTYPES and not is_bfloat16(array.dtype):
            raise TypeError(
                f"Parameter needs float32, float64, float16 or bfloat16 data, but got "
                f"{array.dtype}; pass dtype=np.float32 or np.float64 to convert")
        return array.view(cls)

    def __array_finalize__(self, obj):
        self._grad = None

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, grad):
        # The common grad passes three tests inline (under 200 ns a set, torch's
        # check ~110 ns); anything else gets the full checks and their errors.
        if grad is not None and (type(grad) is not _ndarray or grad.dtype is not self.dtype
                                 or grad.shape != self.shape):
            grad = _checked_grad(self, grad)
        self._grad = grad

    @grad.deleter
    def grad(self):
        self._grad = None  # as torch's ``del tensor.grad``

    # Ufuncs (arithmetic, reductions) compute on plain views and give plain
    # arrays; an explicit `out=` is returned as given, so ``p -= x`` updates
    # p in place and leaves it a Parameter.
    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:
            kwargs["out"] = _as_plain(out)
        result = getattr(ufunc, method)(*_as_plain(inputs), **kwargs)
        if out is None or method == "at":
            return result
        return out[0] if len(out) == 1 else out

    def __array_function__(self, func, types, args, kwargs):
        args, kwargs = _as_plain((args, kwargs))
        return func(*args, **kwargs)

    def __getitem__(self, key):
        result = super().__getitem__(key)
        return result.view(np.ndarray) if isinstance(result, Parameter) else result

    def __repr__(self):
        return "Parameter(" + repr(self.view(np.ndarray))[len("array("):]

    def __reduce__(self):
        return _rebuild_parameter, (np.array(self.view(np.ndarray), order="K"), self.__dict__)

    def __deepcopy__(self, memo):
        # torch.nn.Parameter's: a copy of the values in the same memory
        # order, without .grad or attributes
        if id(self) in memo:
            return memo[id(self)]
        new = type(self)(np.array(self.view(np.ndarray), order="K"))
        memo[id(self)] = new
        return new


def _checked_grad(param, grad):
    """grad, if it can be param's grad; else raise as torch's ``tensor.grad =
    grad`` does.  A numpy scalar (what numpy and autograd give for a 0-d
    result) counts as the 0-d array it is converted to."""
    if not isinstance(grad, np.ndarray):
        if not isinstance(grad, np.generic):
            raise TypeError(f"assigned grad expected to be an ndarray or None but got grad of "
                            f"type {_type_name(grad)}")
        grad = np.asarray(grad)
    if grad is param:
        raise RuntimeError("can't assign a Parameter as its own grad")
    if grad.dtype is not param.dtype and grad.dtype != param.dtype:
        raise RuntimeError(
            f"attempting to assign a gradient with dtype '{grad.dtype}' to a parameter with "
            f"dtype '{param.dtype}'. Please ensure that the gradient and the parameter have "
            f"the same dtype")
    if grad.shape != param.shape:
        raise RuntimeError(
            f"attempting to assign a gradient of size '{grad.shape}' to a parameter of size "
            f"'{param.shape}'. Please ensure that the gradient and the parameter are the same "
            f"size")
    return grad


def _type_name(obj):
    """The name of obj's type as torch's messages print it: module-qualified
    unless a builtin."""
    kind = type(obj)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _rebuild_parameter(data, attributes):
    parameter = Parameter(data)
    parameter.__dict__.update(attributes)
    return parameter


def _as_plain(obj):
    """obj with every Parameter inside tuples, lists and dicts viewed as an ndarray."""
    if isinstance(obj, Parameter):
        return obj.view(np.ndarray)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_plain(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _as_plain(v) for k, v in obj.items()}
    return obj
