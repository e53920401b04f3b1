# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Gradient clipping's native loops: each grad's norm, grad *= coef and
grad = clamp(grad, lo, hi), one kernel call per dtype for all grads
(fastsgd/clip_grad.py holds the arithmetic around them)."""
import numpy as np

cimport numpy as cnp
from cpython.object cimport PyObject

from fastsgd._native cimport kernels
from fastsgd._native.batch cimport Batch
from fastsgd._native.kernels cimport FASTSGD_F32, FASTSGD_F64, fastsgd_impl
from fastsgd._native.objects cimport array_ptr, init_objects, size_of
from fastsgd._native.rules cimport check_float_array, where

cnp.import_array()
init_objects()


cdef class GradLists:
    """The grads of a clipping call as pointer lists per dtype (a Batch
    each, which also holds every array while the GIL is released), and where
    each came from in the caller's list."""
    cdef Batch f32
    cdef Batch f64
    cdef list positions32
    cdef list positions64

    def __cinit__(self, list grads, list positions, bint writable):
        if len(positions) != len(grads):
            raise ValueError(f"got {len(grads)} grads and {len(positions)} positions")
        self.f32, self.f64 = Batch(), Batch()
        self.positions32, self.positions64 = [], []
        self.f32.reserve(len(grads))
        self.f64.reserve(len(grads))
        cdef Py_ssize_t i
        for i in range(len(grads)):
            grad, position = grads[i], positions[i]
            check_float_array(grad, "grad", -1, position, writable)
            if not (cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>grad)
                    or cnp.PyArray_IS_F_CONTIGUOUS(<cnp.ndarray>grad)):
                raise ValueError(f"{where(-1, position)}: grad must be contiguous "
                                 f"(C or Fortran order)")
            if cnp.PyArray_TYPE(<cnp.ndarray>grad) == cnp.NPY_FLOAT32:
                self.f32.add(<PyObject *>grad, <PyObject *>grad, NULL,
                             size_of(<array_ptr>grad), False, False)
                self.positions32.append(i)
            else:
                self.f64.add(<PyObject *>grad, <PyObject *>grad, NULL,
                             size_of(<array_ptr>grad), False, False)
                self.positions64.append(i)


def grad_norms(list grads, list positions, double p):
    """The p-norm of each grad, in double (positions name them in errors)."""
    cdef GradLists lists = GradLists(grads, positions, False)
    cdef cnp.ndarray[double] norms32 = np.empty(lists.f32.count)
    cdef cnp.ndarray[double] norms64 = np.empty(lists.f64.count)
    cdef const fastsgd_impl *impl = kernels.kernel()
    with nogil:
        kernels.norms(impl, FASTSGD_F32, lists.f32.count, <const void **>lists.f32.params,
                      lists.f32.sizes, p, <double *>cnp.PyArray_DATA(norms32))
        kernels.norms(impl, FASTSGD_F64, lists.f64.count, <const void **>lists.f64.params,
                      lists.f64.sizes, p, <double *>cnp.PyArray_DATA(norms64))
    norms = np.empty(len(grads))
    norms[lists.positions32] = norms32
    norms[lists.positions64] = norms64
    return norms


def scale_grads(list grads, list positions, double coef):
    """``grad *= coef`` for every grad, coef rounded to each grad's dtype."""
    cdef GradLists lists = GradLists(grads, positions, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    with nogil:
        kernels.scale(impl, FASTSGD_F32, lists.f32.count, lists.f32.params, lists.f32.sizes, coef)
        kernels.scale(impl, FASTSGD_F64, lists.f64.count, lists.f64.params, lists.f64.sizes, coef)


def clamp_grads(list grads, list positions, double lo, double hi):
    """grad = clamp(grad, lo, hi) for every grad."""
    cdef GradLists lists = GradLists(grads, positions, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    with nogil:
        kernels.clamp(impl, FASTSGD_F32, lists.f32.count, lists.f32.params, lists.f32.sizes,
                      lo, hi)
        kernels.clamp(impl, FASTSGD_F64, lists.f64.count, lists.f64.params, lists.f64.sizes,
                      lo, hi)
