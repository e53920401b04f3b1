# The input rules of a step: each rule's fast check next to the error that explains it.
#
# A step tests every tensor with steps_as_is() alone; only a tensor it refuses goes to
# explain_rejection(), which finds the rule broken and raises.  The two must agree: a
# rule changed in one is changed in the other, a few lines away.  Errors name the
# input as the user wrote it: param_groups[g]['params'][i] for an optimizer's group g,
# params[i] for the functional API (group -1).
cimport numpy as cnp
from cpython.dict cimport PyDict_GetItemWithError
from cpython.long cimport PyLong_AsDouble
from cpython.object cimport PyObject

from fastsgd._native.kernels cimport (FASTSGD_BF16, FASTSGD_F16, FASTSGD_F32, FASTSGD_F64,
                                      fastsgd_sgd_hyper)
from fastsgd._native.objects cimport (DENSE, NPY_OPPBYTE, array_ptr, is_array, itemsize,
                                      kernel_dtype, refresh_bfloat16, size_of)


cdef inline str where(Py_ssize_t group_index, Py_ssize_t index):
    if group_index < 0:
        return f"params[{index}]"
    return f"param_groups[{group_index}]['params'][{index}]"


cdef inline str where_option(Py_ssize_t group_index, str key):
    if group_index < 0:
        return key
    return f"param_groups[{group_index}]['{key}']"


# ------------------------------------------------------------- hyperparameters

cdef inline object option(dict options, str key, Py_ssize_t group_index):
    cdef PyObject *value = PyDict_GetItemWithError(options, key)
    if value == NULL:
        raise KeyError(f"{where_option(group_index, key)} is missing")
    return <object>value


# How torch's step hands each real option to an op: -lr and 1 - dampening
# are computed in Python first, momentum and weight_decay pass as they are
# after a `!= 0` test.  An error is raised with the type torch's would have.
cdef enum TorchUse:
    PASSED_AFTER_TEST = 0
    NEGATED = 1
    SUBTRACTED_FROM_ONE = 2


cdef inline double real_option(dict options, str key, Py_ssize_t group_index,
                               int use) except? -1.0:
    value = option(options, key, group_index)
    if type(value) is float:
        return <double>value
    if cnp.PyArray_Check(value):
        if cnp.PyArray_SIZE(<cnp.ndarray>value) == 1:
            value = value.item()  # a 1-element array, as torch takes a 1-element Tensor lr
        elif use == PASSED_AFTER_TEST:  # torch's `!= 0` test has no single truth value
            raise ValueError(f"{where_option(group_index, key)} must be a real number, but "
                             f"got an array of {value.size} elements (its truth value is "
                             f"ambiguous)")
    # (a numpy complex64 is not a complex: float() takes its real part with
    # numpy's ComplexWarning, as torch does)
    if isinstance(value, complex):
        raise RuntimeError(f"{where_option(group_index, key)} must be a real number, "
                           f"but got complex")
    if value is True and key == "weight_decay":  # torch: a bool alpha on a float tensor
        raise RuntimeError(f"{where_option(group_index, key)} must be a real number, "
                           f"but got bool (torch: Boolean alpha only supported for "
                           f"Boolean results)")
    # float() also parses strings: "0.1" is no more a number here than in torch.
    if not isinstance(value, (str, bytes, bytearray)):
        if isinstance(value, int):  # defaults such as dampening=0: no float object
            check_torch_int(value, key, group_index, use)
            return PyLong_AsDouble(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{where_option(group_index, key)} must be a real number, "
                    f"but got {type(value).__name__}")


# A group's options as torch's SGD reads them: dampening and nesterov only
# with momentum (present all the same).
cdef inline int read_hyper(dict options, Py_ssize_t group_index,
                           fastsgd_sgd_hyper *h) except -1:
    h.neg_lr = -real_option(options, "lr", group_index, NEGATED)
    h.momentum = real_option(options, "momentum", group_index, PASSED_AFTER_TEST)
    h.dampening = 0.0
    h.nesterov = False
    if h.momentum != 0.0:
        h.dampening = real_option(options, "dampening", group_index, SUBTRACTED_FROM_ONE)
        h.nesterov = flag_option(options, "nesterov", group_index)
    else:
        option(options, "dampening", group_index)
        option(options, "nesterov", group_index)
    h.weight_decay = real_option(options, "weight_decay", group_index, PASSED_AFTER_TEST)
    h.maximize = flag_option(options, "maximize", group_index)
    return 0


cdef inline int check_torch_int(object value, str key, Py_ssize_t group_index,
                                int use) except -1:
    """torch converts a Python int to an int64 or uint64 Scalar: beyond both
    it raises OverflowError."""
    scalar = -value if use == NEGATED else 1 - value if use == SUBTRACTED_FROM_ONE else value
    if scalar < -2**63 or scalar >= 2**64:
        raise OverflowError(f"{where_option(group_index, key)} is out of the range of "
                            f"torch's integer scalars (int64, uint64)")
    return 0


cdef inline bint flag_option(dict options, str key, Py_ssize_t group_index) except -1:
    value = option(options, key, group_index)
    try:
        return bool(value)
    except ValueError as error:  # a many-element array: torch's `if flag:` raises it
        raise ValueError(f"{where_option(group_index, key)} must be a bool: {error}") from None
    except Exception:
        raise TypeError(f"{where_option(group_index, key)} must be a bool, but got "
                        f"{type(value).__name__}") from None


# ------------------------------------------------------------------- arrays

# Rule: an array the kernel reads or writes is a float32, float64, float16
# or bfloat16 numpy array, aligned, in native byte order, and writeable if
# written.
cdef inline bint is_float_array(PyObject *x, bint must_write) noexcept nogil:
    if not is_array(x):
        return False
    cdef array_ptr a = <array_ptr>x
    cdef int need = cnp.NPY_ARRAY_ALIGNED | (cnp.NPY_ARRAY_WRITEABLE if must_write else 0)
    return (kernel_dtype(a) >= 0 and (a.flags & need) == need
            and a.descr.byteorder != NPY_OPPBYTE)


cdef inline int check_float_array(object x, str what, Py_ssize_t group_index,
                                  Py_ssize_t index, bint must_write) except -1:
    if not cnp.PyArray_Check(x):
        raise TypeError(f"{where(group_index, index)}: {what} must be a numpy array, "
                        f"but got {type(x).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>x
    refresh_bfloat16()
    if kernel_dtype(<array_ptr>arr) < 0:
        raise TypeError(f"{where(group_index, index)}: {what} must be float32, float64, "
                        f"float16 or bfloat16, but got {arr.dtype}")
    if not cnp.PyArray_ISNOTSWAPPED(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{where(group_index, index)}: {what} must be aligned and in "
                         f"native byte order")
    if must_write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{where(group_index, index)}: {what} is read-only")
    return 0


cdef inline bint same_layout(array_ptr p, array_ptr a) noexcept nogil:
    """a has p's shape and both are dense in one memory order."""
    if a.nd != p.nd:
        return False
    cdef int d
    for d in range(p.nd):
        if a.dimensions[d] != p.dimensions[d]:
            return False
    return (a.flags & p.flags & DENSE) != 0


# Rule: a grad or buffer matches its parameter in shape, dtype and memory
# order: the kernel walks all three as one flat run of elements.
cdef inline bint is_like(array_ptr p, PyObject *x, bint must_write) noexcept nogil:
    """(p passed is_float_array: an array of its type number is of a kernel's dtype.)"""
    if not is_array(x):
        return False
    cdef array_ptr a = <array_ptr>x
    cdef int need = cnp.NPY_ARRAY_ALIGNED | (cnp.NPY_ARRAY_WRITEABLE if must_write else 0)
    if (a.descr.type_num != p.descr.type_num or (a.flags & need) != need
            or a.descr.byteorder == NPY_OPPBYTE):
        return False
    return same_layout(p, a)


cdef inline int check_shape(cnp.ndarray param, cnp.ndarray arr, str what,
                            Py_ssize_t group_index, Py_ssize_t index) except -1:
    """arr has param's shape."""
    cdef int ndim = cnp.PyArray_NDIM(param)
    cdef int d
    cdef bint same_shape = cnp.PyArray_NDIM(arr) == ndim
    if same_shape:
        for d in range(ndim):
            if cnp.PyArray_DIM(arr, d) != cnp.PyArray_DIM(param, d):
                same_shape = False
                break
    if not same_shape:
        raise ValueError(f"{where(group_index, index)}: {what} has shape {(<object>arr).shape}, "
                         f"but the parameter has shape {(<object>param).shape}")
    return 0


cdef inline int check_layout(cnp.ndarray param, cnp.ndarray arr, str what,
                             Py_ssize_t group_index, Py_ssize_t index) except -1:
    """arr has param's shape and is contiguous in the same order (master
    weights' arrays)."""
    check_shape(param, arr, what, group_index, index)
    if not ((cnp.PyArray_IS_C_CONTIGUOUS(param) and cnp.PyArray_IS_C_CONTIGUOUS(arr))
            or (cnp.PyArray_IS_F_CONTIGUOUS(param) and cnp.PyArray_IS_F_CONTIGUOUS(arr))):
        raise ValueError(f"{where(group_index, index)}: {what} must be contiguous in "
                         f"the same order as the parameter (C or Fortran)")
    return 0


cdef inline int check_like(cnp.ndarray param, object x, str what, Py_ssize_t group_index,
                           Py_ssize_t index, bint must_write) except -1:
    check_float_array(x, what, group_index, index, must_write)
    cdef cnp.ndarray arr = <cnp.ndarray>x
    if cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(param):
        raise TypeError(f"{where(group_index, index)}: {what} has dtype {arr.dtype}, "
                        f"but the parameter has dtype {param.dtype}")
    return check_shape(param, arr, what, group_index, index)


# Rule: a grad is its parameter or shares none of its memory (an element-wise
# update reads each element before writing it; a partial overlap would read
# elements already written); a buffer shares memory with neither.  Both
# arrays are dense and of one size (checked before).
cdef inline bint apart(array_ptr a, array_ptr b, Py_ssize_t nbytes) noexcept nogil:
    return nbytes == 0 or a.data + nbytes <= b.data or b.data + nbytes <= a.data


# ------------------------------------------------------------ strided arrays
#
# A tensor whose arrays are not all contiguous in one order is stepped through
# contiguous copies (plan.pyx): the rules below are what it must satisfy, checked
# by check_tensor() on the calling thread, never on the fast path.

# How much work numpy's exact overlap test (np.shares_memory) may do before
# giving up; two arrays it cannot decide on count as sharing memory.
cdef enum:
    SHARES_MEMORY_MAX_WORK = 100_000


cdef inline void span_of(cnp.ndarray a, char **low, char **high) noexcept:
    """The bytes a's elements occupy, [low, high) (empty when a is)."""
    cdef char *lo = <char *>cnp.PyArray_DATA(a)
    cdef char *hi = lo + cnp.PyArray_ITEMSIZE(a)
    cdef cnp.npy_intp reach
    cdef int d
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, d) == 0:
            low[0] = high[0] = <char *>cnp.PyArray_DATA(a)
            return
        reach = cnp.PyArray_STRIDE(a, d) * (cnp.PyArray_DIM(a, d) - 1)
        if reach < 0:
            lo += reach
        else:
            hi += reach
    low[0] = lo
    high[0] = hi


cdef inline bint same_strides(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether a and b (of one shape) place each element at the same offset
    from their first."""
    cdef int d
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, d) > 1 and cnp.PyArray_STRIDE(a, d) != cnp.PyArray_STRIDE(b, d):
            return False
    return True


cdef inline bint same_view(cnp.ndarray a, cnp.ndarray b) noexcept:
    return cnp.PyArray_DATA(a) == cnp.PyArray_DATA(b) and same_strides(a, b)


# Rule: a written array's elements do not overlap each other.  Exact enough:
# its dimensions sorted by |stride|, each stride steps over everything the
# smaller ones reach.  A zero stride on a dimension longer than 1 (a broadcast
# view) always fails, as torch's in-place ops refuse such a tensor.
cdef inline bint overlaps_itself(cnp.ndarray a) noexcept:
    if cnp.PyArray_FLAGS(a) & DENSE or cnp.PyArray_SIZE(a) == 0:
        return False
    cdef cnp.npy_intp steps[cnp.NPY_MAXDIMS]
    cdef cnp.npy_intp counts[cnp.NPY_MAXDIMS]
    cdef cnp.npy_intp step, count, extent = cnp.PyArray_ITEMSIZE(a)
    cdef int d, k, n = 0
    for d in range(cnp.PyArray_NDIM(a)):
        count = cnp.PyArray_DIM(a, d)
        if count < 2:
            continue
        step = cnp.PyArray_STRIDE(a, d)
        step = -step if step < 0 else step
        k = n
        while k > 0 and steps[k - 1] > step:  # insertion sort by |stride|
            steps[k] = steps[k - 1]
            counts[k] = counts[k - 1]
            k -= 1
        steps[k] = step
        counts[k] = count
        n += 1
    for k in range(n):
        if steps[k] < extent:
            return True
        extent += steps[k] * (counts[k] - 1)
    return False


cdef inline int check_no_self_overlap(cnp.ndarray a, str what, Py_ssize_t group_index,
                                      Py_ssize_t index) except -1:
    if overlaps_itself(a):
        raise ValueError(f"{where(group_index, index)}: {what}: unsupported operation: more than "
                         f"one element of the written-to tensor refers to a single memory "
                         f"location. Please clone() the tensor before performing the operation.")
    return 0


cdef inline int sharing(cnp.ndarray a, cnp.ndarray b) except -1:
    """0 if a and b share no memory, 1 if they do, 2 if numpy's exact test
    gave up (SHARES_MEMORY_MAX_WORK) on strided arrays whose spans meet."""
    cdef char *a_lo
    cdef char *a_hi
    cdef char *b_lo
    cdef char *b_hi
    span_of(a, &a_lo, &a_hi)
    span_of(b, &b_lo, &b_hi)
    if a_lo == a_hi or b_lo == b_hi or a_hi <= b_lo or b_hi <= a_lo:
        return 0
    if cnp.PyArray_FLAGS(a) & cnp.PyArray_FLAGS(b) & DENSE:
        return 1  # both dense: their spans are their elements
    import numpy
    try:
        return 1 if numpy.shares_memory(a, b, max_work=SHARES_MEMORY_MAX_WORK) else 0
    except numpy.exceptions.TooHardError:
        return 2


cdef inline str sharing_reason(int shared):
    """What sharing() found, for an error message."""
    if shared == 2:
        return (f" (numpy's exact test gave up after max_work={SHARES_MEMORY_MAX_WORK}: "
                f"such arrays count as sharing)")
    return ""


# ------------------------------------------------------------- a whole tensor

# Every rule above for a parameter, its grad and its buffer (NULL without
# momentum): the fast path of every step, and the error that explains a
# refusal.  The fast path takes dense arrays in one memory order only; the
# rest, if check_tensor() passes them, is staged through contiguous copies.
cdef inline Py_ssize_t steps_as_is(PyObject *param, PyObject *grad,
                                   PyObject *buf) noexcept nogil:
    """The number of elements of param when the tensor passes every rule
    and steps without copies, else -1."""
    if not is_array(param):
        return -1
    cdef array_ptr p = <array_ptr>param
    # is_float_array, with the dtype found once
    cdef int dtype = kernel_dtype(p)
    cdef int need = cnp.NPY_ARRAY_ALIGNED | cnp.NPY_ARRAY_WRITEABLE
    if dtype < 0 or (p.flags & need) != need or p.descr.byteorder == NPY_OPPBYTE:
        return -1
    if not (p.flags & DENSE) or not is_like(p, grad, False):
        return -1
    cdef array_ptr g = <array_ptr>grad
    cdef Py_ssize_t size = size_of(p)
    cdef Py_ssize_t nbytes = size * (4 if dtype == FASTSGD_F32 else 8 if dtype == FASTSGD_F64
                                     else 2)
    if not (g.data == p.data or apart(p, g, nbytes)):
        return -1
    if buf == NULL:
        return size
    cdef array_ptr b = <array_ptr>buf
    if is_like(p, buf, True) and apart(p, b, nbytes) and apart(g, b, nbytes):
        return size
    return -1


cdef inline int explain_rejection(object param, object grad, object buf,
                                  Py_ssize_t group_index, Py_ssize_t index) except -1:
    """Raise the error that says which rule param, grad or buf breaks."""
    check_tensor(param, grad, buf, group_index, index)
    raise AssertionError(f"{where(group_index, index)}: rejected by no rule")


cdef inline int check_tensor(object param, object grad, object buf,
                             Py_ssize_t group_index, Py_ssize_t index) except -1:
    """Raise the error of the first rule param, grad or buf breaks, if any.
    A tensor that passes but not steps_as_is() is staged."""
    check_float_array(param, "parameter", group_index, index, True)
    cdef cnp.ndarray p = <cnp.ndarray>param
    check_no_self_overlap(p, "parameter", group_index, index)
    check_like(p, grad, "grad", group_index, index, False)
    cdef cnp.ndarray g = <cnp.ndarray>grad
    cdef int shared = 0 if same_view(p, g) else sharing(p, g)
    if shared:
        raise ValueError(f"{where(group_index, index)}: grad partially overlaps the "
                         f"parameter's memory{sharing_reason(shared)}")
    if buf is None:
        return 0
    check_like(p, buf, "momentum_buffer", group_index, index, True)
    cdef cnp.ndarray b = <cnp.ndarray>buf
    check_no_self_overlap(b, "momentum_buffer", group_index, index)
    shared = sharing(p, b) or sharing(g, b)
    if shared:
        raise ValueError(f"{where(group_index, index)}: momentum_buffer shares memory with "
                         f"the parameter or its grad{sharing_reason(shared)}")
    return 0


# ------------------------------------------------- half precision (issue 14)

# Rule: torch rounds every alpha of an op on a float32 or 16-bit tensor to
# its dtype (Scalar.to<float>() / to<Half>() / to<BFloat16>()) and refuses a
# finite value beyond the dtype's range; fastsgd refuses it before writing
# anything.
cdef inline int check_alpha_fits(double value, int dtype, str key,
                                 Py_ssize_t group_index) except -1:
    cdef double largest = (65504.0 if dtype == FASTSGD_F16 else 3.3895313892515355e38
                           if dtype == FASTSGD_BF16 else 3.4028234663852886e38)
    if value == value and value - value == 0.0 and (value > largest or value < -largest):
        name = ("c10::Half" if dtype == FASTSGD_F16 else "c10::BFloat16"
                if dtype == FASTSGD_BF16 else "float")
        raise RuntimeError(f"{where_option(group_index, key)}: value cannot be converted to "
                           f"type {name} without overflow")
    return 0


# The alphas a step applies to a float32 or 16-bit tensor of the kernel's dtype: weight
# decay's, nesterov's momentum, a later step's 1 - dampening, and -lr.
cdef inline int check_step_alphas(const fastsgd_sgd_hyper *h, int dtype, bint with_momentum,
                                  bint later_step, Py_ssize_t group_index) except -1:
    if h.weight_decay != 0.0:
        check_alpha_fits(h.weight_decay, dtype, "weight_decay", group_index)
    if with_momentum:
        if h.nesterov:
            check_alpha_fits(h.momentum, dtype, "momentum", group_index)
        if later_step:
            check_alpha_fits(1.0 - h.dampening, dtype, "dampening", group_index)
    check_alpha_fits(h.neg_lr, dtype, "lr", group_index)
    return 0


# Rule: with master weights, a parameter is float16 or bfloat16, and its
# master copy and momentum buffer are float32 arrays of its shape and memory
# order, sharing memory with nothing the step touches.
cdef inline bint is_master_like(array_ptr p, PyObject *x) noexcept nogil:
    if not is_float_array(x, True):
        return False
    cdef array_ptr a = <array_ptr>x
    return kernel_dtype(a) == FASTSGD_F32 and same_layout(p, a)


cdef inline int check_master_like(cnp.ndarray param, object x, str what, Py_ssize_t group_index,
                                  Py_ssize_t index) except -1:
    if not cnp.PyArray_Check(x):
        raise TypeError(f"{where(group_index, index)}: {what} must be a numpy array, "
                        f"but got {type(x).__name__}")
    if cnp.PyArray_TYPE(<cnp.ndarray>x) != cnp.NPY_FLOAT32:
        raise TypeError(f"{where(group_index, index)}: {what} must be float32 with master "
                        f"weights, but got {(<cnp.ndarray>x).dtype}")
    check_float_array(x, what, group_index, index, True)
    return check_layout(param, <cnp.ndarray>x, what, group_index, index)


cdef inline bint span_apart(array_ptr a, Py_ssize_t na, array_ptr b,
                            Py_ssize_t nb) noexcept nogil:
    return na == 0 or nb == 0 or a.data + na <= b.data or b.data + nb <= a.data


cdef inline bint master_apart(array_ptr p, array_ptr g, array_ptr master,
                              array_ptr buf) noexcept nogil:
    """No two of a master-weights tensor's arrays share memory (buf may be
    NULL)."""
    cdef Py_ssize_t n16 = size_of(p) * 2, n32 = size_of(p) * 4
    cdef bint ok = (g.data == p.data or apart(p, g, n16)) and span_apart(p, n16, master, n32) \
        and span_apart(g, n16, master, n32)
    if buf != NULL:
        ok = ok and span_apart(p, n16, buf, n32) and span_apart(g, n16, buf, n32) \
            and apart(master, buf, n32)
    return ok


cdef inline Py_ssize_t master_steps_as_is(PyObject *param, PyObject *grad, PyObject *master,
                                          PyObject *buf) noexcept nogil:
    """The number of elements of param when a master-weights tensor passes
    every rule (buf NULL without momentum), else -1."""
    if not is_float_array(param, True):
        return -1
    cdef array_ptr p = <array_ptr>param
    cdef int dtype = kernel_dtype(p)
    if (dtype != FASTSGD_F16 and dtype != FASTSGD_BF16) or not (p.flags & DENSE):
        return -1
    if not is_like(p, grad, False) or not is_master_like(p, master):
        return -1
    if buf != NULL and not is_master_like(p, buf):
        return -1
    if not master_apart(p, <array_ptr>grad, <array_ptr>master, <array_ptr>buf):
        return -1
    return size_of(p)


cdef inline int explain_master_rejection(object param, object grad, object master, object buf,
                                         Py_ssize_t group_index, Py_ssize_t index) except -1:
    """Raise the error that says which rule a master-weights tensor breaks."""
    check_float_array(param, "parameter", group_index, index, True)
    cdef cnp.ndarray p = <cnp.ndarray>param
    if kernel_dtype(<array_ptr>p) not in (FASTSGD_F16, FASTSGD_BF16):
        raise TypeError(f"{where(group_index, index)}: master_weights=True needs float16 or "
                        f"bfloat16 parameters, but got {p.dtype}")
    check_tensor(param, grad, None, group_index, index)
    check_master_like(p, master, "master_param", group_index, index)
    if buf is not None:
        check_master_like(p, buf, "momentum_buffer", group_index, index)
    raise ValueError(f"{where(group_index, index)}: master_param or momentum_buffer shares "
                     f"memory with the parameter, its grad or each other")
