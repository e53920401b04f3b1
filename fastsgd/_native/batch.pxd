# Pointer lists: a dtype's tensors as the C driver takes them, the arrays held, the alias check.
#
# An array a step points into must keep its memory until the kernel is done: neither freed
# nor moved, while Python code the step runs (a .grad property, a hash) or another thread may
# drop every other reference to it.  Holding it is not enough: numpy's resize(refcheck=True)
# moves the memory of an array with at most 2 references (the caller's name and the call's),
# so a step holds 2 of its own.  hold() and let_go() take and drop them; a plan holds its
# cached params and buffers in its cache and in its arrays_held.
from cpython.object cimport PyObject
from cpython.ref cimport Py_XDECREF, Py_XINCREF
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memset

cimport numpy as cnp

from fastsgd._native.kernels cimport FASTSGD_NDTYPES, fastsgd_tensor_list
from fastsgd._native.objects cimport array_ptr, kernel_dtype, owner_of


cdef extern from *:
    """
    /* Staging threads hold the grads they stage (twice: see hold()) while
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
    void hold_shared "fastsgd_hold_shared"(PyObject *o) nogil
    void or_shared "fastsgd_or_shared"(int *bits, int more) nogil


cdef inline void hold(PyObject *x) noexcept:
    Py_XINCREF(x)
    Py_XINCREF(x)


cdef inline void let_go(PyObject *x) noexcept:
    Py_XDECREF(x)
    Py_XDECREF(x)


# PyMem_Realloc that raises MemoryError.
cdef void *grow(void *old, size_t nbytes) except NULL


# What staging reads and writes (see plan.pyx): the group's lists
# (borrowed) and the arrays of the batch of each dtype, indexed by the
# tensor's position in the group.
cdef struct StagingJob:
    PyObject **params
    PyObject **buffers  # NULL without momentum
    int64_t *results  # per position: 4 * element count + dtype, NO_GRAD or SLOW
    void **params_data[FASTSGD_NDTYPES]
    const void **grads_data[FASTSGD_NDTYPES]
    void **bufs_data[FASTSGD_NDTYPES]
    uint8_t *buf_is_new[FASTSGD_NDTYPES]
    int64_t *sizes[FASTSGD_NDTYPES]
    PyObject **held[FASTSGD_NDTYPES]
    void **clean_grads[FASTSGD_NDTYPES]
    void **owner_slots  # the group's Owners
    size_t owner_mask
    int found  # FOUND_* bits (plan.pyx), or'ed in by every thread


cdef inline int dtype_of(array_ptr a) noexcept nogil:
    """The kernel's dtype of an array that passed the rules."""
    return kernel_dtype(a)


cdef inline void put_entry(StagingJob *job, int64_t i, array_ptr param, PyObject *grad,
                           PyObject *buf, int64_t size) noexcept nogil:
    """Write tensor i's pointers and size at position i of its dtype's arrays."""
    cdef int dtype = dtype_of(param)
    job.params_data[dtype][i] = param.data
    job.grads_data[dtype][i] = (<array_ptr>grad).data
    job.bufs_data[dtype][i] = (<array_ptr>buf).data if buf != NULL else NULL
    job.sizes[dtype][i] = size


cdef class Owners:
    """The owners of the memory of a group's parameters and momentum buffers,
    as an open-addressing hash set of pointers (the arrays that hold them are
    kept by the plan's cache)."""
    cdef void **slots
    cdef size_t mask
    cdef Py_ssize_t fills  # how many times fill() ran

    cdef int fill(self, list arrays) except -1


cdef inline size_t owner_slot(void *owner, size_t mask) noexcept nogil:
    return ((<size_t>owner >> 4) * <size_t>11400714819323198485ULL >> 20) & mask


cdef inline bint owners_have(void **slots, size_t mask, void *owner) noexcept nogil:
    """Whether an Owners' set (its slots and mask) holds owner."""
    if slots == NULL:
        return False
    cdef size_t i = owner_slot(owner, mask)
    while slots[i] != NULL:
        if slots[i] == owner:
            return True
        i = (i + 1) & mask
    return False


cdef inline bint may_alias(array_ptr grad, void *param_data, void **clean,
                           void **owner_slots, size_t owner_mask) noexcept nogil:
    """Whether grad may share memory with a parameter or buffer of its group
    (owner_slots and owner_mask: the group's Owners) other than its own
    parameter, whose data is param_data.  clean[0:2] remembers a grad that
    owns its memory and was found clean, while the owners stay the same."""
    if grad.data == param_data:
        return False  # its own parameter
    if clean[0] == <void *>grad and clean[1] == <void *>grad.data and grad.base == NULL:
        return False  # an owner then, it is not one of the owners now
    if owners_have(owner_slots, owner_mask, owner_of(<PyObject *>grad)):
        return True
    if grad.base == NULL:
        clean[0] = <void *>grad
        clean[1] = <void *>grad.data
    return False


cdef class Batch:
    """The tensors of one dtype that a step updates, as the C driver takes
    them.  Until clear(), it holds (hold()) each grad it points into, and
    each buffer that its plan does not hold (a plan holds the params and the
    steady state's buffers).  Its storage only grows, so a steady-state step
    allocates nothing."""
    cdef Py_ssize_t count
    cdef Py_ssize_t capacity
    cdef void **params
    cdef const void **grads
    cdef void **bufs
    cdef uint8_t *buf_is_new
    cdef int64_t *sizes
    cdef void **masters  # master weights' float32 copies; as_list passes them if with_masters
    cdef bint with_masters
    cdef PyObject **held  # 2 per tensor: grad, buffer (or NULL)
    # Per tensor, a grad that owns its memory and was found to share none
    # with the group's parameters and buffers (address and data), valid
    # while the owners checked against stay the same (clean_fills).
    cdef void **clean_grads
    cdef Py_ssize_t clean_fills
    # Whether some grad may alias, if the staging threads checked each as
    # they staged it (the grad is in their cache then), else -1.
    cdef int grads_alias

    cdef int reserve(self, Py_ssize_t n) except -1
    cdef void lend_arrays(self, StagingJob *job, int dtype) noexcept
    cdef void clear(self) noexcept
    cdef bint grads_may_alias(self, Owners owners, bint with_buffers, int dtype) noexcept
    cdef fastsgd_tensor_list as_list(self, bint with_buffers) noexcept nogil

    cdef inline void add(self, PyObject *param, PyObject *grad, PyObject *buf,
                         Py_ssize_t size, bint buf_is_new, bint hold_buf) noexcept:
        """Add a checked tensor of `size` elements; buf is NULL without
        momentum.  hold_buf is false when the plan holds buf."""
        cdef Py_ssize_t i = self.count
        self.add_data((<array_ptr>param).data, (<array_ptr>grad).data,
                      (<array_ptr>buf).data if buf != NULL else NULL, size, buf_is_new)
        self.held[2 * i] = grad
        self.held[2 * i + 1] = buf if hold_buf else NULL
        hold(grad)
        hold(self.held[2 * i + 1])

    cdef inline void add_data(self, void *param, const void *grad, void *buf, int64_t size,
                              bint buf_is_new) noexcept:
        """Add a checked tensor by its memory, holding nothing (its caller
        holds what it points into: fastsgd.torch's tensors)."""
        cdef Py_ssize_t i = self.count
        self.params[i] = param
        self.grads[i] = grad
        self.bufs[i] = buf
        self.buf_is_new[i] = buf_is_new
        self.sizes[i] = size
        self.held[2 * i] = self.held[2 * i + 1] = NULL
        self.count = i + 1

    cdef inline void add_master(self, PyObject *param, PyObject *grad, PyObject *master,
                                PyObject *buf, Py_ssize_t size, int flags) noexcept:
        """Add a checked master-weights tensor (flags: FASTSGD_NEW_*); the
        plan holds master and buf, as it holds the param."""
        cdef Py_ssize_t i = self.count
        self.add(param, grad, buf, size, False, False)
        self.buf_is_new[i] = <uint8_t>flags
        self.masters[i] = (<array_ptr>master).data

    cdef inline void keep(self, Py_ssize_t i) noexcept:
        """Add the entry staging wrote (and whose grad it holds) at
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

    cdef inline void sync_clean_grads(self, Owners owners) noexcept:
        if self.clean_fills != owners.fills:
            memset(self.clean_grads, 0, 2 * self.capacity * sizeof(void *))
            self.clean_fills = owners.fills

    cdef inline bint grad_may_alias(self, Py_ssize_t i, Owners owners) noexcept:
        return may_alias(<array_ptr>self.held[2 * i], self.params[i],
                         &self.clean_grads[2 * i], owners.slots, owners.mask)
