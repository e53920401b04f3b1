# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Pointer lists: a Batch is the tensors of one dtype as the C driver takes
them, holding every array it points into; Owners is the set of a group's
memory owners that the grad-alias check looks grads up in (see batch.pxd)."""
import numpy as np

cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Realloc

from fastsgd._native cimport kernels
from fastsgd._native.objects cimport init_objects

cnp.import_array()
init_objects()


cdef void *grow(void *old, size_t nbytes) except NULL:
    cdef void *new = PyMem_Realloc(old, nbytes)
    if new == NULL:
        raise MemoryError()
    return new


cdef class Owners:

    def __dealloc__(self):
        PyMem_Free(self.slots)

    cdef int fill(self, list arrays) except -1:
        cdef size_t size = 1
        while size < 2 * <size_t>len(arrays) + 2:
            size <<= 1
        self.slots = <void **>grow(self.slots, size * sizeof(void *))
        memset(self.slots, 0, size * sizeof(void *))
        self.mask = size - 1
        self.fills += 1
        cdef size_t i
        cdef void *owner
        for a in arrays:
            if isinstance(a, np.ndarray):
                owner = owner_of(<PyObject *>a)
                i = owner_slot(owner, self.mask)
                while self.slots[i] != NULL and self.slots[i] != owner:
                    i = (i + 1) & self.mask
                self.slots[i] = owner
        return 0


cdef class Batch:

    def __cinit__(self):
        self.grads_alias = -1

    def __dealloc__(self):
        self.clear()
        PyMem_Free(self.params)
        PyMem_Free(self.grads)
        PyMem_Free(self.bufs)
        PyMem_Free(self.buf_is_new)
        PyMem_Free(self.sizes)
        PyMem_Free(self.masters)
        PyMem_Free(self.held)
        PyMem_Free(self.clean_grads)

    cdef int reserve(self, Py_ssize_t n) except -1:
        if n <= self.capacity:
            return 0
        self.params = <void **>grow(self.params, n * sizeof(void *))
        self.grads = <const void **>grow(self.grads, n * sizeof(void *))
        self.bufs = <void **>grow(self.bufs, n * sizeof(void *))
        self.buf_is_new = <uint8_t *>grow(self.buf_is_new, n * sizeof(uint8_t))
        self.sizes = <int64_t *>grow(self.sizes, n * sizeof(int64_t))
        self.masters = <void **>grow(self.masters, n * sizeof(void *))
        self.held = <PyObject **>grow(self.held, 2 * n * sizeof(PyObject *))
        self.clean_grads = <void **>grow(self.clean_grads, 2 * n * sizeof(void *))
        memset(self.clean_grads, 0, 2 * n * sizeof(void *))
        self.capacity = n
        return 0

    cdef void lend_arrays(self, StagingJob *job, int dtype) noexcept:
        """Let staging write this batch's entries."""
        job.params_data[dtype] = self.params
        job.grads_data[dtype] = self.grads
        job.bufs_data[dtype] = self.bufs
        job.buf_is_new[dtype] = self.buf_is_new
        job.sizes[dtype] = self.sizes
        job.held[dtype] = self.held
        job.clean_grads[dtype] = self.clean_grads

    cdef void clear(self) noexcept:
        cdef Py_ssize_t i
        for i in range(2 * self.count):
            let_go(self.held[i])
        self.count = 0
        self.grads_alias = -1

    cdef bint grads_may_alias(self, Owners owners, bint with_buffers, int dtype) noexcept:
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
        if kernels.threads_for(dtype, total, with_buffers) < 2:
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
        lst.masters = NULL
        if self.with_masters:
            lst.masters = self.masters
            lst.buf_is_new = self.buf_is_new  # the FASTSGD_NEW_* flags, with or without buffers
        return lst
