# Reading objects on raw pointers: numpy's array struct, a Parameter's type and .grad slot.
#
# A parameter's dtype is float32, float64, float16 or ml_dtypes' bfloat16.  bfloat16 has a type
# number numpy assigns when ml_dtypes registers it: it is recognised by its scalar type object,
# found in sys.modules once ml_dtypes is imported (refresh_bfloat16), never imported here.
#
# Staging reads every tensor's objects, on several threads while the calling thread holds the
# GIL (so nothing moves): these reads take no reference and call nothing.  Each module that
# cimports this one calls init_objects() once at import.
cimport numpy as cnp
from cpython.object cimport PyObject, PyTypeObject
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport Py_INCREF

from fastsgd._native.kernels cimport FASTSGD_BF16, FASTSGD_F16, FASTSGD_F32, FASTSGD_F64


# numpy's public array struct, read directly on the fast path.
cdef extern from "numpy/ndarraytypes.h":
    ctypedef struct descr_fields "PyArray_Descr":
        PyTypeObject *typeobj
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

cdef extern from "Python.h":
    PyObject *PyImport_GetModuleDict()  # sys.modules (borrowed)
    # Py_TYPE and PyObject_TypeCheck on borrowed pointers: plain reads of an
    # object and its type, which Cython lets run without the GIL.
    PyTypeObject *type_of "Py_TYPE"(PyObject *x) nogil
    bint type_check "PyObject_TypeCheck"(PyObject *x, PyTypeObject *t) nogil

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    # The item arrays of a list and a tuple, which staging threads read.
    ctypedef struct PyListObject:
        PyObject **ob_item
    ctypedef struct PyTupleObject:
        PyObject *ob_item[1]

cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #error "fastsgd's staging threads rely on the GIL to keep objects still"
    #endif
    /* Set by init_objects() in each module that reads arrays: plain
     * statics, one load each on the fast path. */
    static PyTypeObject *fastsgd_ndarray_type = NULL;
    static PyTypeObject *fastsgd_parameter_type = NULL;
    static Py_ssize_t fastsgd_grad_offset = -1;
    static PyTypeObject *fastsgd_bfloat16_type = NULL;  /* until ml_dtypes is seen */
    """
    PyTypeObject *NDARRAY_TYPE "fastsgd_ndarray_type"
    PyTypeObject *PARAMETER_TYPE "fastsgd_parameter_type"
    Py_ssize_t GRAD_OFFSET "fastsgd_grad_offset"
    PyTypeObject *BFLOAT16_TYPE "fastsgd_bfloat16_type"

cdef extern from *:
    """
    #define FASTSGD_DENSE (NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_F_CONTIGUOUS)
    """
    int DENSE "FASTSGD_DENSE"  # the flags of an array contiguous in C or Fortran order


cdef inline int init_objects() except -1:
    """Find numpy's array type, fastsgd.Parameter and its .grad slot's offset."""
    global NDARRAY_TYPE, PARAMETER_TYPE, GRAD_OFFSET
    from fastsgd.parameter import Parameter
    NDARRAY_TYPE = <PyTypeObject *>cnp.ndarray
    PARAMETER_TYPE = <PyTypeObject *>Parameter
    # Parameter keeps .grad in its _grad slot (.grad is the property that
    # checks assignments): read it at its offset, as the slot's own descriptor
    # would, without the attribute lookup.
    descriptor = Parameter.__dict__.get("_grad")
    if type(descriptor).__name__ == "member_descriptor":
        GRAD_OFFSET = (<PyMemberDescrObject *>descriptor).d_member.offset
    return 0


cdef inline bint refresh_bfloat16() except -1:
    """Recognise ml_dtypes' bfloat16 from now on, if ml_dtypes has been
    imported (no bfloat16 array exists before).  True if it just was."""
    global BFLOAT16_TYPE
    if BFLOAT16_TYPE != NULL:
        return False
    # sys.modules read without an import statement, which allocates: this
    # runs on every staging of a tensor off the fast path until then
    cdef PyObject *ml_dtypes = PyDict_GetItem(<object>PyImport_GetModuleDict(), "ml_dtypes")
    if ml_dtypes == NULL:
        return False
    bfloat16 = getattr(<object>ml_dtypes, "bfloat16", None)
    if not isinstance(bfloat16, type):
        return False
    Py_INCREF(bfloat16)  # held for the life of the process
    BFLOAT16_TYPE = <PyTypeObject *>bfloat16
    return True


cdef inline PyObject *grad_slot(PyObject *param) noexcept nogil:
    """A Parameter's .grad slot: the grad, None, or NULL if never set."""
    return (<PyObject **>((<char *>param) + GRAD_OFFSET))[0]


cdef inline object grad_of(object p):
    """p.grad, read from the slot when p is a Parameter."""
    cdef PyObject *grad
    if type_of(<PyObject *>p) == PARAMETER_TYPE and GRAD_OFFSET >= 0:
        grad = grad_slot(<PyObject *>p)
        if grad != NULL:
            return <object>grad
    return p.grad


cdef inline bint is_array(PyObject *x) noexcept nogil:
    """Whether x is a numpy array (a Parameter first: most tensors are)."""
    cdef PyTypeObject *t = type_of(x)
    return t == NDARRAY_TYPE or t == PARAMETER_TYPE or type_check(x, NDARRAY_TYPE)


cdef inline int kernel_dtype(array_ptr a) noexcept nogil:
    """The kernel's dtype (FASTSGD_*) of an array, or -1 for any other."""
    cdef int t = a.descr.type_num
    if t == cnp.NPY_FLOAT32:
        return FASTSGD_F32
    if t == cnp.NPY_FLOAT64:
        return FASTSGD_F64
    if t == cnp.NPY_FLOAT16:
        return FASTSGD_F16
    if BFLOAT16_TYPE != NULL and a.descr.typeobj == BFLOAT16_TYPE:
        return FASTSGD_BF16
    return -1


cdef inline Py_ssize_t itemsize(array_ptr a) noexcept nogil:
    """The element size of an array of a kernel's dtype."""
    cdef int dtype = kernel_dtype(a)
    return 4 if dtype == FASTSGD_F32 else 8 if dtype == FASTSGD_F64 else 2


cdef inline Py_ssize_t size_of(array_ptr a) noexcept nogil:
    cdef Py_ssize_t n = 1
    cdef int d
    for d in range(a.nd):
        n *= a.dimensions[d]
    return n


cdef inline void *owner_of(PyObject *x) noexcept nogil:
    """The object at the end of x's chain of bases: two arrays can share
    memory only if they have the same owner."""
    while type_check(x, NDARRAY_TYPE) and (<array_ptr>x).base != NULL:
        x = (<array_ptr>x).base
    return <void *>x


cdef extern from "numpy/arrayobject.h":
    # An uninitialised array of prototype's shape and dtype (descr NULL), its
    # dimensions in the order of prototype's strides: dense, and a base
    # ndarray whatever prototype's class (no __array_function__ dispatch).
    object PyArray_NewLikeArray(cnp.ndarray prototype, cnp.NPY_ORDER order, PyObject *descr,
                                int subok)


cdef inline object dense_like(object a):
    """An uninitialised dense array of a's shape and dtype, in a's memory
    order (the copy a strided array is stepped through)."""
    return PyArray_NewLikeArray(<cnp.ndarray>a, cnp.NPY_KEEPORDER, NULL, 0)
