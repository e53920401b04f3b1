# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The boundary between Python and the C kernels in csrc/.

This module only converts and validates: it checks every tensor of a step,
turns the arrays into pointer lists per dtype, allocates the momentum buffers
a first step needs, and then calls the C kernel once per dtype with the GIL
released.  All the arithmetic lives in csrc/.
"""
import numpy as np

cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memset

cnp.import_array()


cdef extern from "fastsgd.h" nogil:
    ctypedef struct fastsgd_sgd_hyper:
        double lr
        double momentum
        double dampening
        double weight_decay
        int nesterov
        int maximize

    ctypedef void (*fastsgd_sgd_f32_fn)(const fastsgd_sgd_hyper *h, int64_t ntensors,
                                        float **params, const float **grads,
                                        float **bufs, const uint8_t *buf_is_new,
                                        const int64_t *sizes)
    ctypedef void (*fastsgd_sgd_f64_fn)(const fastsgd_sgd_hyper *h, int64_t ntensors,
                                        double **params, const double **grads,
                                        double **bufs, const uint8_t *buf_is_new,
                                        const int64_t *sizes)

    ctypedef struct fastsgd_impl:
        const char *name
        fastsgd_sgd_f32_fn sgd_f32
        fastsgd_sgd_f64_fn sgd_f64

    const fastsgd_impl *fastsgd_find_impl(const char *name)
    const fastsgd_impl *fastsgd_best_impl()
    const char *const *fastsgd_impl_names()


cdef const fastsgd_impl *_impl = fastsgd_best_impl()
cdef Py_ssize_t _native_calls = 0


def native_call_count():
    """How many times a C kernel has been called in this process (lets tests
    check that a step makes one call per group and dtype, not per tensor)."""
    return _native_calls


def available_capabilities():
    """Names of the kernels this build has and this CPU runs, best first."""
    cdef const char *const *names = fastsgd_impl_names()
    found = []
    cdef Py_ssize_t i = 0
    while names[i] != NULL:
        if fastsgd_find_impl(names[i]) != NULL:
            found.append(names[i].decode())
        i += 1
    return found


def cpu_capability():
    """Name of the kernel every step uses."""
    return _impl.name.decode()


def set_cpu_capability(name):
    """Use the kernel called `name` (see available_capabilities())."""
    global _impl
    cdef const fastsgd_impl *impl = fastsgd_find_impl(str(name).encode())
    if impl == NULL:
        raise ValueError(
            f"unknown or unsupported CPU capability {name!r}; "
            f"this machine runs {available_capabilities()}")
    _impl = impl


# Errors name the input as the user wrote it: param_groups[g]['params'][i]
# for an optimizer's group g, params[i] for the functional API (group -1).
cdef inline str _where(Py_ssize_t group_index, Py_ssize_t index):
    if group_index < 0:
        return f"params[{index}]"
    return f"param_groups[{group_index}]['params'][{index}]"


cdef inline str _where_option(Py_ssize_t group_index, str key):
    if group_index < 0:
        return key
    return f"param_groups[{group_index}]['{key}']"


cdef double _hyper(dict hyper, str key, Py_ssize_t group_index) except? -1.0:
    value = hyper[key]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{_where_option(group_index, key)} must be a real number, "
                        f"but got {type(value).__name__}") from None


cdef int _check_float_array(object x, str what, Py_ssize_t group_index,
                            Py_ssize_t index, bint must_write) except -1:
    if not cnp.PyArray_Check(x):
        raise TypeError(f"{_where(group_index, index)}: {what} must be a numpy array, "
                        f"but got {type(x).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>x
    cdef int typenum = cnp.PyArray_TYPE(arr)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError(f"{_where(group_index, index)}: {what} must be float32 or "
                        f"float64, but got {arr.dtype}")
    if not cnp.PyArray_ISNOTSWAPPED(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{_where(group_index, index)}: {what} must be aligned and in "
                         f"native byte order")
    if must_write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{_where(group_index, index)}: {what} is read-only")
    return 0


cdef int _check_like(cnp.ndarray param, object x, str what, Py_ssize_t group_index,
                     Py_ssize_t index, bint must_write) except -1:
    """x must match param in shape, dtype and memory order: the kernel walks
    all three buffers as one flat run of elements."""
    _check_float_array(x, what, group_index, index, must_write)
    cdef cnp.ndarray arr = <cnp.ndarray>x
    if cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(param):
        raise TypeError(f"{_where(group_index, index)}: {what} has dtype {arr.dtype}, "
                        f"but the parameter has dtype {param.dtype}")
    cdef int ndim = cnp.PyArray_NDIM(param)
    cdef int d
    cdef bint same_shape = cnp.PyArray_NDIM(arr) == ndim
    if same_shape:
        for d in range(ndim):
            if cnp.PyArray_DIM(arr, d) != cnp.PyArray_DIM(param, d):
                same_shape = False
                break
    if not same_shape:
        raise ValueError(f"{_where(group_index, index)}: {what} has shape {(<object>arr).shape}, "
                         f"but the parameter has shape {(<object>param).shape}")
    if not ((cnp.PyArray_IS_C_CONTIGUOUS(param) and cnp.PyArray_IS_C_CONTIGUOUS(arr))
            or (cnp.PyArray_IS_F_CONTIGUOUS(param) and cnp.PyArray_IS_F_CONTIGUOUS(arr))):
        raise ValueError(f"{_where(group_index, index)}: {what} must be contiguous in "
                         f"the same order as the parameter (C or Fortran)")
    return 0


cdef inline bint _disjoint(cnp.ndarray a, cnp.ndarray b):
    """a and b are dense and of equal size (checked before)."""
    cdef char *a0 = <char *>cnp.PyArray_DATA(a)
    cdef char *b0 = <char *>cnp.PyArray_DATA(b)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(a)
    return nbytes == 0 or a0 + nbytes <= b0 or b0 + nbytes <= a0


cdef inline bint _same_or_disjoint(cnp.ndarray a, cnp.ndarray b):
    """A grad that is its parameter is harmless to an element-wise update (each
    element is read before it is written); partial overlap is not."""
    return cnp.PyArray_DATA(a) == cnp.PyArray_DATA(b) or _disjoint(a, b)


cdef class _DtypeBatch:
    """Pointer lists of the tensors of one dtype, in the order they step."""
    cdef Py_ssize_t count
    cdef void **params
    cdef void **grads
    cdef void **bufs
    cdef uint8_t *buf_is_new
    cdef int64_t *sizes

    def __cinit__(self, Py_ssize_t capacity):
        cdef Py_ssize_t n = capacity if capacity > 0 else 1
        self.count = 0
        self.params = <void **>PyMem_Malloc(n * sizeof(void *))
        self.grads = <void **>PyMem_Malloc(n * sizeof(void *))
        self.bufs = <void **>PyMem_Malloc(n * sizeof(void *))
        self.buf_is_new = <uint8_t *>PyMem_Malloc(n * sizeof(uint8_t))
        self.sizes = <int64_t *>PyMem_Malloc(n * sizeof(int64_t))
        if (self.params == NULL or self.grads == NULL or self.bufs == NULL
                or self.buf_is_new == NULL or self.sizes == NULL):
            raise MemoryError()
        memset(self.bufs, 0, n * sizeof(void *))

    def __dealloc__(self):
        PyMem_Free(self.params)
        PyMem_Free(self.grads)
        PyMem_Free(self.bufs)
        PyMem_Free(self.buf_is_new)
        PyMem_Free(self.sizes)

    cdef void add(self, cnp.ndarray param, cnp.ndarray grad, object buf, bint buf_is_new):
        cdef Py_ssize_t i = self.count
        self.params[i] = cnp.PyArray_DATA(param)
        self.grads[i] = cnp.PyArray_DATA(grad)
        self.bufs[i] = cnp.PyArray_DATA(<cnp.ndarray>buf) if buf is not None else NULL
        self.buf_is_new[i] = buf_is_new
        self.sizes[i] = cnp.PyArray_SIZE(param)
        self.count = i + 1


cdef class SGDPlan:
    """A validated SGD step of one parameter group, ready to run.

    Building a plan checks every input and allocates the momentum buffers of
    first steps; it writes nothing.  `run()` then cannot fail, which is what
    lets SGD.step validate every group before it updates any.
    """
    cdef fastsgd_sgd_hyper hyper
    cdef _DtypeBatch f32
    cdef _DtypeBatch f64
    cdef list _keepalive
    cdef readonly list new_buffers
    """(position in params, array) of each momentum buffer this step creates."""

    def __init__(self, list params, list grads, list buffers, dict hyper,
                 Py_ssize_t group_index=0):
        self.hyper.lr = _hyper(hyper, "lr", group_index)
        self.hyper.momentum = _hyper(hyper, "momentum", group_index)
        self.hyper.dampening = _hyper(hyper, "dampening", group_index)
        self.hyper.weight_decay = _hyper(hyper, "weight_decay", group_index)
        self.hyper.nesterov = bool(hyper["nesterov"])
        self.hyper.maximize = bool(hyper["maximize"])
        cdef bint use_momentum = self.hyper.momentum != 0.0

        cdef Py_ssize_t n = len(params)
        if len(grads) != n or (use_momentum and len(buffers) != n):
            raise ValueError(f"got {n} params, {len(grads)} grads and {len(buffers)} "
                             f"momentum buffers")
        self.f32 = _DtypeBatch(n)
        self.f64 = _DtypeBatch(n)
        # The batches hold raw pointers: keep every array alive until run().
        self._keepalive = [list(params), list(grads), list(buffers)]
        self.new_buffers = []

        cdef Py_ssize_t i
        cdef cnp.ndarray param
        cdef bint buf_is_new
        cdef object buf
        for i in range(n):
            grad = grads[i]
            if grad is None:
                continue
            _check_float_array(params[i], "parameter", group_index, i, True)
            param = <cnp.ndarray>params[i]
            if not (cnp.PyArray_IS_C_CONTIGUOUS(param) or cnp.PyArray_IS_F_CONTIGUOUS(param)):
                raise ValueError(f"{_where(group_index, i)}: parameter must be contiguous "
                                 f"(C or Fortran order); it is updated in place, never "
                                 f"through a copy")
            _check_like(param, grad, "grad", group_index, i, False)
            if not _same_or_disjoint(param, <cnp.ndarray>grad):
                raise ValueError(f"{_where(group_index, i)}: grad partially overlaps the "
                                 f"parameter's memory")
            buf = None
            buf_is_new = False
            if use_momentum:
                buf = buffers[i]
                if buf is None:
                    buf = np.empty_like(param, subok=False)
                    buf_is_new = True
                    self.new_buffers.append((i, buf))
                else:
                    _check_like(param, buf, "momentum_buffer", group_index, i, True)
                    if not (_disjoint(param, <cnp.ndarray>buf) and _disjoint(<cnp.ndarray>grad, <cnp.ndarray>buf)):
                        raise ValueError(f"{_where(group_index, i)}: momentum_buffer shares "
                                         f"memory with the parameter or its grad")
            if cnp.PyArray_TYPE(param) == cnp.NPY_FLOAT32:
                self.f32.add(param, <cnp.ndarray>grad, buf, buf_is_new)
            else:
                self.f64.add(param, <cnp.ndarray>grad, buf, buf_is_new)

    def run(self):
        """Update every parameter and buffer of the plan in place."""
        global _native_calls
        cdef const fastsgd_impl *impl = _impl
        _native_calls += (self.f32.count > 0) + (self.f64.count > 0)
        with nogil:
            if self.f32.count:
                impl.sgd_f32(&self.hyper, self.f32.count, <float **>self.f32.params,
                             <const float **>self.f32.grads, <float **>self.f32.bufs,
                             self.f32.buf_is_new, self.f32.sizes)
            if self.f64.count:
                impl.sgd_f64(&self.hyper, self.f64.count, <double **>self.f64.params,
                             <const double **>self.f64.grads, <double **>self.f64.bufs,
                             self.f64.buf_is_new, self.f64.sizes)
