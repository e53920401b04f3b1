# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Grad-wise native loops: clipping's (each grad's norm, grad *= coef and
grad = clamp(grad, lo, hi)) and GradScaler's unscale, one kernel call per
dtype for all grads (fastsgd/clip_grad.py and fastsgd/amp.py hold the
arithmetic around them)."""
import numpy as np

cimport numpy as cnp
from cpython.object cimport PyObject

from fastsgd._native cimport kernels
from fastsgd._native.batch cimport Batch, dtype_of
from fastsgd._native.kernels cimport FASTSGD_NDTYPES, fastsgd_impl
from fastsgd._native.objects cimport array_ptr, init_objects, size_of
from fastsgd._native.rules cimport check_float_array, where

cnp.import_array()
init_objects()


cdef class GradLists:
    """The grads of a call as pointer lists per dtype (a Batch each, which
    also holds every array while the GIL is released), and where each came
    from in the caller's list."""
    cdef tuple batches
    cdef list positions  # per dtype

    def __cinit__(self, list grads, list positions, bint writable):
        if len(positions) != len(grads):
            raise ValueError(f"got {len(grads)} grads and {len(positions)} positions")
        self.batches = tuple(Batch() for _ in range(FASTSGD_NDTYPES))
        self.positions = [[] for _ in range(FASTSGD_NDTYPES)]
        cdef Batch batch
        for batch in self.batches:
            batch.reserve(len(grads))
        cdef Py_ssize_t i
        cdef int dtype
        for i in range(len(grads)):
            grad, position = grads[i], positions[i]
            check_float_array(grad, "grad", -1, position, writable)
            if not (cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>grad)
                    or cnp.PyArray_IS_F_CONTIGUOUS(<cnp.ndarray>grad)):
                raise ValueError(f"{where(-1, position)}: grad must be contiguous "
                                 f"(C or Fortran order)")
            dtype = dtype_of(<array_ptr>grad)
            (<Batch>self.batches[dtype]).add(<PyObject *>grad, <PyObject *>grad, NULL,
                                             size_of(<array_ptr>grad), False, False)
            self.positions[dtype].append(i)

    cdef Batch batch(self, int dtype):
        return <Batch>self.batches[dtype]


def grad_norms(list grads, list positions, double p):
    """The p-norm of each grad, in double (positions name them in errors)."""
    cdef GradLists lists = GradLists(grads, positions, False)
    cdef const fastsgd_impl *impl = kernels.kernel()
    norms = np.empty(len(grads))
    cdef cnp.ndarray[double] part
    cdef Batch batch
    cdef int d
    for d in range(FASTSGD_NDTYPES):
        batch = lists.batch(d)
        part = np.empty(batch.count)
        with nogil:
            kernels.norms(impl, d, batch.count, <const void **>batch.params, batch.sizes, p,
                          <double *>cnp.PyArray_DATA(part))
        norms[lists.positions[d]] = part
    return norms


def scale_grads(list grads, list positions, double coef):
    """``grad *= coef`` for every grad, coef rounded to each grad's dtype (to
    float32 for a 16-bit grad, which is rounded back once)."""
    cdef GradLists lists = GradLists(grads, positions, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    cdef Batch batch
    cdef int d
    for d in range(FASTSGD_NDTYPES):
        batch = lists.batch(d)
        with nogil:
            kernels.scale(impl, d, batch.count, batch.params, batch.sizes, coef)


def clamp_grads(list grads, list positions, double lo, double hi):
    """grad = clamp(grad, lo, hi) for every grad."""
    cdef GradLists lists = GradLists(grads, positions, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    cdef Batch batch
    cdef int d
    for d in range(FASTSGD_NDTYPES):
        batch = lists.batch(d)
        with nogil:
            kernels.clamp(impl, d, batch.count, batch.params, batch.sizes, lo, hi)


def unscale_grads(list grads, list positions, float inv_scale):
    """GradScaler's unscale: grad *= inv_scale (a float32) for every grad, in
    place, as torch's _amp_foreach_non_finite_check_and_unscale_; returns
    whether any element of any grad was inf or NaN."""
    cdef GradLists lists = GradLists(grads, positions, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    cdef Batch batch
    cdef int d
    cdef bint found = False
    for d in range(FASTSGD_NDTYPES):
        batch = lists.batch(d)
        with nogil:
            found |= kernels.unscale(impl, d, batch.count, batch.params, batch.sizes, inv_scale)
    return found
