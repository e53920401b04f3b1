# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A parameter group's step: staging and the plan cache (see plan.pxd).

prepare_group() checks every tensor and stages it into the batch of its
dtype: a steady-state tensor (a Parameter with a grad and a cached buffer,
all passing the rules) on raw pointers, on several threads for large groups,
and anything else -- first steps, buffers looked up per step, rejections --
on the calling thread, where the rules can explain themselves.
"""
import numpy as np

cimport numpy as cnp
from cpython.dict cimport PyDict_Check, PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

from fastsgd._native cimport kernels
from fastsgd._native.batch cimport (StagingJob, dtype_of, grow, hold_shared, may_alias,
                                    or_shared, put_entry)
from fastsgd._native.kernels cimport FASTSGD_F32, FASTSGD_F64, fastsgd_impl, fastsgd_tensor_list
from fastsgd._native.objects cimport (GRAD_OFFSET, PARAMETER_TYPE, PyListObject,
                                      PyTupleObject, array_ptr, grad_of, grad_slot,
                                      init_objects, type_of)
from fastsgd._native.rules cimport (explain_rejection, flag_option, option, real_option,
                                    steps_as_is, where)

from fastsgd.optimizer import ParamState
from fastsgd.parameter import Parameter

cnp.import_array()
init_objects()

NO_AUTOGRAD = "fastsgd has no autograd: differentiable=True is not supported"

cdef Py_ssize_t _parallel_stagings = 0


def parallel_staging_count():
    """How many groups have been staged on several threads in this process
    (lets tests check that they exercise that path)."""
    return _parallel_stagings


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


# In a plan's buffer cache: "this parameter's state is not a ParamState, so
# look its buffer up on every step".
cdef object _LOOK_UP = object()
cdef PyObject *_LOOK_UP_PTR = <PyObject *>_LOOK_UP
# None as a plain pointer, for staging threads
cdef PyObject *_NONE = <PyObject *>None


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
        raise TypeError(f"{where(group_index, index)}: optimizer.state of the parameter "
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
    if type_of(param) != PARAMETER_TYPE or GRAD_OFFSET < 0:
        return _SLOW
    grad[0] = grad_slot(param)
    if grad[0] == _NONE:
        return _NO_GRAD
    if grad[0] == NULL:
        return _SLOW
    if with_momentum and (buf == _NONE or buf == _LOOK_UP_PTR):
        return _SLOW
    cdef Py_ssize_t size = steps_as_is(param, grad[0], buf if with_momentum else NULL)
    return size if size >= 0 else _SLOW


# What the staging threads found, in StagingJob.found: per dtype, some tensor
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
    cdef StagingJob *job = <StagingJob *>job_
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
        dtype = dtype_of(<array_ptr>param)
        job.results[i] = 2 * size + dtype
        put_entry(job, i, <array_ptr>param, grad, buf, size)
        job.buf_is_new[dtype][i] = False
        job.held[dtype][2 * i] = grad
        job.held[dtype][2 * i + 1] = NULL  # the plan holds the buffer
        hold_shared(grad)
        found |= _FOUND_F32 << dtype
        if may_alias(<array_ptr>grad, (<array_ptr>param).data,
                     &job.clean_grads[dtype][2 * i], job.owner_slots, job.owner_mask):
            found |= _FOUND_ALIAS_F32 << dtype
    or_shared(&job.found, found)


cdef class GroupPlan:

    def __cinit__(self):
        self.f32 = Batch()
        self.f64 = Batch()
        self.owners = Owners()
        self.new_buffers = []

    def __dealloc__(self):
        PyMem_Free(self.staged)

    cdef int read_options(self, dict options, Py_ssize_t group_index) except -1:
        self.hyper.neg_lr = -real_option(options, "lr", group_index)
        self.hyper.momentum = real_option(options, "momentum", group_index)
        self.hyper.dampening = real_option(options, "dampening", group_index)
        self.hyper.weight_decay = real_option(options, "weight_decay", group_index)
        self.hyper.nesterov = flag_option(options, "nesterov", group_index)
        self.hyper.maximize = flag_option(options, "maximize", group_index)
        self.with_momentum = self.hyper.momentum != 0.0
        return 0

    cdef int reset(self, Py_ssize_t n) except -1:
        self.f32.clear()
        self.f64.clear()
        if n > self.f32.capacity:
            self.staged = <int64_t *>grow(self.staged, n * sizeof(int64_t))
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
            if steps_as_is(<PyObject *>param, <PyObject *>grad, NULL) < 0:
                explain_rejection(param, grad, None, group_index, index)
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
        size = steps_as_is(<PyObject *>param, <PyObject *>grad,
                           <PyObject *>buf if buf is not None else NULL)
        if size < 0:
            explain_rejection(param, grad, buf, group_index, index)
        self.batch_of(<PyObject *>param).add(<PyObject *>param, <PyObject *>grad,
                                             <PyObject *>buf if buf is not None else NULL,
                                             size, buf_is_new, True)
        return 0

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
                if not isinstance(p, Parameter):
                    continue  # stage_slowly rejects it, by name
                param_state = state.get(p)
                if version is None or (param_state is not None
                                       and type(param_state) is not ParamState):
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
        if flag_option(group, "differentiable", group_index):
            raise RuntimeError(NO_AUTOGRAD)
        params = option(group, "params", group_index)
        if type(params) is not list:
            params = list(params)
        if not PyDict_Check(state):
            raise TypeError(f"optimizer.state must be a dict, but got {type(state).__name__}")
        if not self.cache_holds(params, state, version):
            self.rebuild_cache(params, state, version, group_index)
        if self.cross_dtype_alias >= 0:
            raise ValueError(
                f"{where(group_index, self.cross_dtype_alias)}: shares memory with a "
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
        if (n >= 2 * MIN_TENSORS_PER_STAGING_THREAD and not self.looks_up_buffers
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
        cdef StagingJob job
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
        if kernels.parallel_ranges(n, MIN_TENSORS_PER_STAGING_THREAD, _stage_range,
                                   &job) <= 1:
            return False
        cdef Batch batch
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
        if not isinstance(param, Parameter):
            raise TypeError(f"{where(group_index, i)}: optimizer can only optimize "
                            f"Parameters, but got {type(param).__name__}")
        grad = grad_of(param)
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
        cdef const fastsgd_impl *impl = kernels.kernel()
        cdef fastsgd_tensor_list f32 = self.f32.as_list(self.with_momentum)
        cdef fastsgd_tensor_list f64 = self.f64.as_list(self.with_momentum)
        # A grad that is another tensor's parameter or buffer must be read
        # after (or before) that tensor's update, in order, as torch does.
        # (The roofline only measures: it runs as it finds its arrays.)
        cdef bint serial32 = self.serial or (
            not roofline and f32.ntensors > 0
            and self.f32.grads_may_alias(self.owners, self.with_momentum, FASTSGD_F32))
        cdef bint serial64 = self.serial or (
            not roofline and f64.ntensors > 0
            and self.f64.grads_may_alias(self.owners, self.with_momentum, FASTSGD_F64))
        with nogil:
            if f32.ntensors:
                if roofline:
                    kernels.stream(impl, FASTSGD_F32, &f32, serial32)
                else:
                    kernels.sgd(impl, FASTSGD_F32, &self.hyper, &f32, serial32)
            if f64.ntensors:
                if roofline:
                    kernels.stream(impl, FASTSGD_F64, &f64, serial64)
                else:
                    kernels.sgd(impl, FASTSGD_F64, &self.hyper, &f64, serial64)

    cdef int commit(self, object state) except -1:
        """Store the buffers this step created and let go of the arrays."""
        self.f32.clear()
        self.f64.clear()
        cdef Py_ssize_t i
        for i, buf in self.new_buffers:
            state[self.cached_params[i]]["momentum_buffer"] = buf
        return 0
