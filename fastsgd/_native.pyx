# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The boundary between Python and the C kernels in csrc/.

This module only converts and validates.  A step of a group checks every
tensor, turns the arrays into pointer lists per dtype, allocates the momentum
buffers that first steps need, and then calls the C driver once per dtype
with the GIL released.  All the arithmetic lives in csrc/.

What a step gathers from the optimizer's state is cached per group (see
_GroupPlan) so that a steady-state step costs a few nanoseconds per tensor
and allocates nothing; grads and every array's metadata are still checked on
every step.  A group of many tensors is checked and gathered on several
threads (_stage_range) while the calling thread holds the GIL.
"""
import numpy as np

cimport numpy as cnp
from cpython.dict cimport PyDict_Check, PyDict_GetItem, PyDict_GetItemWithError
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsDouble
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_get_thread_ident, PyThread_release_lock,
                               PyThread_type_lock)
from cpython.ref cimport Py_XDECREF, Py_XINCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memset

from .optimizer import OptimizerState, ParamState
from .parameter import Parameter

cnp.import_array()


cdef extern from "fastsgd.h" nogil:
    ctypedef struct fastsgd_sgd_hyper:
        double neg_lr
        double momentum
        double dampening
        double weight_decay
        int nesterov
        int maximize

    enum:
        FASTSGD_F32
        FASTSGD_F64

    ctypedef struct fastsgd_tensor_list:
        int64_t ntensors
        void **params
        const void **grads
        void **bufs
        const uint8_t *buf_is_new
        const int64_t *sizes

    ctypedef struct fastsgd_impl:
        const char *name

    const fastsgd_impl *fastsgd_find_impl(const char *name)
    const fastsgd_impl *fastsgd_best_impl()
    const char *const *fastsgd_impl_names()
    void fastsgd_sgd(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                     const fastsgd_tensor_list *list, int serial)
    void fastsgd_stream(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                        int serial)
    void fastsgd_norms(const fastsgd_impl *impl, int dtype, int64_t ntensors,
                       const void **arrays, const int64_t *sizes, double p, double *norms)
    void fastsgd_scale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                       const int64_t *sizes, double coef)
    void fastsgd_clamp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                       const int64_t *sizes, double lo, double hi)
    int fastsgd_get_num_threads()
    void fastsgd_set_num_threads(int n)
    int fastsgd_has_openmp()
    int fastsgd_threads_for(int dtype, int64_t total, int with_buffers)
    ctypedef void (*fastsgd_range_fn)(void *ctx, int64_t begin, int64_t end) noexcept
    int fastsgd_parallel_ranges(int64_t n, int64_t min_per_thread, fastsgd_range_fn fn,
                                void *ctx)
    int64_t fastsgd_get_parallel_min_bytes()
    void fastsgd_set_parallel_min_bytes(int64_t nbytes)


cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    ctypedef struct PyListObject:
        PyObject **ob_item
    ctypedef struct PyTupleObject:
        PyObject *ob_item[1]


# ------------------------------------------------------------------ kernels

cdef const fastsgd_impl *_impl = fastsgd_best_impl()
cdef Py_ssize_t _native_calls = 0
cdef Py_ssize_t _parallel_stagings = 0


def available_capabilities():
    """Names of the kernels this build has and this CPU runs, in order of
    preference."""
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


def get_num_threads():
    """Threads a step may use (OpenMP's, so OMP_NUM_THREADS and threadpoolctl
    apply); 1 in a build without OpenMP."""
    return fastsgd_get_num_threads()


def set_num_threads(int n):
    """Let steps use up to n threads (small steps use fewer)."""
    if n < 1:
        raise ValueError(f"number of threads must be at least 1, but got {n}")
    fastsgd_set_num_threads(n)


def parallel_threshold(nbytes=None):
    """Memory traffic per thread (bytes) below which a step uses fewer
    threads; sets it when nbytes is given, returns the value in force."""
    if nbytes is not None:
        fastsgd_set_parallel_min_bytes(nbytes)
    return fastsgd_get_parallel_min_bytes()


def has_openmp():
    """Whether this build runs steps on several threads."""
    return bool(fastsgd_has_openmp())


def native_call_count():
    """How many times a C kernel has been called in this process (lets tests
    check that a step makes one call per group and dtype, not per tensor)."""
    return _native_calls


def parallel_staging_count():
    """How many groups have been staged on several threads in this process
    (lets tests check that they exercise that path)."""
    return _parallel_stagings


# --------------------------------------------------------- reading a .grad

# Parameter keeps .grad in a slot: read it at its offset, as the slot's own
# descriptor would, without the attribute lookup (a step reads every grad).
cdef type _PARAMETER = Parameter
cdef Py_ssize_t _GRAD_OFFSET = -1
if type(Parameter.__dict__.get("grad")).__name__ == "member_descriptor":
    _GRAD_OFFSET = (<PyMemberDescrObject *>Parameter.__dict__["grad"]).d_member.offset


cdef inline PyObject *_grad_slot(PyObject *param) noexcept nogil:
    """A Parameter's .grad slot: the grad, None, or NULL if never set."""
    return (<PyObject **>((<char *>param) + _GRAD_OFFSET))[0]


cdef inline object _grad_of(object p):
    cdef PyObject *grad
    if type(p) is _PARAMETER and _GRAD_OFFSET >= 0:
        grad = _grad_slot(<PyObject *>p)
        if grad != NULL:
            return <object>grad
    return p.grad


# --------------------------------------------------------------- validation

# Errors name the input as the user wrote it: param_groups[g]['params'][i]
# for an optimizer's group g, params[i] for the functional API (group -1).
cdef str _where(Py_ssize_t group_index, Py_ssize_t index):
    if group_index < 0:
        return f"params[{index}]"
    return f"param_groups[{group_index}]['params'][{index}]"


cdef str _where_option(Py_ssize_t group_index, str key):
    if group_index < 0:
        return key
    return f"param_groups[{group_index}]['{key}']"


cdef object _option(dict options, str key, Py_ssize_t group_index):
    cdef PyObject *value = PyDict_GetItemWithError(options, key)
    if value == NULL:
        raise KeyError(f"{_where_option(group_index, key)} is missing")
    return <object>value


cdef double _real_option(dict options, str key, Py_ssize_t group_index) except? -1.0:
    value = _option(options, key, group_index)
    if type(value) is float:
        return <double>value
    if cnp.PyArray_Check(value) and cnp.PyArray_SIZE(<cnp.ndarray>value) == 1:
        value = value.item()  # a 1-element array, as torch takes a 1-element Tensor lr
    # float() also parses strings: "0.1" is no more a number here than in torch.
    if not isinstance(value, (str, bytes, bytearray)):
        try:
            if type(value) is int:  # defaults such as dampening=0: no float object
                return PyLong_AsDouble(value)
            return float(value)
        except (TypeError, ValueError):
            pass
        except OverflowError:
            raise ValueError(f"{_where_option(group_index, key)} is out of the range "
                             f"of a float") from None
    raise TypeError(f"{_where_option(group_index, key)} must be a real number, "
                    f"but got {type(value).__name__}")


cdef bint _flag_option(dict options, str key, Py_ssize_t group_index) except -1:
    value = _option(options, key, group_index)
    try:
        return bool(value)
    except Exception:
        raise TypeError(f"{_where_option(group_index, key)} must be a bool, but got "
                        f"{type(value).__name__}") from None


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


cdef inline bint _disjoint(cnp.ndarray a, cnp.ndarray b) noexcept:
    """a and b are dense and of equal size (checked before)."""
    cdef char *a0 = <char *>cnp.PyArray_DATA(a)
    cdef char *b0 = <char *>cnp.PyArray_DATA(b)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(a)
    return nbytes == 0 or a0 + nbytes <= b0 or b0 + nbytes <= a0


cdef inline bint _same_or_disjoint(cnp.ndarray a, cnp.ndarray b) noexcept:
    """A grad that is its parameter is harmless to an element-wise update (each
    element is read before it is written); partial overlap is not."""
    return cnp.PyArray_DATA(a) == cnp.PyArray_DATA(b) or _disjoint(a, b)


# numpy's public array struct, read directly on the fast path: no
# reference counting, no calls.
cdef extern from "numpy/ndarraytypes.h":
    ctypedef struct descr_fields "PyArray_Descr":
        char byteorder
        int type_num
    ctypedef struct PyArrayObject_fields:
        char *data
        int nd
        cnp.npy_intp *dimensions
        PyObject *base
        descr_fields *descr
        int flags
    enum: NPY_OPPBYTE  # the byte order char of a byte-swapped dtype

ctypedef PyArrayObject_fields *array_ptr

cdef PyTypeObject *_NDARRAY = <PyTypeObject *>np.ndarray
# The same objects as plain pointers, for functions that run without the GIL
# (staging threads): reading them needs no reference.
cdef PyTypeObject *_PARAMETER_TYPE = <PyTypeObject *>_PARAMETER
cdef PyObject *_NONE = <PyObject *>None

cdef extern from "Python.h":
    # Py_TYPE and PyObject_TypeCheck on borrowed pointers: plain reads of an
    # object and its type, which Cython lets run without the GIL.
    PyTypeObject *_type_of "Py_TYPE"(PyObject *x) nogil
    bint _type_check "PyObject_TypeCheck"(PyObject *x, PyTypeObject *t) nogil

cdef int _DENSE = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_F_CONTIGUOUS

cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #error "fastsgd's staging threads rely on the GIL to keep objects still"
    #endif
    /* Staging threads hold the grads they stage (twice: see _hold) while
     * the calling thread holds the GIL, so no Python code runs meanwhile;
     * atomically, because two parameters may share one grad object. */
    static inline void fastsgd_hold_shared(PyObject *o)
    {
        __atomic_fetch_add(&o->ob_refcnt, 2, __ATOMIC_RELAXED);
    }
    static inline void fastsgd_or_shared(int *bits, int more)
    {
        __atomic_fetch_or(bits, more, __ATOMIC_RELAXED);
    }
    """
    void _hold_shared "fastsgd_hold_shared"(PyObject *o) nogil
    void _or_shared "fastsgd_or_shared"(int *bits, int more) nogil


cdef inline bint _is_float_array(PyObject *x, bint must_write) noexcept nogil:
    """Every rule _check_float_array enforces, without building messages."""
    cdef PyTypeObject *t = _type_of(x)
    if not (t == _NDARRAY or t == _PARAMETER_TYPE or _type_check(x, _NDARRAY)):
        return False
    cdef array_ptr a = <array_ptr>x
    cdef int need = cnp.NPY_ARRAY_ALIGNED | (cnp.NPY_ARRAY_WRITEABLE if must_write else 0)
    return ((a.descr.type_num == cnp.NPY_FLOAT32 or a.descr.type_num == cnp.NPY_FLOAT64)
            and (a.flags & need) == need and a.descr.byteorder != NPY_OPPBYTE)


cdef inline bint _is_like(array_ptr p, PyObject *x, bint must_write) noexcept nogil:
    """Every rule _check_like enforces, without building messages."""
    if not _is_float_array(x, must_write):
        return False
    cdef array_ptr a = <array_ptr>x
    if a.descr.type_num != p.descr.type_num or a.nd != p.nd:
        return False
    cdef int d
    for d in range(p.nd):
        if a.dimensions[d] != p.dimensions[d]:
            return False
    return (a.flags & p.flags & _DENSE) != 0


cdef inline bint _apart(array_ptr a, array_ptr b, Py_ssize_t nbytes) noexcept nogil:
    return nbytes == 0 or a.data + nbytes <= b.data or b.data + nbytes <= a.data


cdef inline Py_ssize_t _itemsize(array_ptr a) noexcept nogil:
    return 4 if a.descr.type_num == cnp.NPY_FLOAT32 else 8


cdef inline Py_ssize_t _size(array_ptr a) noexcept nogil:
    cdef Py_ssize_t n = 1
    cdef int d
    for d in range(a.nd):
        n *= a.dimensions[d]
    return n


cdef inline Py_ssize_t _steps_as_is(PyObject *param, PyObject *grad,
                                     PyObject *buf) noexcept nogil:
    """The number of elements of param when param, grad and buf (NULL
    without momentum) pass every rule of _explain_rejection (the fast path
    of every step), else -1."""
    if not _is_float_array(param, True):
        return -1
    cdef array_ptr p = <array_ptr>param
    if not (p.flags & _DENSE) or not _is_like(p, grad, False):
        return -1
    cdef array_ptr g = <array_ptr>grad
    cdef Py_ssize_t size = _size(p)
    cdef Py_ssize_t nbytes = size * _itemsize(p)
    if not (g.data == p.data or _apart(p, g, nbytes)):
        return -1
    if buf == NULL:
        return size
    cdef array_ptr b = <array_ptr>buf
    if _is_like(p, buf, True) and _apart(p, b, nbytes) and _apart(g, b, nbytes):
        return size
    return -1


cdef int _explain_rejection(object param, object grad, object buf, Py_ssize_t group_index,
                            Py_ssize_t index) except -1:
    """Raise the error that says which rule param, grad or buf breaks."""
    _check_float_array(param, "parameter", group_index, index, True)
    cdef cnp.ndarray p = <cnp.ndarray>param
    if not (cnp.PyArray_IS_C_CONTIGUOUS(p) or cnp.PyArray_IS_F_CONTIGUOUS(p)):
        raise ValueError(f"{_where(group_index, index)}: parameter must be contiguous "
                         f"(C or Fortran order); it is updated in place, never "
                         f"through a copy")
    _check_like(p, grad, "grad", group_index, index, False)
    if not _same_or_disjoint(p, <cnp.ndarray>grad):
        raise ValueError(f"{_where(group_index, index)}: grad partially overlaps the "
                         f"parameter's memory")
    if buf is not None:
        _check_like(p, buf, "momentum_buffer", group_index, index, True)
        if not (_disjoint(p, <cnp.ndarray>buf) and _disjoint(<cnp.ndarray>grad, <cnp.ndarray>buf)):
            raise ValueError(f"{_where(group_index, index)}: momentum_buffer shares "
                             f"memory with the parameter or its grad")
    raise AssertionError(f"{_where(group_index, index)}: rejected by no rule")


# ------------------------------------------------------------ pointer lists

# What _stage_range reads and writes: the group's lists (borrowed) and the
# arrays of the float32 and float64 batches, indexed by the tensor's
# position in the group.
cdef struct _Staging:
    PyObject **params
    PyObject **buffers  # NULL without momentum
    int64_t *results  # per position: 2 * element count + dtype, _NO_GRAD or _SLOW
    void **params_data[2]
    const void **grads_data[2]
    void **bufs_data[2]
    uint8_t *buf_is_new[2]
    int64_t *sizes[2]
    PyObject **held[2]
    void **clean_grads[2]
    void **owner_slots  # the group's _Owners
    size_t owner_mask
    int found  # _FOUND_* bits, or'ed in by every thread


# An array a step points into must keep its memory until the kernel is
# done: neither freed nor moved, while Python code the step runs (a .grad
# property, a hash) or another thread may drop every other reference to it.
# Holding it is not enough: numpy's resize(refcheck=True) moves the memory of
# an array with at most 2 references (the caller's name and the call's), so
# a step holds 2 of its own.  _hold and _let_go take and drop them; the plan
# holds its cached params and buffers in the cache and in arrays_held.
cdef inline void _hold(PyObject *x) noexcept:
    Py_XINCREF(x)
    Py_XINCREF(x)


cdef inline void _let_go(PyObject *x) noexcept:
    Py_XDECREF(x)
    Py_XDECREF(x)


cdef class _Batch:
    """The tensors of one dtype that a step updates, as the C driver takes
    them.  Until clear(), it holds (_hold) each grad it points into, and each
    buffer that its plan does not hold (a plan holds the params and the
    steady state's buffers).  Its storage only grows, so a steady-state step
    allocates nothing."""
    cdef Py_ssize_t count
    cdef Py_ssize_t capacity
    cdef void **params
    cdef const void **grads
    cdef void **bufs
    cdef uint8_t *buf_is_new
    cdef int64_t *sizes
    cdef PyObject **held  # 2 per tensor: grad, buffer (or NULL)
    # Per tensor, a grad that owns its memory and was found to share none
    # with the group's parameters and buffers (address and data), valid
    # while the owners checked against stay the same (owners_fills).
    cdef void **clean_grads
    cdef Py_ssize_t clean_fills
    # Whether some grad may alias, if the staging threads checked each as
    # they staged it (the grad is in their cache then), else -1.
    cdef int grads_alias

    def __cinit__(self):
        self.grads_alias = -1

    def __dealloc__(self):
        self.clear()
        PyMem_Free(self.params)
        PyMem_Free(self.grads)
        PyMem_Free(self.bufs)
        PyMem_Free(self.buf_is_new)
        PyMem_Free(self.sizes)
        PyMem_Free(self.held)
        PyMem_Free(self.clean_grads)

    cdef int reserve(self, Py_ssize_t n) except -1:
        if n <= self.capacity:
            return 0
        self.params = <void **>_grow(self.params, n * sizeof(void *))
        self.grads = <const void **>_grow(self.grads, n * sizeof(void *))
        self.bufs = <void **>_grow(self.bufs, n * sizeof(void *))
        self.buf_is_new = <uint8_t *>_grow(self.buf_is_new, n * sizeof(uint8_t))
        self.sizes = <int64_t *>_grow(self.sizes, n * sizeof(int64_t))
        self.held = <PyObject **>_grow(self.held, 2 * n * sizeof(PyObject *))
        self.clean_grads = <void **>_grow(self.clean_grads, 2 * n * sizeof(void *))
        memset(self.clean_grads, 0, 2 * n * sizeof(void *))
        self.capacity = n
        return 0

    cdef inline void add(self, PyObject *param, PyObject *grad, PyObject *buf,
                         Py_ssize_t size, bint buf_is_new, bint hold_buf) noexcept:
        """Add a checked tensor of `size` elements; buf is NULL without
        momentum.  hold_buf is false when the plan holds buf."""
        cdef Py_ssize_t i = self.count
        self.params[i] = (<array_ptr>param).data
        self.grads[i] = (<array_ptr>grad).data
        self.bufs[i] = (<array_ptr>buf).data if buf != NULL else NULL
        self.buf_is_new[i] = buf_is_new
        self.sizes[i] = size
        self.held[2 * i] = grad
        self.held[2 * i + 1] = buf if hold_buf else NULL
        _hold(grad)
        _hold(self.held[2 * i + 1])
        self.count = i + 1

    cdef void lend_arrays(self, _Staging *job, int dtype) noexcept:
        """Let _stage_range write this batch's entries."""
        job.params_data[dtype] = self.params
        job.grads_data[dtype] = self.grads
        job.bufs_data[dtype] = self.bufs
        job.buf_is_new[dtype] = self.buf_is_new
        job.sizes[dtype] = self.sizes
        job.held[dtype] = self.held
        job.clean_grads[dtype] = self.clean_grads

    cdef inline void keep(self, Py_ssize_t i) noexcept:
        """Add the entry _stage_range wrote (and whose grad it holds) at
        position i >= count."""
        cdef Py_ssize_t c = self.count
        if c != i:
            self.params[c] = self.params[i]
            self.grads[c] = self.grads[i]
            self.bufs[c] = self.bufs[i]
            self.buf_is_new[c] = self.buf_is_new[i]
            self.sizes[c] = self.sizes[i]
            self.held[2 * c] = self.held[2 * i]
            self.held[2 * c + 1] = self.held[2 * i + 1]
        self.count = c + 1

    cdef void clear(self) noexcept:
        cdef Py_ssize_t i
        for i in range(2 * self.count):
            _let_go(self.held[i])
        self.count = 0
        self.grads_alias = -1

    cdef inline void sync_clean_grads(self, _Owners owners) noexcept:
        if self.clean_fills != owners.fills:
            memset(self.clean_grads, 0, 2 * self.capacity * sizeof(void *))
            self.clean_fills = owners.fills

    cdef inline bint grad_may_alias(self, Py_ssize_t i, _Owners owners) noexcept:
        return _grad_may_alias(<array_ptr>self.held[2 * i], self.params[i],
                               &self.clean_grads[2 * i], owners.slots, owners.mask)

    cdef bint grads_may_alias(self, _Owners owners, bint with_buffers, int dtype) noexcept:
        """Whether a step of this batch on several threads could read a grad
        that another tensor's step writes (a grad sharing memory with another
        parameter or momentum buffer of the group).  Checked only when the
        step would use several threads."""
        if self.grads_alias == 0:
            return False
        cdef Py_ssize_t i
        cdef int64_t total = 0
        for i in range(self.count):
            total += self.sizes[i]
        if fastsgd_threads_for(dtype, total, with_buffers) < 2:
            return False
        if self.grads_alias == 1:
            return True
        self.sync_clean_grads(owners)
        for i in range(self.count):
            if self.grad_may_alias(i, owners):
                return True
        return False

    cdef fastsgd_tensor_list as_list(self, bint with_buffers) noexcept nogil:
        cdef fastsgd_tensor_list lst
        lst.ntensors = self.count
        lst.params = self.params
        lst.grads = self.grads
        lst.bufs = self.bufs if with_buffers else NULL
        lst.buf_is_new = self.buf_is_new if with_buffers else NULL
        lst.sizes = self.sizes
        return lst


cdef inline bint _grad_may_alias(array_ptr grad, void *param_data, void **clean,
                                 void **owner_slots, size_t owner_mask) noexcept nogil:
    """Whether grad may share memory with a parameter or buffer of its group
    (owner_slots and owner_mask: the group's _Owners) other than its own
    parameter, whose data is param_data.  clean[0:2] remembers a grad that
    owns its memory and was found clean, while the owners stay the same."""
    if grad.data == param_data:
        return False  # its own parameter
    if clean[0] == <void *>grad and clean[1] == <void *>grad.data and grad.base == NULL:
        return False  # an owner then, it is not one of the owners now
    if _owners_have(owner_slots, owner_mask, _owner(<PyObject *>grad)):
        return True
    if grad.base == NULL:
        clean[0] = <void *>grad
        clean[1] = <void *>grad.data
    return False


cdef void *_grow(void *old, size_t nbytes) except NULL:
    cdef void *new = PyMem_Realloc(old, nbytes)
    if new == NULL:
        raise MemoryError()
    return new


# ----------------------------------------------------------- a group's step

def _first_overlap_across_dtypes(params):
    """Position of the first parameter sharing memory with one of the other
    dtype (float32 vs float64) in params, or -1."""
    spans = sorted((a.__array_interface__["data"][0], a.nbytes, a.dtype == np.float32, i)
                   for i, a in enumerate(params)
                   if isinstance(a, np.ndarray) and a.nbytes)
    reach = {True: 0, False: 0}  # how far the spans of each dtype reach so far
    for start, nbytes, is_f32, i in spans:
        if start < reach[not is_f32]:
            return i
        reach[is_f32] = max(reach[is_f32], start + nbytes)
    return -1


def _any_overlap(arrays):
    """Whether any two of the arrays (numpy arrays or anything else, which is
    ignored) share a byte of memory."""
    spans = sorted((a.__array_interface__["data"][0], a.nbytes)
                   for a in arrays if isinstance(a, np.ndarray) and a.nbytes)
    return any(start + nbytes > next_start
               for (start, nbytes), (next_start, _) in zip(spans, spans[1:]))


cdef inline void *_owner(PyObject *x) noexcept nogil:
    """The object at the end of x's chain of bases: two arrays can share
    memory only if they have the same owner."""
    while _type_check(x, _NDARRAY) and (<array_ptr>x).base != NULL:
        x = (<array_ptr>x).base
    return <void *>x


cdef inline size_t _slot(void *owner, size_t mask) noexcept nogil:
    return ((<size_t>owner >> 4) * <size_t>11400714819323198485ULL >> 20) & mask


cdef inline bint _owners_have(void **slots, size_t mask, void *owner) noexcept nogil:
    """Whether an _Owners' set (its slots and mask) holds owner."""
    if slots == NULL:
        return False
    cdef size_t i = _slot(owner, mask)
    while slots[i] != NULL:
        if slots[i] == owner:
            return True
        i = (i + 1) & mask
    return False


cdef class _Owners:
    """The owners of the memory of a group's parameters and momentum buffers,
    as an open-addressing hash set of pointers (the arrays that hold them are
    kept by the plan's cache)."""
    cdef void **slots
    cdef size_t mask
    cdef Py_ssize_t fills  # how many times fill() ran

    def __dealloc__(self):
        PyMem_Free(self.slots)

    cdef int fill(self, list arrays) except -1:
        cdef size_t size = 1
        while size < 2 * <size_t>len(arrays) + 2:
            size <<= 1
        self.slots = <void **>_grow(self.slots, size * sizeof(void *))
        memset(self.slots, 0, size * sizeof(void *))
        self.mask = size - 1
        self.fills += 1
        cdef size_t i
        cdef void *owner
        for a in arrays:
            if isinstance(a, np.ndarray):
                owner = _owner(<PyObject *>a)
                i = _slot(owner, self.mask)
                while self.slots[i] != NULL and self.slots[i] != owner:
                    i = (i + 1) & self.mask
                self.slots[i] = owner
        return 0


# In a plan's buffer cache: "this parameter's state is not a ParamState, so
# look its buffer up on every step".
cdef object _LOOK_UP = object()
cdef PyObject *_LOOK_UP_PTR = <PyObject *>_LOOK_UP


cdef object _buffer_in_state(object state, object param, Py_ssize_t group_index,
                             Py_ssize_t index):
    """state[param]['momentum_buffer'], or None; never adds a state entry."""
    cdef PyObject *found = PyDict_GetItem(state, param)
    if found == NULL:
        return None
    # Owned: the lookup below can run Python code (a key's __eq__) that
    # drops this dict from the state, which would free it mid-lookup.
    cdef object param_state = <object>found
    if not PyDict_Check(param_state):
        raise TypeError(f"{_where(group_index, index)}: optimizer.state of the parameter "
                        f"must be a dict, but got {type(param_state).__name__}")
    cdef PyObject *buf = PyDict_GetItem(param_state, "momentum_buffer")
    return <object>buf if buf != NULL else None


# What _steady_state answers besides an element count.
cdef enum:
    _NO_GRAD = -1  # the parameter has no grad: nothing to do
    _SLOW = -2     # anything else the steady state does not cover


cdef inline Py_ssize_t _steady_state(PyObject *param, PyObject *buf, bint with_momentum,
                                     PyObject **grad) noexcept nogil:
    """The steady state of a step, on borrowed pointers and without calling
    into Python: param is a Parameter with a grad and, with momentum, a
    cached buffer `buf`, all passing every check.  Returns param's element
    count and sets *grad, or _NO_GRAD, or _SLOW."""
    if _type_of(param) != _PARAMETER_TYPE or _GRAD_OFFSET < 0:
        return _SLOW
    grad[0] = _grad_slot(param)
    if grad[0] == _NONE:
        return _NO_GRAD
    if grad[0] == NULL:
        return _SLOW
    if with_momentum and (buf == _NONE or buf == _LOOK_UP_PTR):
        return _SLOW
    cdef Py_ssize_t size = _steps_as_is(param, grad[0], buf if with_momentum else NULL)
    return size if size >= 0 else _SLOW


# Below this many tensors per thread, a group's staging stays on the
# calling thread: waking another costs more than it saves.  Measured on 2
# threads with 256-element tensors: at 1,024 tensors staging takes 0.93x
# the serial time with hot caches and 0.77x with cold ones; at 512, 1.07x
# and 0.87x.
cdef enum:
    _MIN_TENSORS_PER_STAGING_THREAD = 512


cdef inline int _dtype_of(array_ptr a) noexcept nogil:
    return FASTSGD_F32 if a.descr.type_num == cnp.NPY_FLOAT32 else FASTSGD_F64


cdef inline void _put_entry(_Staging *job, int64_t i, array_ptr param, PyObject *grad,
                            PyObject *buf, int64_t size) noexcept nogil:
    """Write tensor i's pointers and size at position i of its dtype's arrays."""
    cdef int dtype = _dtype_of(param)
    job.params_data[dtype][i] = param.data
    job.grads_data[dtype][i] = (<array_ptr>grad).data
    job.bufs_data[dtype][i] = (<array_ptr>buf).data if buf != NULL else NULL
    job.sizes[dtype][i] = size


# What the staging threads found, in _Staging.found: per dtype, some tensor
# (_FOUND_F32 << dtype) and some grad that may alias (_FOUND_ALIAS_F32 <<
# dtype); a parameter without grad; a tensor outside the steady state.
cdef enum:
    _FOUND_F32 = 1
    _FOUND_ALIAS_F32 = 4
    _FOUND_NO_GRAD = 16
    _FOUND_SLOW = 32


cdef void _stage_range(void *job_, int64_t begin, int64_t end) noexcept nogil:
    """_steady_state for positions [begin, end), on any thread while the
    caller holds the GIL (so the objects stay still): it reads objects,
    holds each grad it stages, checks it for grads_may_alias (its header is
    in this thread's cache now) and writes the job's arrays, at the
    tensor's own position in the batch of its dtype."""
    cdef _Staging *job = <_Staging *>job_
    cdef PyObject *param
    cdef PyObject *grad = NULL
    cdef PyObject *buf
    cdef int64_t i, size
    cdef int dtype, found = 0
    for i in range(begin, end):
        param = job.params[i]
        buf = job.buffers[i] if job.buffers != NULL else NULL
        size = _steady_state(param, buf, job.buffers != NULL, &grad)
        if size < 0:
            job.results[i] = size
            found |= _FOUND_SLOW if size == _SLOW else _FOUND_NO_GRAD
            continue
        dtype = _dtype_of(<array_ptr>param)
        job.results[i] = 2 * size + dtype
        _put_entry(job, i, <array_ptr>param, grad, buf, size)
        job.buf_is_new[dtype][i] = False
        job.held[dtype][2 * i] = grad
        job.held[dtype][2 * i + 1] = NULL  # the plan holds the buffer
        _hold_shared(grad)
        found |= _FOUND_F32 << dtype
        if _grad_may_alias(<array_ptr>grad, (<array_ptr>param).data,
                           &job.clean_grads[dtype][2 * i], job.owner_slots, job.owner_mask):
            found |= _FOUND_ALIAS_F32 << dtype
    _or_shared(&job.found, found)


cdef class _GroupPlan:
    """One parameter group's step: validated and staged by prepare(), then
    run() (which cannot fail), then commit() (which stores new buffers).

    The plan caches the group's parameters and their momentum buffers.  The
    cache holds while the group's params list is the same list holding the
    same parameters, the optimizer's state is the same OptimizerState and no
    OptimizerState or ParamState has changed since (their version counter),
    and momentum stays on or off.  Anything else rebuilds it from the state."""
    cdef fastsgd_sgd_hyper hyper
    cdef bint with_momentum
    cdef bint serial  # some tensors share memory: step them in order, on one thread
    cdef bint looks_up_buffers  # some buffers are read from the state every step
    cdef Py_ssize_t cross_dtype_alias  # a param sharing memory with one of the other dtype, or -1
    cdef _Owners owners  # of the memory of the params and buffers serial was decided on
    cdef _Batch f32
    cdef _Batch f64
    cdef readonly list new_buffers
    """(position in params, array) of each momentum buffer this step creates."""
    cdef dict earlier_buffers
    """{parameter: buffer} created by the groups before this one in this step
    (None if none): a parameter listed in several groups takes, as in torch,
    the buffer its first group creates (torch refuses such groups only in
    add_param_group)."""

    cdef object cached_params_list
    cdef tuple cached_params
    cdef list cached_buffers
    cdef object cached_state
    cdef object cached_version
    cdef bint cached_with_momentum
    cdef list arrays_held  # the params and cached buffers again: see _hold
    cdef int64_t *staged  # _Staging.results, for as many tensors as the batches hold

    def __cinit__(self):
        self.f32 = _Batch()
        self.f64 = _Batch()
        self.owners = _Owners()
        self.new_buffers = []

    def __dealloc__(self):
        PyMem_Free(self.staged)

    cdef int read_options(self, dict options, Py_ssize_t group_index) except -1:
        self.hyper.neg_lr = -_real_option(options, "lr", group_index)
        self.hyper.momentum = _real_option(options, "momentum", group_index)
        self.hyper.dampening = _real_option(options, "dampening", group_index)
        self.hyper.weight_decay = _real_option(options, "weight_decay", group_index)
        self.hyper.nesterov = _flag_option(options, "nesterov", group_index)
        self.hyper.maximize = _flag_option(options, "maximize", group_index)
        self.with_momentum = self.hyper.momentum != 0.0
        return 0

    cdef int reset(self, Py_ssize_t n) except -1:
        self.f32.clear()
        self.f64.clear()
        if n > self.f32.capacity:
            self.staged = <int64_t *>_grow(self.staged, n * sizeof(int64_t))
        self.f32.reserve(n)
        self.f64.reserve(n)
        if self.new_buffers:
            del self.new_buffers[:]
        return 0

    cdef int stage(self, Py_ssize_t index, object param, object grad, object buf,
                   Py_ssize_t group_index) except -1:
        """Check one tensor and add it to the batch of its dtype."""
        cdef bint buf_is_new = False
        cdef Py_ssize_t size = -1
        if not self.with_momentum:
            buf = None
        elif buf is None and self.earlier_buffers is not None and param in self.earlier_buffers:
            buf = self.earlier_buffers[param]  # an earlier group's run fills it first
        elif buf is None:
            if _steps_as_is(<PyObject *>param, <PyObject *>grad, NULL) < 0:
                _explain_rejection(param, grad, None, group_index, index)
            # Not np.empty_like: it dispatches to a subclass's
            # __array_function__, which may return anything.
            buf = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>param),
                                    cnp.PyArray_DIMS(<cnp.ndarray>param),
                                    cnp.PyArray_TYPE(<cnp.ndarray>param),
                                    not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>param))
            buf_is_new = True
            self.new_buffers.append((index, buf))
        # Checked after the last Python code above could run (a lookup's
        # __eq__, a collection during an allocation), right before add().
        size = _steps_as_is(<PyObject *>param, <PyObject *>grad,
                            <PyObject *>buf if buf is not None else NULL)
        if size < 0:
            _explain_rejection(param, grad, buf, group_index, index)
        self.batch_of(<PyObject *>param).add(<PyObject *>param, <PyObject *>grad,
                                             <PyObject *>buf if buf is not None else NULL,
                                             size, buf_is_new, True)
        return 0

    cdef inline _Batch batch_of(self, PyObject *param):
        return self.f32 if _dtype_of(<array_ptr>param) == FASTSGD_F32 else self.f64

    cdef bint cache_holds(self, list params, object state, object version):
        if not (params is self.cached_params_list and state is self.cached_state
                and version is not None and version == self.cached_version
                and self.with_momentum == self.cached_with_momentum):
            return False
        cdef Py_ssize_t i, n = PyList_GET_SIZE(params)
        if n != len(self.cached_params):
            return False
        for i in range(n):
            if PyList_GET_ITEM(params, i) != PyTuple_GET_ITEM(self.cached_params, i):
                return False
        return True

    cdef int rebuild_cache(self, list params, object state, object version,
                           Py_ssize_t group_index) except -1:
        cdef Py_ssize_t i
        # Invalid until complete: building it can raise (a parameter's
        # __hash__ in state.get), and a half-built cache must not hold.
        self.cached_params_list = None
        self.cached_params = tuple(params)
        self.cached_buffers = None
        buffers = []
        if self.with_momentum:
            buffers = [None] * len(params)
            for i, p in enumerate(params):
                if not isinstance(p, _PARAMETER):
                    continue  # stage_slowly rejects it, by name
                param_state = state.get(p)
                if version is None or (param_state is not None and type(param_state) is not ParamState):
                    buffers[i] = _LOOK_UP
                else:
                    buffers[i] = _buffer_in_state(state, p, group_index, i)
            self.cached_buffers = buffers
        # Arrays stay where they are while the cache holds them, so their
        # overlaps do too.  A buffer looked up per step cannot be checked
        # here: the group then steps in order.
        looked_up = [b is _LOOK_UP for b in buffers]
        arrays = params + [b for b, dynamic in zip(buffers, looked_up) if not dynamic]
        self.looks_up_buffers = any(looked_up)
        self.serial = self.looks_up_buffers or _any_overlap(arrays)
        self.owners.fill(arrays)
        self.arrays_held = arrays
        self.cross_dtype_alias = _first_overlap_across_dtypes(params)
        self.cached_state = state
        self.cached_version = version
        self.cached_with_momentum = self.with_momentum
        self.cached_params_list = params
        return 0

    cdef int prepare_group(self, dict group, object state, object version,
                           Py_ssize_t group_index) except -1:
        """Stage the group's step from the optimizer's param_groups and state."""
        self.read_options(group, group_index)
        if _flag_option(group, "differentiable", group_index):
            raise RuntimeError(NO_AUTOGRAD)
        params = _option(group, "params", group_index)
        if type(params) is not list:
            params = list(params)
        if not PyDict_Check(state):
            raise TypeError(f"optimizer.state must be a dict, but got {type(state).__name__}")
        if not self.cache_holds(params, state, version):
            self.rebuild_cache(params, state, version, group_index)
        if self.cross_dtype_alias >= 0:
            raise ValueError(
                f"{_where(group_index, self.cross_dtype_alias)}: shares memory with a "
                f"parameter of the other dtype in its group; a step updates a group's "
                f"float32 and float64 parameters in separate passes, so it cannot keep "
                f"their order: put them in different groups or stop sharing the memory")
        # Staging reads the parameters from the cache's tuple (the list's
        # items, by cache_holds), not from the list: stage_slowly can run
        # Python code (a .grad property, a finalizer) that changes the list.
        cdef Py_ssize_t i, n = PyTuple_GET_SIZE(self.cached_params)
        self.reset(n)
        # A looked-up buffer is never in the steady state: staging threads
        # would hand such a group back every step.
        if (n >= 2 * _MIN_TENSORS_PER_STAGING_THREAD and not self.looks_up_buffers
                and self.stage_in_parallel(n)):
            return 0
        cdef PyObject *param
        cdef PyObject *grad = NULL
        cdef PyObject *buf = NULL
        cdef Py_ssize_t size
        for i in range(n):
            param = PyTuple_GET_ITEM(self.cached_params, i)
            if self.with_momentum:
                buf = PyList_GET_ITEM(self.cached_buffers, i)
            size = _steady_state(param, buf, self.with_momentum, &grad)
            if size >= 0:
                # the cached buffers list keeps buf alive
                self.batch_of(param).add(param, grad, buf, size, False, False)
            elif size == _SLOW:
                self.stage_slowly(i, <object>param, state, group_index)
        return 0

    cdef bint stage_in_parallel(self, Py_ssize_t n) except -1:
        """Stage a group whose every tensor is in the steady state on
        several threads.  Returns False, having staged nothing, when one
        thread would do or some tensor needs the slow path."""
        global _parallel_stagings
        cdef Py_ssize_t i
        cdef _Staging job
        job.params = (<PyTupleObject *>self.cached_params).ob_item
        job.buffers = ((<PyListObject *>self.cached_buffers).ob_item if self.with_momentum
                       else NULL)
        job.results = self.staged
        self.f32.lend_arrays(&job, FASTSGD_F32)
        self.f64.lend_arrays(&job, FASTSGD_F64)
        job.owner_slots = self.owners.slots
        job.owner_mask = self.owners.mask
        job.found = 0
        self.f32.sync_clean_grads(self.owners)
        self.f64.sync_clean_grads(self.owners)
        if fastsgd_parallel_ranges(n, _MIN_TENSORS_PER_STAGING_THREAD, _stage_range,
                                   &job) <= 1:
            return False
        cdef _Batch batch
        cdef int64_t result
        cdef int layout = job.found & ~(_FOUND_ALIAS_F32 | _FOUND_ALIAS_F32 << FASTSGD_F64)
        if layout == _FOUND_F32 or layout == _FOUND_F32 << FASTSGD_F64:
            # one dtype, no gaps: the entries are in place
            batch = self.f32 if layout == _FOUND_F32 else self.f64
            batch.count = n
        else:
            # compacted per dtype, so that the held grads end up in
            # [0, count) of their batch, where clear() lets go of them
            for i in range(n):
                result = self.staged[i]
                if result >= 0:
                    (self.f64 if result & 1 else self.f32).keep(i)
        self.f32.grads_alias = (job.found & _FOUND_ALIAS_F32) != 0
        self.f64.grads_alias = (job.found & (_FOUND_ALIAS_F32 << FASTSGD_F64)) != 0
        if job.found & _FOUND_SLOW:
            self.f32.clear()
            self.f64.clear()
            return False
        _parallel_stagings += 1
        return True

    cdef int stage_slowly(self, Py_ssize_t i, object param, object state,
                          Py_ssize_t group_index) except -1:
        """Everything the steady state does not cover: other types, first
        steps, buffers looked up per step, and rejections."""
        if not isinstance(param, _PARAMETER):
            raise TypeError(f"{_where(group_index, i)}: optimizer can only optimize "
                            f"Parameters, but got {type(param).__name__}")
        grad = _grad_of(param)
        if grad is None:
            return 0
        buf = None
        if self.with_momentum:
            buf = <object>PyList_GET_ITEM(self.cached_buffers, i)
            if buf is _LOOK_UP:
                buf = _buffer_in_state(state, param, group_index, i)
        return self.stage(i, param, grad, buf, group_index)

    cdef int prepare_lists(self, list params, list grads, list buffers,
                           dict options) except -1:
        """Stage a step of explicit lists (the functional API)."""
        self.read_options(options, -1)
        cdef Py_ssize_t i, n = len(params)
        if len(grads) != n or (self.with_momentum and len(buffers) != n):
            raise ValueError(f"got {n} params, {len(grads)} grads and {len(buffers)} "
                             f"momentum buffers")
        self.reset(n)
        arrays = params + [b for b in buffers if b is not None]
        self.serial = _any_overlap(arrays)
        self.owners.fill(arrays)
        self.arrays_held = arrays
        for i in range(n):
            if grads[i] is not None:
                self.stage(i, params[i], grads[i],
                           buffers[i] if self.with_momentum else None, -1)
        return 0

    cdef void run(self, bint roofline):
        global _native_calls
        cdef const fastsgd_impl *impl = _impl
        cdef fastsgd_tensor_list f32 = self.f32.as_list(self.with_momentum)
        cdef fastsgd_tensor_list f64 = self.f64.as_list(self.with_momentum)
        _native_calls += (f32.ntensors > 0) + (f64.ntensors > 0)
        # A grad that is another tensor's parameter or buffer must be read
        # after (or before) that tensor's update, in order, as torch does.
        # (The roofline only measures: it runs as it finds its arrays.)
        cdef bint serial32 = self.serial or (not roofline and f32.ntensors > 0 and
            self.f32.grads_may_alias(self.owners, self.with_momentum, FASTSGD_F32))
        cdef bint serial64 = self.serial or (not roofline and f64.ntensors > 0 and
            self.f64.grads_may_alias(self.owners, self.with_momentum, FASTSGD_F64))
        with nogil:
            if f32.ntensors:
                if roofline:
                    fastsgd_stream(impl, FASTSGD_F32, &f32, serial32)
                else:
                    fastsgd_sgd(impl, FASTSGD_F32, &self.hyper, &f32, serial32)
            if f64.ntensors:
                if roofline:
                    fastsgd_stream(impl, FASTSGD_F64, &f64, serial64)
                else:
                    fastsgd_sgd(impl, FASTSGD_F64, &self.hyper, &f64, serial64)

    cdef int commit(self, object state) except -1:
        """Store the buffers this step created and let go of the arrays."""
        self.f32.clear()
        self.f64.clear()
        cdef Py_ssize_t i
        for i, buf in self.new_buffers:
            state[self.cached_params[i]]["momentum_buffer"] = buf
        return 0


NO_AUTOGRAD = "fastsgd has no autograd: differentiable=True is not supported"


cdef class SGDStepper:
    """Steps an optimizer's param_groups: every group is validated and staged
    before any is run, so a bad input anywhere leaves every array untouched.
    Steps of one stepper from several threads take turns."""
    cdef list plans
    cdef PyThread_type_lock lock
    cdef long holder  # the thread that holds the lock, else 0

    def __cinit__(self):
        self.plans = []
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def step(self, list param_groups, object state):
        """Validate every group, then update every group."""
        self._locked(param_groups, state, True)

    def validate(self, list param_groups, object state):
        """Raise what step() would raise, writing nothing."""
        self._locked(param_groups, state, False)

    cdef int _locked(self, list param_groups, object state, bint run) except -1:
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            # Python code that a step runs (a .grad property, an option's
            # __float__) stepping the same optimizer would wait for itself.
            if self.holder == PyThread_get_thread_ident():
                raise RuntimeError("step() called during a step of the same optimizer")
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
        self.holder = PyThread_get_thread_ident()
        try:
            self._prepare_all(param_groups, state)
            for plan in self.plans:
                if run:
                    (<_GroupPlan>plan).run(False)
                    (<_GroupPlan>plan).commit(state)
                else:
                    (<_GroupPlan>plan).reset(0)
        finally:
            self.holder = 0
            PyThread_release_lock(self.lock)
        return 0

    cdef int _prepare_all(self, list param_groups, object state) except -1:
        cdef Py_ssize_t g, n = len(param_groups)
        while len(self.plans) < n:
            self.plans.append(_GroupPlan())
        if len(self.plans) > n:
            del self.plans[n:]
        version = OptimizerState.version if type(state) is OptimizerState else None
        cdef dict created = None  # buffers created by the groups staged so far
        cdef _GroupPlan plan
        try:
            for g in range(n):
                # Staging runs Python code (option conversions, .grad
                # properties, hashes), which may shorten the caller's list.
                if g >= PyList_GET_SIZE(param_groups):
                    raise RuntimeError("optimizer.param_groups lost groups during step()")
                group = param_groups[g]
                if not PyDict_Check(group):
                    raise TypeError(f"param_groups[{g}] must be a dict, but got "
                                    f"{type(group).__name__}")
                plan = <_GroupPlan>self.plans[g]
                plan.earlier_buffers = created
                plan.prepare_group(group, state, version, g)
                plan.earlier_buffers = None
                if plan.new_buffers:
                    if created is None:
                        created = {}
                    for i, buf in plan.new_buffers:
                        created[plan.cached_params[i]] = buf
        except BaseException:
            for plan in self.plans:
                plan.earlier_buffers = None
                plan.reset(0)
            raise
        return 0


def sgd(params, grads, momentum_buffers, dict options):
    """One step of explicit lists; returns [(position, new buffer), ...]."""
    cdef _GroupPlan plan = _GroupPlan()
    params = list(params)  # one hold on the params; the plan's arrays_held is the other
    plan.prepare_lists(params, list(grads), list(momentum_buffers), options)
    plan.run(False)
    plan.f32.clear()
    plan.f64.clear()
    return plan.new_buffers


cdef class Roofline:
    """The roofline of a step: the C streaming loop with the same reads and
    writes per element as SGD over these arrays, split over threads the same
    way.  Calling it runs one pass; it writes into params and buffers.

    With read_objects, each pass first finds the arrays from the Python
    objects, as a step must: each parameter's grad from its slot, and the
    data and shape of the parameter, its grad and its buffer (a pass covers
    the fewest elements of the three, so that it never runs past an array).
    It checks nothing else, and reads on as many threads as a step stages
    on, so it is the least a step of Python arrays costs: the objects sit
    apart from the arrays and are read cold after a backward pass.  It needs
    Parameters of one dtype whose grads stay the ones it was made with."""
    cdef _GroupPlan plan
    cdef list params  # the batches point into them
    cdef list buffers  # None without momentum
    cdef _Batch objects_batch  # the batch read_objects rewrites, else None

    def __init__(self, params, grads, momentum_buffers, read_objects=False):
        self.params = list(params)
        self.plan = _GroupPlan()
        options = {"lr": 0.0, "momentum": 1.0 if momentum_buffers else 0.0,
                   "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
                   "maximize": False}
        self.plan.prepare_lists(self.params, list(grads),
                                list(momentum_buffers) or [None] * len(self.params), options)
        if self.plan.new_buffers:
            raise ValueError("the roofline needs existing momentum buffers")
        if not read_objects:
            return
        if not (_GRAD_OFFSET >= 0 and all(type(p) is _PARAMETER for p in self.params)
                and len({p.dtype for p in self.params}) <= 1
                and all(g is not None and p.grad is g for p, g in zip(self.params, grads))):
            raise ValueError("reading objects needs Parameters of one dtype whose .grad "
                             "are the grads given")
        self.buffers = list(momentum_buffers) or None
        self.objects_batch = self.plan.f64 if self.plan.f64.count else self.plan.f32

    def __call__(self):
        if self.objects_batch is not None:
            self.read_objects()
        self.plan.run(True)

    cdef int read_objects(self) except -1:
        cdef _Batch batch = self.objects_batch
        cdef _Staging job
        job.params = (<PyListObject *>self.params).ob_item
        job.buffers = NULL if self.buffers is None else (<PyListObject *>self.buffers).ob_item
        job.results = self.plan.staged
        batch.lend_arrays(&job, FASTSGD_F64 if batch is self.plan.f64 else FASTSGD_F32)
        cdef Py_ssize_t i, n = batch.count
        # on as many threads as a step would stage these tensors on
        if fastsgd_parallel_ranges(n, _MIN_TENSORS_PER_STAGING_THREAD, _read_objects,
                                   &job) <= 1:
            _read_objects(&job, 0, n)
        for i in range(n):
            if job.results[i] < 0:
                raise ValueError(f"params[{i}].grad changed since the roofline was made")
        return 0


cdef void _read_objects(void *job_, int64_t begin, int64_t end) noexcept nogil:
    """Roofline.read_objects for positions [begin, end), on any thread while
    the caller holds the GIL.  Refuses (results[i] = -1) a grad other than
    the one the batch holds: only that one is safe to read."""
    cdef _Staging *job = <_Staging *>job_
    cdef array_ptr param
    cdef PyObject *grad
    cdef PyObject *buf
    cdef int64_t i, size
    for i in range(begin, end):
        param = <array_ptr>job.params[i]
        grad = _grad_slot(<PyObject *>param)
        if grad != job.held[_dtype_of(param)][2 * i]:
            job.results[i] = -1
            continue
        job.results[i] = 0
        size = min(_size(param), _size(<array_ptr>grad))
        buf = job.buffers[i] if job.buffers != NULL else NULL
        if buf != NULL:
            size = min(size, _size(<array_ptr>buf))
        _put_entry(job, i, param, grad, buf, size)


# ------------------------------------------------------------ grad clipping

cdef class _GradLists:
    """The grads of a clipping call as pointer lists per dtype (a _Batch
    each, which also holds every array while the GIL is released), and where
    each came from in the caller's list."""
    cdef _Batch f32
    cdef _Batch f64
    cdef list positions32
    cdef list positions64

    def __cinit__(self, list grads, list positions, bint writable):
        if len(positions) != len(grads):
            raise ValueError(f"got {len(grads)} grads and {len(positions)} positions")
        self.f32, self.f64 = _Batch(), _Batch()
        self.positions32, self.positions64 = [], []
        self.f32.reserve(len(grads))
        self.f64.reserve(len(grads))
        cdef Py_ssize_t i
        for i in range(len(grads)):
            grad, where = grads[i], positions[i]
            _check_float_array(grad, "grad", -1, where, writable)
            if not (cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>grad)
                    or cnp.PyArray_IS_F_CONTIGUOUS(<cnp.ndarray>grad)):
                raise ValueError(f"{_where(-1, where)}: grad must be contiguous "
                                 f"(C or Fortran order)")
            if cnp.PyArray_TYPE(<cnp.ndarray>grad) == cnp.NPY_FLOAT32:
                self.f32.add(<PyObject *>grad, <PyObject *>grad, NULL,
                              _size(<array_ptr>grad), False, False)
                self.positions32.append(i)
            else:
                self.f64.add(<PyObject *>grad, <PyObject *>grad, NULL,
                              _size(<array_ptr>grad), False, False)
                self.positions64.append(i)


def grad_norms(list grads, list positions, double p):
    """The p-norm of each grad, in double (positions name them in errors)."""
    cdef _GradLists lists = _GradLists(grads, positions, False)
    cdef cnp.ndarray[double] norms32 = np.empty(lists.f32.count)
    cdef cnp.ndarray[double] norms64 = np.empty(lists.f64.count)
    cdef const fastsgd_impl *impl = _impl
    with nogil:
        fastsgd_norms(impl, FASTSGD_F32, lists.f32.count, <const void **>lists.f32.params,
                      lists.f32.sizes, p, <double *>cnp.PyArray_DATA(norms32))
        fastsgd_norms(impl, FASTSGD_F64, lists.f64.count, <const void **>lists.f64.params,
                      lists.f64.sizes, p, <double *>cnp.PyArray_DATA(norms64))
    norms = np.empty(len(grads))
    norms[lists.positions32] = norms32
    norms[lists.positions64] = norms64
    return norms


def scale_grads(list grads, list positions, double coef):
    """grad *= coef for every grad, coef rounded to each grad's dtype."""
    cdef _GradLists lists = _GradLists(grads, positions, True)
    cdef const fastsgd_impl *impl = _impl
    with nogil:
        fastsgd_scale(impl, FASTSGD_F32, lists.f32.count, lists.f32.params, lists.f32.sizes, coef)
        fastsgd_scale(impl, FASTSGD_F64, lists.f64.count, lists.f64.params, lists.f64.sizes, coef)


def clamp_grads(list grads, list positions, double lo, double hi):
    """grad = clamp(grad, lo, hi) for every grad."""
    cdef _GradLists lists = _GradLists(grads, positions, True)
    cdef const fastsgd_impl *impl = _impl
    with nogil:
        fastsgd_clamp(impl, FASTSGD_F32, lists.f32.count, lists.f32.params, lists.f32.sizes,
                      lo, hi)
        fastsgd_clamp(impl, FASTSGD_F64, lists.f64.count, lists.f64.params, lists.f64.sizes,
                      lo, hi)
