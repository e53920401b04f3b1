# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""torch tensors on fastsgd's kernel: TensorStepper steps the param_groups of
a fastsgd.torch.SGD in place.

Nothing here is compiled against torch.  It reads each tensor through
DLPack's C exchange API, which torch (2.10 and later) offers as the capsule
torch.Tensor.__dlpack_c_exchange_api__: one C call fills a tensor's data
pointer, dtype, device, shape and strides, allocating nothing.  Under an
older torch the same reads go through torch's Python API (data_ptr(),
dtype, shape, stride()), one call each.  Every group is checked and its
pointer lists built before any memory is written; then one native call per
group and dtype runs without the GIL.  What a step must re-read is what can
change between steps without the optimizer seeing it: every grad (torch sets
new grad tensors every step), each parameter's data pointer and layout, and
the momentum buffers in the state.

Why each grad's dtype, shape and strides are read on every step, though
torch checked dtype and shape when the grad was assigned: `grad.data = x`
and in-place ops (`t_()`, `resize_()`, `set_()`) change them afterwards,
`.data =` without bumping any version counter, and torch's grad setter takes
any strides (an expand()ed grad holds fewer elements than it has); a step
reading a grad unchecked could read past its memory.  DLPack does not carry
torch's negative bit (torch.imag of a conjugate is a lazily negated view), so
each grad's is_neg() is read too.

A parameter that is not contiguous but fills one block of memory (a
transpose, channels_last) steps on the pointer lists too, flat, when its grad
and buffer have its strides (autograd lays grads out so, torch's step makes
buffers so).  Any other non-contiguous tensor goes through
the numpy path's staging (_Group.stage_strided).
"""
import operator
import threading

import torch

import importlib

cimport numpy as cnp
from cpython.dict cimport PyDict_Check, PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, int64_t, intptr_t, uint8_t, uint16_t, uint32_t, uint64_t

from fastsgd._native cimport kernels
from fastsgd._native.batch cimport Batch, grow
from fastsgd._native.kernels cimport (FASTSGD_BF16, FASTSGD_F16, FASTSGD_F32, FASTSGD_F64,
                                      FASTSGD_NDTYPES, fastsgd_impl, fastsgd_tensor_list)
from fastsgd._native.plan cimport GroupPlan
from fastsgd._native.rules cimport (check_step_alphas, check_tensor, flag_option, option,
                                    read_hyper, sharing, sharing_reason, where)

from fastsgd._tensor_iterator import first_buffer_strides, non_overlapping_and_dense

cnp.import_array()  # for rules.pxd's option readers

cdef extern from *:
    """
    /* d[key] (borrowed, or NULL) for a key whose hash is known, without
       calling the key's __hash__; Pythons without the call hash it. */
    static PyObject *fastsgd_get_known_hash(PyObject *d, PyObject *key, Py_hash_t hash) {
    #if PY_VERSION_HEX < 0x030E0000
        PyObject *found = _PyDict_GetItem_KnownHash(d, key, hash);
        if (found == NULL) PyErr_Clear();
        return found;
    #else
        (void)hash;
        return PyDict_GetItem(d, key);
    #endif
    }
    /* whether o's type finds attributes the default way */
    static int fastsgd_generic_getattr(PyObject *o) {
        return Py_TYPE(o)->tp_getattro == PyObject_GenericGetAttr;
    }
    """
    PyObject *fastsgd_get_known_hash(object d, object key, Py_hash_t hash)
    bint fastsgd_generic_getattr(object o)

# The momentum buffers the adapter allocates ask for transparent huge pages,
# as numpy asks for its arrays of 4 MiB and more and torch's allocator does
# not (unless THP_MEM_ALLOC_ENABLE=1): a buffer on 4 KiB pages costs a step
# TLB misses that fastsgd.SGD's numpy buffer does not.
cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* numpy's rule (indicate_hugepages in its allocator): the pages from
       the first whole one on, for 4 MiB and more; advice only, so a
       refusal changes nothing. */
    static void fastsgd_advise_huge_pages(void *data, size_t nbytes) {
    #if defined(MADV_HUGEPAGE)
        if (nbytes >= ((size_t)1 << 22)) {
            uintptr_t offset = 4096u - (uintptr_t)data % 4096u;
            (void)madvise((char *)data + offset, nbytes - offset, MADV_HUGEPAGE);
        }
    #else
        (void)data; (void)nbytes;
    #endif
    }
    """
    void fastsgd_advise_huge_pages(void *data, size_t nbytes) nogil

ctypedef object (*_noargs)(object, PyObject *)

cdef extern from "Python.h":
    ctypedef object (*getter)(object, void *)
    ctypedef struct PyGetSetDef:
        getter get
        void *closure
    ctypedef struct PyGetSetDescrObject:
        PyGetSetDef *d_getset
    ctypedef struct PyMethodDef:
        void *ml_meth
        int ml_flags
    ctypedef struct PyMethodDescrObject:
        PyMethodDef *d_method
    enum:
        METH_NOARGS

# DLPack's C structures (dlpack.h, major version 1) that its C exchange API
# fills: a tensor's view, valid while the tensor lives unchanged
cdef extern from *:
    """
    typedef struct { int32_t device_type; int32_t device_id; } fastsgd_dl_device;
    typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } fastsgd_dl_dtype;
    typedef struct {
        void *data;
        fastsgd_dl_device device;
        int32_t ndim;
        fastsgd_dl_dtype dtype;
        int64_t *shape;
        int64_t *strides;
        uint64_t byte_offset;
    } fastsgd_dl_tensor;
    typedef struct { uint32_t major; uint32_t minor; } fastsgd_dl_version;
    typedef struct fastsgd_dl_api_header {
        fastsgd_dl_version version;
        struct fastsgd_dl_api_header *prev_api;
    } fastsgd_dl_api_header;
    typedef struct {
        fastsgd_dl_api_header header;
        void *managed_tensor_allocator;
        void *managed_tensor_from_py_object_no_sync;
        void *managed_tensor_to_py_object_no_sync;
        int (*dltensor_from_py_object_no_sync)(void *py_object, fastsgd_dl_tensor *out);
        void *current_work_stream;
    } fastsgd_dl_exchange_api;
    """
    ctypedef struct fastsgd_dl_device:
        int32_t device_type
    ctypedef struct fastsgd_dl_dtype:
        uint8_t code
        uint8_t bits
        uint16_t lanes
    ctypedef struct fastsgd_dl_tensor:
        void *data
        fastsgd_dl_device device
        int32_t ndim
        fastsgd_dl_dtype dtype
        int64_t *shape
        int64_t *strides
        uint64_t byte_offset
    ctypedef struct fastsgd_dl_version:
        uint32_t major
        uint32_t minor
    ctypedef struct fastsgd_dl_api_header:
        fastsgd_dl_version version
        fastsgd_dl_api_header *prev_api
    ctypedef struct fastsgd_dl_exchange_api:
        fastsgd_dl_api_header header
        # (a Python exception set when it fails)
        int (*dltensor_from_py_object_no_sync)(void *py_object, fastsgd_dl_tensor *out) except -1

cdef enum:
    _PARAM_IS_INFERENCE = 1
    _BUFFER_IS_INFERENCE = 2

cdef enum:
    _DL_CPU = 1  # kDLCPU
    _DL_FLOAT = 2  # kDLFloat
    _DL_BFLOAT = 4  # kDLBfloat


cdef const fastsgd_dl_exchange_api *_exchange_api():
    """torch's DLPack C exchange API, or NULL if this torch has none."""
    capsule = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
    if not PyCapsule_IsValid(capsule, "dlpack_exchange_api"):
        return NULL
    cdef fastsgd_dl_api_header *header = <fastsgd_dl_api_header *>PyCapsule_GetPointer(
        capsule, "dlpack_exchange_api")
    while header != NULL and header.version.major > 1:  # newer ones link older ones
        header = header.prev_api
    # dltensor_from_py_object_no_sync came with 1.2 (the capsule with 1.3)
    if header == NULL or header.version.major != 1 or header.version.minor < 2:
        return NULL
    cdef const fastsgd_dl_exchange_api *api = <fastsgd_dl_exchange_api *>header
    return api if api.dltensor_from_py_object_no_sync != NULL else NULL


cdef const fastsgd_dl_exchange_api *_EXCHANGE = _exchange_api()

# the kernel's dtype code of each torch dtype it steps
_DTYPE_CODES = {torch.float32: FASTSGD_F32, torch.float64: FASTSGD_F64,
                torch.float16: FASTSGD_F16, torch.bfloat16: FASTSGD_BF16}
cdef int64_t[4] _ITEMSIZES = [4, 8, 2, 2]  # by kernel code
# their DLPack dtypes, (code, bits), by kernel code
cdef uint8_t[4][2] _DL_DTYPES = [[_DL_FLOAT, 32], [_DL_FLOAT, 64], [_DL_FLOAT, 16],
                                 [_DL_BFLOAT, 16]]
_STRIDED = torch.strided
_Tensor = torch.Tensor
_empty_like = torch.empty_like
_increment_version = torch.autograd.graph.increment_version
_inference_mode_enabled = torch.is_inference_mode_enabled
# torch's Tensor.__hash__ is Python code returning id(self): 150 ns a call, the
# price of each optimizer.state[p].  A parameter whose type still hashes with
# it is looked up with that hash known (its address, as id() and hash() make
# it), which finds the same entry without running it.
_TENSOR_HASH = _Tensor.__hash__
_probe = _Tensor()
if hash(_probe) != <Py_hash_t><intptr_t><PyObject *>_probe:
    _TENSOR_HASH = object()  # another torch's hash: every lookup hashes
del _probe


# p.grad and grad.is_neg() are torch's C functions called through Python's
# attribute lookup, which costs as much again.  For a tensor whose type
# resolves these names to TensorBase's own getter and method (checked per
# type, each step), _Reads calls them directly: the same C functions on the
# same objects, without the lookup.
cdef object _BASE = torch._C.TensorBase
cdef PyGetSetDef *_GRAD = (<PyGetSetDescrObject *>_BASE.__dict__["grad"]).d_getset
cdef PyMethodDef *_IS_NEG = (<PyMethodDescrObject *>_BASE.__dict__["is_neg"]).d_method
_DIRECT_NAMES = ("grad", "is_neg")
cdef bint _DIRECT_OK = _IS_NEG.ml_flags == METH_NOARGS


cdef bint _reads_directly(object t):
    """Whether t's type resolves every name _Reads calls to TensorBase's own."""
    cls = type(t)
    if not _DIRECT_OK or not fastsgd_generic_getattr(t):
        return False
    for name in _DIRECT_NAMES:
        if getattr(cls, name, None) is not _BASE.__dict__[name]:
            return False
    return True


cdef class _Reads:
    """t.grad and t.is_neg() of tensors, called directly for the types that
    allow it (see above), and their views (see view)."""
    cdef PyTypeObject *direct[2]  # types checked this step
    cdef bint use_api  # views through the exchange API (when torch has one)
    # without it, the views' shapes and strides, per slot
    cdef int64_t *dims[2]
    cdef Py_ssize_t capacity[2]

    def __cinit__(self):
        self.use_api = _EXCHANGE != NULL

    def __dealloc__(self):
        PyMem_Free(self.dims[0])
        PyMem_Free(self.dims[1])

    cdef inline void forget(self) noexcept:
        self.direct[0] = self.direct[1] = NULL

    cdef inline bint is_direct(self, object t):
        cdef PyTypeObject *cls = Py_TYPE(t)
        if cls == self.direct[0] or cls == self.direct[1]:
            return True
        if not _reads_directly(t):
            return False
        self.direct[1] = self.direct[0]
        self.direct[0] = cls
        return True

    cdef inline object grad(self, object t):
        return _GRAD.get(t, _GRAD.closure) if self.is_direct(t) else t.grad

    cdef inline bint is_neg(self, object t) except -1:
        if self.is_direct(t):
            return (<_noargs>_IS_NEG.ml_meth)(t, NULL)
        return t.is_neg()

    cdef int view(self, object t, fastsgd_dl_tensor *out, int slot) except -1:
        """Fill out with t's data pointer, dtype, device, shape and strides
        (DLPack's view, what torch's C++ ops see; raises if t is not a tensor
        with memory).  Without the exchange API they are read through the
        Python API, the shape and strides kept in slot (0 or 1) until the next
        view in it."""
        if self.use_api:
            return _EXCHANGE.dltensor_from_py_object_no_sync(<PyObject *>t, out)
        shape = tuple(t.shape)
        strides = t.stride()
        cdef Py_ssize_t k, ndim = len(shape)
        if ndim > self.capacity[slot]:
            self.dims[slot] = <int64_t *>grow(self.dims[slot], 2 * ndim * sizeof(int64_t))
            self.capacity[slot] = ndim
        out.shape = self.dims[slot]
        out.strides = self.dims[slot] + ndim
        for k in range(ndim):
            out.shape[k] = shape[k]
            out.strides[k] = strides[k]
        out.ndim = <int32_t>ndim
        code = _DTYPE_CODES.get(t.dtype, -1)
        out.dtype.code = _DL_DTYPES[code][0] if code >= 0 else 0
        out.dtype.bits = _DL_DTYPES[code][1] if code >= 0 else 0
        out.dtype.lanes = 1
        out.device.device_type = _DL_CPU if t.is_cpu else 0
        out.data = <void *><intptr_t>t.data_ptr()
        out.byte_offset = 0
        return 0


cdef _Reads _reads = _Reads()


def _set_exchange_api(bint enabled):
    """Read views through DLPack's exchange API (True, when torch has one) or
    through torch's Python API (False), for the tests of both; returns
    whether the exchange API is now used."""
    _reads.use_api = enabled and _EXCHANGE != NULL
    return _reads.use_api


cdef bint _view_matches(const fastsgd_dl_tensor *v, int code, tuple shape,
                        object strides) except -1:
    """Whether view v is a CPU tensor of kernel dtype code and this shape, with
    these strides (a tuple) or, for strides None, contiguous as torch's
    is_contiguous() says (size-1 dimensions' strides left out)."""
    if (v.device.device_type != _DL_CPU or v.dtype.code != _DL_DTYPES[code][0]
            or v.dtype.bits != _DL_DTYPES[code][1] or v.dtype.lanes != 1
            or v.ndim != PyTuple_GET_SIZE(shape) or v.strides == NULL):
        return False
    cdef Py_ssize_t k
    cdef int64_t size, expected = 1
    cdef bint empty = False
    for k in range(v.ndim):
        size = <object>PyTuple_GET_ITEM(shape, k)
        if v.shape[k] != size:
            return False
        empty |= size == 0
    if strides is not None:
        for k in range(v.ndim):
            if v.strides[k] != <int64_t><object>PyTuple_GET_ITEM(strides, k):
                return False
        return True
    if empty:
        return True
    for k in reversed(range(v.ndim)):
        if v.shape[k] != 1:
            if v.strides[k] != expected:
                return False
            expected *= v.shape[k]
    return True

UNSUPPORTED_DTYPE = ("fastsgd.torch.SGD steps float32, float64, float16 and bfloat16 "
                     "parameters")


cdef object _numpy_view(object t, str name):
    """A numpy array viewing t's memory, strides included (bfloat16 as
    ml_dtypes', which torch's .numpy() does not know); name: t's parameter."""
    if t.dtype is not torch.bfloat16:
        return t.detach().numpy()
    try:  # (importlib: Cython's import takes a None in sys.modules for a module)
        ml_dtypes = importlib.import_module("ml_dtypes")
    except ImportError:
        raise RuntimeError(f"{name}: fastsgd.torch.SGD steps a non-contiguous bfloat16 tensor "
                           f"through a numpy view, which needs ml_dtypes: pip install "
                           f"ml_dtypes") from None
    return t.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


cdef int _check_param(object p, str name) except -1:
    """The rules of a parameter: a dense CPU tensor of a kernel dtype."""
    if not isinstance(p, _Tensor):
        raise TypeError(f"{name}: optimizer can only optimize Tensors, but got "
                        f"{type(p).__name__}")
    if p.layout is not _STRIDED:
        raise RuntimeError(f"{name}: fastsgd.torch.SGD steps dense (strided) tensors, "
                           f"but the parameter's layout is {p.layout}")
    if not p.is_cpu:
        raise RuntimeError(f"{name}: fastsgd.torch.SGD steps CPU tensors, but the "
                           f"parameter is on {p.device}; use torch.optim.SGD for it")
    if p.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name}: {UNSUPPORTED_DTYPE}, but the parameter is {p.dtype}")
    _check_not_negated(p, name, "the parameter")
    return 0


cdef int _check_not_negated(object t, str name, str what) except -1:
    """Refuse a tensor the step writes that is a lazily negated view (its
    negative bit set, as torch.imag of a conjugate): its memory holds the
    negated values, which the kernel would update as they are stored."""
    if t.is_neg():
        raise RuntimeError(f"{name}: {what} has its negative bit set (a lazily negated "
                           f"view): fastsgd.torch.SGD writes memory as stored; step "
                           f"its resolve_neg() instead")
    return 0


cdef int _check_like(object p, object t, str name, str what) except -1:
    """The rules of a grad or buffer t of parameter p: a dense CPU tensor of
    p's dtype and shape."""
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name}: its {what} must be a Tensor, but got {type(t).__name__}")
    if t.layout is not _STRIDED:
        raise RuntimeError(f"{name}: its {what} is {t.layout}: fastsgd.torch.SGD steps "
                           f"dense grads only; use torch.optim.SGD for sparse grads")
    if not t.is_cpu:
        raise RuntimeError(f"{name}: its {what} is on {t.device}, the parameter on {p.device}")
    if t.dtype is not p.dtype:
        raise TypeError(f"{name}: its {what} is {t.dtype}, the parameter {p.dtype}")
    if t.shape != p.shape:
        raise RuntimeError(f"{name}: its {what} has shape {tuple(t.shape)}, the parameter "
                           f"{tuple(p.shape)}")
    return 0


cdef object _dense_strides(object t):
    """t's strides if its elements fill one block of memory, in any order of
    dimensions (a transpose, channels_last), else None.  Stepped flat, such a
    tensor needs its grad and buffer in the same strides, and no copies."""
    strides = t.stride()
    return strides if non_overlapping_and_dense(tuple(t.shape), strides) else None


cdef tuple _extent(object t):
    """The bytes t's elements occupy, (start, end) (torch strides are not
    negative)."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    reach = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        reach += stride * (size - 1) * t.element_size()
    return start, start + reach


cdef class _Group:
    """One parameter group: its cached parameters (with their data pointer,
    size, dtype and shape, checked) and buffers, this step's lists, and the
    tensors it stages."""
    cdef object params_list  # the group's list the cache was built from
    cdef tuple params
    cdef list shapes
    cdef list param_strides  # per parameter: its strides when checked
    cdef list buffers  # the buffer last checked, per parameter (or None)
    # per parameter, the storage of its buffer when checked: the cached data
    # pointer stays valid memory whatever is done to the buffer tensor since
    # (`buf.data = x`, resize_()), which no step re-reads
    cdef list buffer_storages
    cdef int64_t *data  # per parameter: data pointer when checked (0: not checked)
    cdef int64_t *buffer_data  # per parameter: its buffer's data pointer when checked
    cdef uint8_t *in_spans  # per parameter: in the stepper's spans
    cdef int64_t *sizes
    cdef int *codes
    cdef Py_ssize_t capacity
    cdef tuple lists  # a Batch per kernel dtype: this step's pointer lists
    cdef kernels.fastsgd_sgd_hyper hyper
    cdef bint with_momentum
    # this step's grads (start, end, position) to check against the parameters'
    # and buffers' memory once every group is read
    cdef int64_t *grad_spans
    cdef list grads  # this step's grads, which the lists point into, held until it ends
    cdef list stepped  # the parameters this step writes
    cdef list new_buffers  # [(parameter, buffer)] it creates
    cdef uint8_t *strided  # per parameter: not contiguous when checked
    # per parameter: _PARAM_IS_INFERENCE, _BUFFER_IS_INFERENCE when checked
    cdef uint8_t *inference
    # per parameter: its strides when it is not contiguous but dense (its grad
    # and buffer in the same strides step flat, on the lists), else None
    cdef list dense_strides
    # this step's tensors stepped through contiguous copies, [(position,
    # parameter, grad, buffer or None)], and the numpy path's plan that stages
    # them (plan.pyx: the copies are kept across steps)
    cdef list staged
    cdef GroupPlan plan
    cdef dict options  # the group, for the plan
    cdef list staged_new_buffers  # [(torch buffer, its position in staged)] they create

    def __cinit__(self):
        self.lists = tuple(Batch() for _ in range(FASTSGD_NDTYPES))
        self.staged = []
        self.staged_new_buffers = []

    def __dealloc__(self):
        PyMem_Free(self.data)
        PyMem_Free(self.buffer_data)
        PyMem_Free(self.in_spans)
        PyMem_Free(self.sizes)
        PyMem_Free(self.codes)
        PyMem_Free(self.grad_spans)
        PyMem_Free(self.strided)
        PyMem_Free(self.inference)

    cdef bint cache_holds(self, list params):
        if params is not self.params_list or PyList_GET_SIZE(params) != len(self.params):
            return False
        cdef Py_ssize_t i
        for i in range(PyList_GET_SIZE(params)):
            if PyList_GET_ITEM(params, i) != PyTuple_GET_ITEM(self.params, i):
                return False
        return True

    cdef int rebuild(self, list params) except -1:
        cdef Py_ssize_t n = len(params)
        self.params_list = None
        if n > self.capacity:
            self.data = <int64_t *>grow(self.data, n * sizeof(int64_t))
            self.buffer_data = <int64_t *>grow(self.buffer_data, n * sizeof(int64_t))
            self.in_spans = <uint8_t *>grow(self.in_spans, n * sizeof(uint8_t))
            self.sizes = <int64_t *>grow(self.sizes, n * sizeof(int64_t))
            self.codes = <int *>grow(self.codes, n * sizeof(int))
            self.grad_spans = <int64_t *>grow(self.grad_spans, 3 * n * sizeof(int64_t))
            self.strided = <uint8_t *>grow(self.strided, n * sizeof(uint8_t))
            self.inference = <uint8_t *>grow(self.inference, n * sizeof(uint8_t))
            self.capacity = n
        cdef Py_ssize_t i
        for i in range(n):
            self.data[i] = 0
            self.in_spans[i] = False
            self.strided[i] = False
            self.inference[i] = 0
        self.params = tuple(params)
        self.shapes = [None] * n
        self.param_strides = [None] * n
        self.buffers = [None] * n
        self.buffer_storages = [None] * n
        self.dense_strides = [None] * n
        for lists in self.lists:
            (<Batch>lists).reserve(n)
        self.params_list = params
        return 0

    cdef bint read_param(self, Py_ssize_t i, object p, Py_ssize_t g) except -1:
        """Check parameter i and cache what was checked.  True: its memory
        moved since the last check."""
        _check_param(p, where(g, i))
        self.codes[i] = _DTYPE_CODES[p.dtype]
        self.sizes[i] = p.numel()
        self.shapes[i] = tuple(p.shape)
        self.param_strides[i] = p.stride()
        self.strided[i] = not p.is_contiguous()
        self.dense_strides[i] = _dense_strides(p) if self.strided[i] else None
        self.buffers[i] = None  # its layout is checked again against the parameter's
        self.inference[i] = _PARAM_IS_INFERENCE if p.is_inference() else 0
        cdef int64_t data = p.data_ptr()
        cdef bint moved = self.data[i] != data
        self.data[i] = data
        return moved

    cdef bint param_holds(self, Py_ssize_t i, object p) except -1:
        """Whether parameter i is as last checked: its memory, dtype and
        layout (its negative bit, which no view shows, is read with them)."""
        cdef fastsgd_dl_tensor view
        if self.data[i] == 0:
            return False
        try:
            _reads.view(p, &view, 0)
        except Exception:
            return False  # read_param says why
        return (<int64_t>view.data + <int64_t>view.byte_offset == self.data[i]
                and _view_matches(&view, self.codes[i], self.shapes[i],
                                  <object>PyList_GET_ITEM(self.param_strides, i)))

    cdef int64_t grad_data(self, Py_ssize_t i, object grad) except? -1:
        """The data pointer of grad if it steps flat with parameter i as
        checked (a CPU tensor of its dtype and shape, contiguous or in its
        dense strides, not negated), else 0: the slow path reads it afresh."""
        cdef fastsgd_dl_tensor view
        strides = None
        if self.strided[i]:
            strides = <object>PyList_GET_ITEM(self.dense_strides, i)
            if strides is None:
                return 0  # staged
        try:
            _reads.view(grad, &view, 1)
            if (not _view_matches(&view, self.codes[i], <tuple>PyList_GET_ITEM(self.shapes, i),
                                  strides)
                    or _reads.is_neg(grad)):
                return 0
        except Exception:
            return 0  # not a tensor with memory: the slow path says why
        return <int64_t>view.data + <int64_t>view.byte_offset

    cdef int prepare(self, dict group, object state, Py_ssize_t g, bint *moved) except -1:
        """Check the group's every tensor and fill its lists; sets *moved when
        a parameter's or buffer's memory is not where it was last checked."""
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            _check_tensor_option(group, key, g)
        read_hyper(group, g, &self.hyper)
        if flag_option(group, "differentiable", g):
            raise RuntimeError(DIFFERENTIABLE)
        if group.get("fused"):
            raise RuntimeError(FUSED)
        self.with_momentum = self.hyper.momentum != 0.0
        if self.with_momentum and not PyDict_Check(state):
            raise TypeError(f"optimizer.state must be a dict, but got {type(state).__name__}")
        params = option(group, "params", g)
        if type(params) is not list:
            raise TypeError(f"param_groups[{g}]['params'] must be a list, but got "
                            f"{type(params).__name__}")
        if not self.cache_holds(params):
            self.rebuild(params)
            moved[0] = True
        cdef Py_ssize_t i, k = 0, n = PyTuple_GET_SIZE(self.params)
        cdef int code, d, in_use = 0, later = 0
        cdef int64_t gdata = 0
        cdef Batch lists
        cdef void *buf_data
        cdef PyObject *found
        cdef PyTypeObject *id_hashed = NULL  # a type checked to hash as Tensor does
        cdef bint buf_is_new, buf_cached
        self.grads = []
        self.stepped = []
        self.new_buffers = []
        self.staged = []
        self.options = group
        for lists in self.lists:
            lists.clear()
        for i in range(n):
            p = <object>PyTuple_GET_ITEM(self.params, i)
            grad = _reads.grad(p)
            if grad is None:
                continue
            if not self.param_holds(i, p):
                moved[0] |= self.read_param(i, p, g)
            moved[0] |= not self.in_spans[i]
            gdata = self.grad_data(i, grad)
            staged = False
            strides = <object>PyList_GET_ITEM(self.dense_strides, i)
            if gdata == 0:
                # off the fast path (or empty): checked and read afresh (the
                # parameter is as cached: param_holds compared its whole view)
                _check_like(p, grad, where(g, i), "grad")
                if grad.is_neg():
                    grad = grad.resolve_neg()  # read as torch's ops read it
                gdata = grad.data_ptr()
                staged = not _laid_out(grad, self.strided[i], strides)
            buf = None
            buf_cached = False
            if self.with_momentum:
                if (Py_TYPE(p) == id_hashed
                        or getattr(type(p), "__hash__", None) is _TENSOR_HASH):
                    id_hashed = Py_TYPE(p)
                    found = fastsgd_get_known_hash(state, p, <Py_hash_t><intptr_t><PyObject *>p)
                else:
                    found = PyDict_GetItem(state, p)
                if found != NULL:
                    param_state = <object>found
                    if not PyDict_Check(param_state):
                        raise TypeError(f"{where(g, i)}: optimizer.state of the parameter "
                                        f"must be a dict, but got {type(param_state).__name__}")
                    found = PyDict_GetItem(param_state, "momentum_buffer")
                    # the buffer checked before, its memory held: not touched
                    buf_cached = (found != NULL and found == PyList_GET_ITEM(self.buffers, i)
                                  and not staged)
                    if found != NULL and not buf_cached:
                        buf = <object>found
                if buf is not None and <PyObject *>buf != PyList_GET_ITEM(self.buffers, i):
                    _check_like(p, buf, where(g, i), "momentum buffer")
                    _check_not_negated(buf, where(g, i), "its momentum buffer")
                    self.inference[i] = (self.inference[i] & _PARAM_IS_INFERENCE
                                         | (_BUFFER_IS_INFERENCE if buf.is_inference() else 0))
                    if staged or not _laid_out(buf, self.strided[i], strides):
                        staged = True
                        self.buffers[i] = None  # checked afresh while staged
                    else:
                        self.buffers[i] = buf
                        self.buffer_storages[i] = buf.untyped_storage()
                        self.buffer_data[i] = buf.data_ptr()
                        buf_cached = True
                        moved[0] = True
            if self.inference[i]:
                self.check_inference(i, g, buf_cached or buf is not None)
            if staged:
                self.staged.append((i, p, grad, buf))
                self.stepped.append(p)
                in_use |= 1 << self.codes[i]
                if buf is not None:
                    later |= 1 << self.codes[i]
                moved[0] = True  # its memory is checked afresh each step
                continue
            code = self.codes[i]
            self.grad_spans[3 * k] = gdata
            self.grad_spans[3 * k + 1] = gdata + self.sizes[i] * _ITEMSIZES[code]
            self.grad_spans[3 * k + 2] = i
            k += 1
            buf_is_new = False
            buf_data = NULL
            if self.with_momentum:
                if buf_cached:
                    later |= 1 << code
                    buf_data = <void *>self.buffer_data[i]
                else:
                    # torch: buf = grad.detach().clone(); the kernel fills it
                    buf = _empty_like(grad, requires_grad=False)
                    buf_is_new = True
                    self.new_buffers.append((p, buf))
                    buf_data = <void *><int64_t>buf.data_ptr()
                    fastsgd_advise_huge_pages(buf_data, self.sizes[i] * _ITEMSIZES[code])
            # (the memory is held: parameters by the group, grads in self.grads,
            # buffers by their storages or in self.new_buffers)
            (<Batch>PyTuple_GET_ITEM(self.lists, code)).add_data(
                <void *>self.data[i], <const void *>gdata, buf_data, self.sizes[i], buf_is_new)
            in_use |= 1 << code
            self.grads.append(grad)
            self.stepped.append(p)
        for d in (FASTSGD_F32, FASTSGD_F16, FASTSGD_BF16):  # float64 takes any double
            if in_use & (1 << d):
                check_step_alphas(&self.hyper, d, self.with_momentum, (later >> d) & 1, g)
        return 0

    cdef int check_inference(self, Py_ssize_t i, Py_ssize_t g, bint buffer_written) except -1:
        """torch's rule for in-place updates, checked before any write: an
        inference tensor (made under torch.inference_mode) is written only in
        that mode (torch's step raises once it has written it)."""
        if _inference_mode_enabled():
            return 0
        if self.inference[i] & _PARAM_IS_INFERENCE:
            raise RuntimeError(f"{where(g, i)}: the parameter is an inference tensor: "
                               f"{_INFERENCE_UPDATE}")
        if buffer_written and self.inference[i] & _BUFFER_IS_INFERENCE:
            raise RuntimeError(f"{where(g, i)}: its momentum buffer is an inference tensor: "
                               f"{_INFERENCE_UPDATE}")
        return 0

    cdef void run(self) noexcept:
        cdef const fastsgd_impl *impl = kernels.kernel()
        cdef fastsgd_tensor_list lst[FASTSGD_NDTYPES]
        cdef int d
        for d in range(FASTSGD_NDTYPES):
            lst[d] = (<Batch>PyTuple_GET_ITEM(self.lists, d)).as_list(self.with_momentum)
        with nogil:
            for d in range(FASTSGD_NDTYPES):
                if lst[d].ntensors:
                    kernels.sgd(impl, d, &self.hyper, &lst[d], False)

    cdef int stage_strided(self, Py_ssize_t g) except -1:
        """Stage the tensors that are not contiguous as fastsgd.SGD stages
        strided numpy arrays, through numpy views of their memory: the
        numpy path's rules (written tensors that overlap themselves are
        refused) and copies.  Run once every group's memory is checked, so
        that no two tensors of the step share memory."""
        if not self.staged:
            return 0
        if self.plan is None:
            self.plan = GroupPlan()
        params, grads, buffers = [], [], []
        del self.staged_new_buffers[:]
        for k, (i, p, grad, buf) in enumerate(self.staged):
            arrays = (_numpy_view(p, where(g, i)), _numpy_view(grad, where(g, i)),
                      _numpy_view(buf, where(g, i)) if buf is not None else None)
            try:
                check_tensor(arrays[0], arrays[1], arrays[2], g, i)
            except ValueError as error:
                raise RuntimeError(str(error)) from None
            params.append(arrays[0])
            grads.append(arrays[1])
            buffers.append(arrays[2])
            if self.with_momentum and buf is None:
                self.staged_new_buffers.append((_new_buffer(p, grad, &self.hyper), k))
        self.plan.prepare_lists(params, grads, buffers, self.options)
        return 0

    cdef int run_staged(self) except -1:
        if self.staged:
            self.plan.gather()
            self.plan.run(False, 1.0)
            self.plan.scatter()
            self.plan.clear_batches()
        return 0

    cdef int bump_versions(self) except -1:
        """Bump the version counters of the parameters this step writes, as
        torch's in-place add_ does: autograd checks them when a graph saved a
        parameter.  (Buffers, which no graph holds, are left: bumping them
        would cost as much again.)"""
        if self.stepped:
            _increment_version(self.stepped)
        return 0

    cdef int commit(self, object state) except -1:
        """Store the new buffers, once the step has written them."""
        for p, buf in self.new_buffers:
            state[p]["momentum_buffer"] = buf  # makes state[p], as torch's step does
        if self.staged_new_buffers:
            # the plan made numpy buffers; torch's are laid out as its step makes them
            made = {k: array for k, array in self.plan.new_buffers}
            for buf, k in self.staged_new_buffers:
                cnp.PyArray_CopyInto(_numpy_view(buf, ""), made[k])
                state[self.staged[k][1]]["momentum_buffer"] = buf
            del self.staged_new_buffers[:]
        self.grads = self.stepped = self.new_buffers = None
        self.staged = []
        return 0


DIFFERENTIABLE = ("fastsgd.torch.SGD does not support differentiable=True: use "
                  "torch.optim.SGD to differentiate through the step")
cdef str _INFERENCE_UPDATE = (
    "Inplace update to inference tensor outside InferenceMode is not allowed. You can make "
    "a clone to get a normal tensor before doing inplace update.")
FUSED = ("fastsgd.torch.SGD runs fastsgd's kernel: fused=True asks for torch's fused "
         "kernel, which torch.optim.SGD(fused=True) runs")


cdef inline bint _laid_out(object t, bint strided, object strides) except -1:
    """Whether t steps flat with its parameter: contiguous as it, or in its
    dense strides (strided, strides: the parameter's, None if not dense)."""
    if strided:
        return strides is not None and t.stride() == strides
    return t.is_contiguous()


cdef object _new_buffer(object p, object grad, const kernels.fastsgd_sgd_hyper *h):
    """An uninitialised momentum buffer laid out as torch's step makes it:
    buf = clone(d_p), d_p being -grad with maximize and adding weight_decay *
    p, each op's output laid out as fastsgd/_tensor_iterator.py models it."""
    strides = first_buffer_strides(tuple(p.shape), p.stride(), grad.stride(),
                                   maximize=h.maximize != 0, weight_decay=h.weight_decay != 0.0)
    buf = torch.empty_strided(p.shape, strides, dtype=p.dtype)
    fastsgd_advise_huge_pages(<void *><intptr_t>buf.data_ptr(),
                              buf.untyped_storage().nbytes())
    return buf


cdef int _check_tensor_option(dict group, str key, Py_ssize_t g) except -1:
    """torch's rules for an option given as a tensor; its value is then read
    as any other number's (float() of a 1-element tensor)."""
    value = option(group, key, g)
    if isinstance(value, _Tensor):
        if value.requires_grad:
            raise RuntimeError(f"param_groups[{g}]['{key}'] is a tensor that requires grad: "
                               f"{DIFFERENTIABLE}")
        if value.numel() != 1:
            raise ValueError(f"param_groups[{g}]['{key}'] must be a 1-element tensor")
    return 0


def _first_shared(spans):
    """The first two of spans [(start, end, name, strided tensor or None)]
    sharing memory, with sharing()'s answer (rules.pxd), or None.  Two spans
    that meet share memory unless one is a strided tensor's extent and
    numpy's exact test finds no element in common (interleaved views)."""
    spans = sorted((s for s in spans if s[1] > s[0]), key=_START)
    meeting = []  # the spans so far that reach past the next start
    for span in spans:
        meeting = [other for other in meeting if other[1] > span[0]]
        for other in meeting:
            shared = 1 if other[3] is None and span[3] is None else sharing(
                _span_array(other), _span_array(span))
            if shared:
                return other[2], span[2], shared
        meeting.append(span)
    return None


_START = operator.itemgetter(0)


cdef cnp.ndarray _span_array(tuple span):
    """A span's memory as numpy's overlap test takes it: the strided
    tensor's view, else its bytes (an array over them, never read)."""
    if span[3] is not None:
        return _numpy_view(span[3], span[2])
    cdef cnp.npy_intp nbytes = span[1] - span[0]
    return cnp.PyArray_SimpleNewFromData(1, &nbytes, cnp.NPY_UINT8, <void *><intptr_t>span[0])


cdef class TensorStepper:
    """Steps the param_groups of a fastsgd.torch.SGD: every group checked
    and staged before any memory is written.  Steps from several threads
    take turns."""
    cdef object lock
    cdef object holder  # the thread that holds the lock, else None
    cdef list groups
    # the parameters' and buffers' memory, sorted: (start, end) pairs
    cdef int64_t *spans
    cdef Py_ssize_t nspans
    cdef bint spans_valid  # the spans are the memory of the last step

    def __cinit__(self):
        self.groups = []
        self.lock = threading.Lock()

    def __dealloc__(self):
        PyMem_Free(self.spans)

    def step(self, list param_groups, object state):
        """One step of every group (state: the optimizer's)."""
        if not self.lock.acquire(False):
            # Python code a step runs (a grad's property, a hash) stepping the
            # same optimizer would wait for itself
            if self.holder == threading.get_ident():
                raise RuntimeError("step() called during a step of the same optimizer")
            self.lock.acquire()
        self.holder = threading.get_ident()
        try:
            self.step_locked(param_groups, state)
        finally:
            self.holder = None
            self.lock.release()

    cdef int step_locked(self, list param_groups, object state) except -1:
        cdef Py_ssize_t g, n = len(param_groups)
        cdef bint moved = not self.spans_valid or n != len(self.groups)
        while len(self.groups) < n:
            self.groups.append(_Group())
        del self.groups[n:]
        cdef _Group group
        _reads.forget()  # types are checked afresh each step
        # a refused step leaves the spans unchecked: the next one checks them
        self.spans_valid = False
        for g in range(n):
            group_dict = param_groups[g]
            if not PyDict_Check(group_dict):
                raise TypeError(f"param_groups[{g}] must be a dict, but got "
                                f"{type(group_dict).__name__}")
            (<_Group>self.groups[g]).prepare(group_dict, state, g, &moved)
        if moved:
            self.check_memory()
        self.check_grads()
        try:
            for g in range(n):
                (<_Group>self.groups[g]).stage_strided(g)
        except BaseException:
            for group in self.groups:
                if group.plan is not None:
                    group.plan.reset(0)
            raise
        self.spans_valid = True
        # Bumped before the kernels run, not after as torch's add_ does: the
        # checks have just read these tensors, which the kernels' stream
        # evicts from the cache (0.09 ms cold on ResNet-50's 161, 0.03 ms
        # here).  No check follows; only another thread, running while the
        # kernels release the GIL, could see the difference.
        for group in self.groups:
            group.bump_versions()
        for group in self.groups:
            group.run()
            group.run_staged()
        for group in self.groups:
            group.commit(state)
        return 0

    cdef int check_memory(self) except -1:
        """Refuse a parameter listed twice and parameters or buffers sharing
        memory; remember their memory for check_grads."""
        self.nspans = 0
        seen = {}
        spans = []
        cdef _Group group
        cdef Py_ssize_t g, i
        for g, group in enumerate(self.groups):
            for i, p in enumerate(group.params):
                if id(p) in seen:
                    raise ValueError(f"{where(g, i)} is {seen[id(p)]} again: "
                                     f"fastsgd.torch.SGD steps each parameter once per step")
                seen[id(p)] = where(g, i)
                group.in_spans[i] = False
            # the memory this step writes (read this step: see prepare)
            for k in range(len(group.grads)):
                i = group.grad_spans[3 * k + 2]
                group.in_spans[i] = True
                nbytes = group.sizes[i] * _ITEMSIZES[group.codes[i]]
                spans.append((group.data[i], group.data[i] + nbytes, where(g, i), None))
                if group.with_momentum and group.buffers[i] is not None:
                    spans.append((group.buffer_data[i], group.buffer_data[i] + nbytes,
                                  f"the momentum buffer of {where(g, i)}", None))
            for i, p, _grad, buf in group.staged:
                # their extents, each with its tensor for the exact test
                group.in_spans[i] = True
                spans.append(_extent(p) + (where(g, i), p))
                if buf is not None:
                    spans.append(_extent(buf) + (f"the momentum buffer of {where(g, i)}", buf))
        found = _first_shared(spans)
        if found is not None:
            raise RuntimeError(f"{found[0]} and {found[1]} share memory: fastsgd.torch.SGD "
                               f"steps tensors that share no memory{sharing_reason(found[2])}")
        # for check_grads' search: their union, as disjoint sorted spans
        bounds = sorted((span[0], span[1]) for span in spans if span[1] > span[0])
        self.spans = <int64_t *>grow(self.spans, (2 * len(bounds) + 2) * sizeof(int64_t))
        self.nspans = 0
        cdef int64_t start, end
        for start, end in bounds:
            if self.nspans and start < self.spans[2 * self.nspans - 1]:
                self.spans[2 * self.nspans - 1] = max(self.spans[2 * self.nspans - 1], end)
            else:
                self.spans[2 * self.nspans] = start
                self.spans[2 * self.nspans + 1] = end
                self.nspans += 1
        return 0

    cdef int check_grads(self) except -1:
        """Refuse a grad sharing memory with a parameter or buffer: the kernel
        would read it while another tensor's update writes it."""
        cdef _Group group
        cdef Py_ssize_t g, k
        for g, group in enumerate(self.groups):
            for k in range(len(group.grads)):
                self.check_grad(group.grad_spans[3 * k], group.grad_spans[3 * k + 1], g,
                                group.grad_spans[3 * k + 2])
            for i, _param, grad, _buf in group.staged:
                start, end = _extent(grad)
                self.check_grad(start, end, g, i, grad)
        return 0

    cdef int check_grad(self, int64_t start, int64_t end, Py_ssize_t g,
                        Py_ssize_t i, object grad=None) except -1:
        """grad: the grad tensor when it is staged (numpy's exact test then
        decides whether its elements meet another tensor's), else None."""
        if end <= start:
            return 0
        # the first span ending after start
        cdef Py_ssize_t lo = 0, hi = self.nspans, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self.spans[2 * mid + 1] <= start:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.nspans and self.spans[2 * lo] < end:
            # the spans may be stale (a parameter without grad moved), and a
            # strided tensor's extent has holes: read afresh, test exactly
            name = where(g, i)
            grad_span = (start, end, name, grad)
            for span in self.spans_now(name):
                shared = (span[0] < end and start < span[1]
                          and sharing(_span_array(grad_span), _span_array(span)))
                if shared:
                    raise RuntimeError(
                        f"{name}: its grad shares memory with a parameter or momentum buffer: "
                        f"fastsgd.torch.SGD steps tensors that share no memory"
                        f"{sharing_reason(shared)}")
        return 0

    cdef list spans_now(self, str name):
        """The memory this step writes, read afresh, as _first_shared's spans
        (a tensor with those that are not contiguous; name: the grad's, for
        an error in viewing them)."""
        spans = []
        cdef _Group group
        cdef Py_ssize_t k, i
        for group in self.groups:
            staged_buffers = [buf for _, _, _, buf in group.staged if buf is not None]
            for t in group.stepped + staged_buffers:
                spans.append(_extent(t) + (name, None if t.is_contiguous() else t))
            for k in range(len(group.grads)):
                i = group.grad_spans[3 * k + 2]
                if group.with_momentum and group.buffers[i] is not None:
                    # where the kernel writes it: the memory held when checked
                    start = group.buffer_data[i]
                    end = start + group.sizes[i] * _ITEMSIZES[group.codes[i]]
                    spans.append((start, end, name, None))
        return spans
