# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Array-wise native loops: clipping's (each grad's norm, grad *= coef and
grad = clamp(grad, lo, hi)), GradScaler's unscale, and weight averaging's
(lerp and the running mean), one kernel call per dtype for all arrays
(fastsgd/clip_grad.py, fastsgd/amp.py and fastsgd/swa_utils.py hold the
arithmetic around them)."""
import numpy as np

cimport numpy as cnp
from cpython.object cimport PyObject
from libc.stdint cimport int64_t

from fastsgd._native cimport kernels
from fastsgd._native.batch cimport Batch, dtype_of
from fastsgd._native.kernels cimport FASTSGD_NDTYPES, fastsgd_impl
from fastsgd._native.objects cimport (DENSE, array_ptr, dense_like, init_objects,
                                      refresh_bfloat16, size_of)
from fastsgd._native.rules cimport (apart, check_float_array, check_layout, check_like,
                                    check_no_self_overlap, is_float_array, is_like, sharing,
                                    where)

cnp.import_array()
init_objects()


cdef class GradLists:
    """The grads of a call as pointer lists per dtype (a Batch each, which
    also holds every array while the GIL is released), and where each came
    from in the caller's list."""
    cdef tuple batches
    cdef list positions  # per dtype
    cdef list copies  # [(grad, its dense copy)] for the grads that are not contiguous

    def __cinit__(self, list grads, list positions, bint writable, bint elementwise):
        if len(positions) != len(grads):
            raise ValueError(f"got {len(grads)} grads and {len(positions)} positions")
        self.batches = tuple(Batch() for _ in range(FASTSGD_NDTYPES))
        self.positions = [[] for _ in range(FASTSGD_NDTYPES)]
        self.copies = []
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
                grad = self.copy_of(grads, i, position, elementwise, writable)
            dtype = dtype_of(<array_ptr>grad)
            (<Batch>self.batches[dtype]).add(<PyObject *>grad, <PyObject *>grad, NULL,
                                             size_of(<array_ptr>grad), False, False)
            self.positions[dtype].append(i)

    cdef Batch batch(self, int dtype):
        return <Batch>self.batches[dtype]

    cdef object copy_of(self, list grads, Py_ssize_t i, object position, bint elementwise,
                        bint writable):
        """A dense copy of the strided grads[i], which the kernel reads (and
        writes) instead; write_back() copies it back.  An element-wise op
        gives the same bits on it; a norm would not: torch sums a strided
        tensor's elements in an order of its own."""
        cdef Py_ssize_t j
        grad = grads[i]
        if not elementwise:
            raise ValueError(f"{where(-1, position)}: grad must be contiguous (C or Fortran "
                             f"order) for a norm: torch sums a strided tensor's elements in an "
                             f"order of its own, so the norm could differ from torch's")
        if writable:
            check_no_self_overlap(grad, "grad", -1, position)
            for j in range(len(grads)):
                if j != i and cnp.PyArray_Check(grads[j]) and sharing(grad, grads[j]):
                    raise ValueError(f"{where(-1, position)}: grad is not contiguous and "
                                     f"shares memory with another grad")
        copy = dense_like(grad)
        cnp.PyArray_CopyInto(copy, grad)
        self.copies.append((grad, copy))
        return copy

    cdef int write_back(self) except -1:
        for grad, copy in self.copies:
            cnp.PyArray_CopyInto(grad, copy)
        return 0


def grad_norms(list grads, list positions, double p):
    """The p-norm of each grad, in double (positions name them in errors)."""
    cdef GradLists lists = GradLists(grads, positions, False, False)
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
    cdef GradLists lists = GradLists(grads, positions, True, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    cdef Batch batch
    cdef int d
    for d in range(FASTSGD_NDTYPES):
        batch = lists.batch(d)
        with nogil:
            kernels.scale(impl, d, batch.count, batch.params, batch.sizes, coef)
    lists.write_back()


def clamp_grads(list grads, list positions, double lo, double hi):
    """grad = clamp(grad, lo, hi) for every grad."""
    cdef GradLists lists = GradLists(grads, positions, True, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    cdef Batch batch
    cdef int d
    for d in range(FASTSGD_NDTYPES):
        batch = lists.batch(d)
        with nogil:
            kernels.clamp(impl, d, batch.count, batch.params, batch.sizes, lo, hi)
    lists.write_back()


def unscale_grads(list grads, list positions, float inv_scale):
    """GradScaler's unscale: grad *= inv_scale (a float32) for every grad, in
    place, as torch's _amp_foreach_non_finite_check_and_unscale_; returns
    whether any element of any grad was inf or NaN."""
    cdef GradLists lists = GradLists(grads, positions, True, True)
    cdef const fastsgd_impl *impl = kernels.kernel()
    cdef Batch batch
    cdef int d
    cdef bint found = False
    for d in range(FASTSGD_NDTYPES):
        batch = lists.batch(d)
        with nogil:
            found |= kernels.unscale(impl, d, batch.count, batch.params, batch.sizes, inv_scale)
    lists.write_back()
    return found


# ------------------------------------------------------------ weight averaging

cdef inline bint averages_as_is(PyObject *avg, PyObject *cur) noexcept:
    """The rules of explain_average's, fast: avg a dense writable float
    array, cur like it, the two the same array's memory or disjoint."""
    if not is_float_array(avg, True) or ((<array_ptr>avg).flags & DENSE) == 0:
        return False
    if not is_like(<array_ptr>avg, cur, False):
        return False
    return ((<array_ptr>avg).data == (<array_ptr>cur).data
            or apart(<array_ptr>avg, <array_ptr>cur, cnp.PyArray_NBYTES(<cnp.ndarray>avg)))


cdef int explain_average(object avg, object cur, Py_ssize_t i) except -1:
    check_float_array(avg, "averaged array", -1, i, True)
    if not (cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>avg)
            or cnp.PyArray_IS_F_CONTIGUOUS(<cnp.ndarray>avg)):
        raise ValueError(f"{where(-1, i)}: averaged array must be contiguous "
                         f"(C or Fortran order)")
    check_like(<cnp.ndarray>avg, cur, "current array", -1, i, False)
    check_layout(<cnp.ndarray>avg, <cnp.ndarray>cur, "current array", -1, i)
    raise ValueError(f"{where(-1, i)}: the current array shares part of the averaged "
                     f"array's memory")


cdef int average(list averaged, list current, double x, bint lerp) except -1:
    """Checks every pair, then runs the loop over each dtype's pairs, with
    the GIL held throughout: no Python code runs between the checks and the
    kernel, so no array can be freed, resized or swapped meanwhile."""
    cdef Py_ssize_t n = len(averaged)
    if len(current) != n:
        raise ValueError(f"got {n} averaged arrays and {len(current)} current arrays")
    refresh_bfloat16()
    cdef cnp.ndarray avgs = np.empty(n, np.uintp), curs = np.empty(n, np.uintp)
    cdef cnp.ndarray sizes = np.empty(n, np.int64)
    cdef void **avg_data = <void **>cnp.PyArray_DATA(avgs)
    cdef const void **cur_data = <const void **>cnp.PyArray_DATA(curs)
    cdef int64_t *size_data = <int64_t *>cnp.PyArray_DATA(sizes)
    cdef Py_ssize_t i, k = 0
    cdef Py_ssize_t starts[FASTSGD_NDTYPES + 1]
    cdef PyObject *avg
    cdef PyObject *cur
    cdef int d
    for d in range(FASTSGD_NDTYPES):  # grouped by dtype, each in the lists' order
        starts[d] = k
        for i in range(n):
            avg, cur = <PyObject *>averaged[i], <PyObject *>current[i]
            if not averages_as_is(avg, cur):
                explain_average(<object>avg, <object>cur, i)
            if dtype_of(<array_ptr>avg) == d:
                avg_data[k] = (<array_ptr>avg).data
                cur_data[k] = (<array_ptr>cur).data
                size_data[k] = size_of(<array_ptr>avg)
                k += 1
    starts[FASTSGD_NDTYPES] = k
    cdef const fastsgd_impl *impl = kernels.kernel()
    for d in range(FASTSGD_NDTYPES):
        i = starts[d]
        if lerp:
            kernels.lerp(impl, d, starts[d + 1] - i, avg_data + i, cur_data + i, size_data + i, x)
        else:
            kernels.mean(impl, d, starts[d + 1] - i, avg_data + i, cur_data + i, size_data + i, x)
    return 0


def lerp_arrays(list averaged, list current, double weight):
    """``averaged[i] = lerp(averaged[i], current[i], weight)`` for every i,
    in place, as torch's ``_foreach_lerp_`` with a Scalar weight (the weight
    rounded to each array's compute type: csrc/average_loop.h)."""
    average(averaged, current, weight, True)


def mean_arrays(list averaged, list current, double count):
    """``averaged[i] += (current[i] - averaged[i]) / count`` for every i, in
    place, op by op in each array's dtype (torch's ``get_swa_avg_fn``)."""
    average(averaged, current, count, False)
