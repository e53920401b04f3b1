# A parameter group's step: staging its tensors into batches, and the plan cache.
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t

from cpython.tuple cimport PyTuple_GET_ITEM

from fastsgd._native.batch cimport Batch, Owners, dtype_of
from fastsgd._native.kernels cimport fastsgd_sgd_hyper
from fastsgd._native.objects cimport array_ptr


# Below this many tensors per thread, a group's staging stays on the
# calling thread: waking another costs more than it saves.  Measured on 2
# threads with 256-element tensors: at 1,024 tensors staging takes 0.93x
# the serial time with hot caches and 0.77x with cold ones; at 512, 1.07x
# and 0.87x.
cdef enum:
    MIN_TENSORS_PER_STAGING_THREAD = 512


cdef struct Span:
    char *low
    char *high
    PyObject *array  # borrowed: the step holds it
    Py_ssize_t position
    bint staged
    bint dense


cdef class Staging:
    """A tensor stepped through contiguous copies: its arrays this step, the
    arrays the kernel steps instead (the copies, or an array itself when it
    is dense in the copies' layout), and the copies, kept for later steps."""
    cdef object param, grad, buf  # the tensor's arrays this step (buf: None without)
    cdef object kernel_param, kernel_grad, kernel_buf
    cdef object param_copy, grad_copy, buf_copy
    # 16-bit: stepped alone this step (first: its buffer is new), each op of
    # each element rounded as modes says, kept for the layouts of modes_key
    cdef bint by_modes, first
    cdef object modes
    cdef tuple modes_key


cdef class GroupPlan:
    """One parameter group's step: validated and staged by prepare_group()
    or prepare_lists(), then run() (which cannot fail), then commit() (which
    stores new buffers).

    The plan caches the group's parameters and their momentum buffers.  The
    cache holds while the group's params list is the same list holding the
    same parameters, the optimizer's state is the same OptimizerState and no
    OptimizerState or ParamState has changed since (their version counter),
    and momentum stays on or off.  Anything else rebuilds it from the state."""
    cdef fastsgd_sgd_hyper hyper
    cdef bint with_momentum
    cdef bint master_weights  # the group's option: float32 master copies of 16-bit params
    cdef bint serial  # some tensors share memory: step them in order, on one thread
    cdef bint looks_up_buffers  # some buffers are read from the state every step
    cdef Py_ssize_t cross_dtype_alias  # a param sharing memory with one of another dtype, or -1
    cdef Owners owners  # of the memory of the params and buffers serial was decided on
    cdef tuple batches  # a Batch per kernel dtype (FASTSGD_*)
    cdef int in_use  # bit d set: batches[d] may hold tensors (until clear_batches)
    cdef readonly list new_buffers
    cdef readonly list new_masters  # [(position, master)] this step creates (master weights)
    cdef list master_arrays  # the masters and buffers of a master-weights step, twice each
    # {parameter: buffer} created by the groups before this one in this step
    # (None if none): a parameter listed in several groups takes, as in torch,
    # the buffer its first group creates (torch refuses such groups only in
    # add_param_group).
    cdef dict earlier_buffers

    cdef object cached_params_list
    cdef tuple cached_params
    cdef list cached_buffers
    cdef object cached_state
    cdef object cached_version
    cdef bint cached_with_momentum
    cdef list arrays_held  # the params and cached buffers again: see batch.pxd
    # Per position, the Staging of a tensor stepped through contiguous copies
    # (or None): kept across steps, so that a steady-state step allocates nothing.
    cdef list stagings
    cdef Py_ssize_t staged_count  # stagings in use this step
    cdef Span *spans  # check_staged_apart's work array, grown only
    cdef Py_ssize_t spans_capacity
    cdef int64_t *staged  # StagingJob.results, for as many tensors as the batches hold

    cdef int read_options(self, dict options, Py_ssize_t group_index) except -1
    cdef int reset(self, Py_ssize_t n) except -1
    cdef int stage(self, Py_ssize_t index, object param, object grad, object buf,
                   Py_ssize_t group_index) except -1
    cdef bint cache_holds(self, list params, object state, object version)
    cdef int rebuild_cache(self, list params, object state, object version,
                           Py_ssize_t group_index) except -1
    cdef int prepare_group(self, dict group, object state, object version,
                           Py_ssize_t group_index) except -1
    cdef bint stage_in_parallel(self, Py_ssize_t n) except -1
    cdef int stage_slowly(self, Py_ssize_t i, object param, object state,
                          Py_ssize_t group_index) except -1
    cdef int prepare_lists(self, list params, list grads, list buffers,
                           dict options) except -1
    cdef int stage_master_group(self, object state, Py_ssize_t group_index) except -1
    cdef int stage_master(self, Py_ssize_t i, object param, object state, dict pending,
                          Py_ssize_t group_index) except -1
    cdef int stage_copies(self, Py_ssize_t index, object param, object grad, object buf,
                          bint buf_is_new) except -1
    cdef object staged_buffer(self, object param, object grad)
    cdef int read_modes(self, Staging staging, bint first) except -1
    cdef void run_by_modes(self) noexcept
    cdef int check_staged_apart(self, list params, list grads, list buffers, object state,
                                Py_ssize_t group_index) except -1
    cdef int add_span(self, Py_ssize_t *count, object array, Py_ssize_t position) except -1
    cdef int gather(self) except -1
    cdef int scatter(self) except -1
    cdef void end_staging(self) noexcept
    cdef int check_alphas(self, Py_ssize_t group_index) except -1
    cdef bint grads_finite(self)
    cdef void run(self, bint roofline, float inv_scale)
    cdef int commit(self, object state) except -1
    cdef void clear_batches(self) noexcept

    cdef inline Batch batch(self, int dtype):
        return <Batch>PyTuple_GET_ITEM(self.batches, dtype)

    cdef inline Batch batch_of(self, PyObject *param):
        cdef int dtype = dtype_of(<array_ptr>param)
        self.in_use |= 1 << dtype
        return self.batch(dtype)
