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
from cpython.dict cimport PyDict_Check, PyDict_GetItem, PyDict_GetItemWithError
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free
from cpython.object cimport PyObject
from libc.stdlib cimport qsort
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

from fastsgd._native cimport kernels
from fastsgd._native.batch cimport (StagingJob, dtype_of, grow, hold, hold_shared, let_go,
                                    may_alias, or_shared, put_entry)
from fastsgd._native.kernels cimport (FASTSGD_BF16, FASTSGD_F16, FASTSGD_F32, FASTSGD_NDTYPES,
                                      FASTSGD_NEW_BUF, FASTSGD_NEW_MASTER, fastsgd_impl,
                                      fastsgd_tensor_list)
from fastsgd._native.objects cimport (DENSE, GRAD_OFFSET, PARAMETER_TYPE, PyListObject,
                                      PyTupleObject, array_ptr, dense_like, grad_of, grad_slot,
                                      init_objects, kernel_dtype, refresh_bfloat16, size_of,
                                      type_of)
from fastsgd._native.rules cimport (check_step_alphas, check_tensor, explain_master_rejection,
                                    flag_option, master_steps_as_is, option, read_hyper,
                                    same_strides, sharing, sharing_reason, span_of, steps_as_is,
                                    where)

from fastsgd import _tensor_iterator
from fastsgd.optimizer import ParamState
from fastsgd.parameter import Parameter

cnp.import_array()
init_objects()

NO_AUTOGRAD = "fastsgd has no autograd: differentiable=True is not supported"

cdef Py_ssize_t _parallel_stagings = 0
# Below this many elements numpy's own copy is as fast (the arrays fit in cache)
cdef Py_ssize_t _TILED_COPY_MIN = 4096


def parallel_staging_count():
    """How many groups have been staged on several threads in this process
    (lets tests check that they exercise that path)."""
    return _parallel_stagings


def _first_overlap_across_dtypes(params):
    """Position of the first parameter sharing memory with one of another
    dtype in params, or -1."""
    spans = sorted((a.__array_interface__["data"][0], a.nbytes, i, a.dtype)
                   for i, a in enumerate(params)
                   if isinstance(a, np.ndarray) and a.nbytes)
    reach = {}  # how far the spans of each dtype reach so far
    for start, nbytes, i, dtype in spans:
        if any(start < end for other, end in reach.items() if other != dtype):
            return i
        reach[dtype] = max(reach.get(dtype, 0), start + nbytes)
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
# (_FOUND_ANY << dtype) and some grad that may alias (_FOUND_ALIAS << dtype);
# a parameter without grad; a tensor outside the steady state.
cdef enum:
    _FOUND_ANY = 1
    _FOUND_ALIAS = 1 << FASTSGD_NDTYPES
    _FOUND_NO_GRAD = 1 << (2 * FASTSGD_NDTYPES)
    _FOUND_SLOW = 1 << (2 * FASTSGD_NDTYPES + 1)


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
        job.results[i] = FASTSGD_NDTYPES * size + dtype
        put_entry(job, i, <array_ptr>param, grad, buf, size)
        job.buf_is_new[dtype][i] = False
        job.held[dtype][2 * i] = grad
        job.held[dtype][2 * i + 1] = NULL  # the plan holds the buffer
        hold_shared(grad)
        found |= _FOUND_ANY << dtype
        if may_alias(<array_ptr>grad, (<array_ptr>param).data,
                     &job.clean_grads[dtype][2 * i], job.owner_slots, job.owner_mask):
            found |= _FOUND_ALIAS << dtype
    or_shared(&job.found, found)


cdef class GroupPlan:

    def __cinit__(self):
        self.batches = tuple(Batch() for _ in range(FASTSGD_NDTYPES))
        self.owners = Owners()
        self.new_buffers = []
        self.new_masters = []
        self.master_arrays = []
        self.stagings = []

    def __dealloc__(self):
        self.end_staging()  # a step that raised between staging and scatter()
        PyMem_Free(self.staged)
        PyMem_Free(self.spans)

    cdef int read_options(self, dict options, Py_ssize_t group_index) except -1:
        read_hyper(options, group_index, &self.hyper)
        self.with_momentum = self.hyper.momentum != 0.0
        # present only when True (fastsgd.SGD): one lookup
        self.master_weights = (PyDict_GetItemWithError(options, "master_weights") != NULL
                               and flag_option(options, "master_weights", group_index))
        return 0

    cdef void clear_batches(self) noexcept:
        cdef int d
        cdef Batch batch
        for d in range(FASTSGD_NDTYPES):
            if self.in_use & (1 << d):
                batch = self.batch(d)
                batch.clear()
                batch.with_masters = False
        self.in_use = 0

    cdef int reset(self, Py_ssize_t n) except -1:
        self.clear_batches()
        self.end_staging()
        cdef int d
        if n > self.batch(0).capacity:
            self.staged = <int64_t *>grow(self.staged, n * sizeof(int64_t))
            for d in range(FASTSGD_NDTYPES):
                self.batch(d).reserve(n)
        if self.new_buffers:
            del self.new_buffers[:]
        if self.new_masters:
            del self.new_masters[:]
        if self.master_arrays:
            del self.master_arrays[:]
        return 0

    cdef int stage(self, Py_ssize_t index, object param, object grad, object buf,
                   Py_ssize_t group_index) except -1:
        """Check one tensor and add it to the batch of its dtype."""
        cdef bint buf_is_new = False
        cdef Py_ssize_t size = -1
        refresh_bfloat16()  # a first bfloat16 tensor: recognise it from now on
        if not self.with_momentum:
            buf = None
        elif buf is None and self.earlier_buffers is not None and param in self.earlier_buffers:
            buf = self.earlier_buffers[param]  # an earlier group's run fills it first
        elif buf is None:
            if steps_as_is(<PyObject *>param, <PyObject *>grad, NULL) >= 0:
                buf = _empty_like(param, cnp.PyArray_TYPE(<cnp.ndarray>param))
            else:
                check_tensor(param, grad, None, group_index, index)
                buf = self.staged_buffer(param, grad)
            buf_is_new = True
            self.new_buffers.append((index, buf))
        # Checked after the last Python code above could run (a lookup's
        # __eq__, a collection during an allocation), right before add().
        size = steps_as_is(<PyObject *>param, <PyObject *>grad,
                           <PyObject *>buf if buf is not None else NULL)
        if size < 0:
            check_tensor(param, grad, buf, group_index, index)  # raises, or it is staged
            return self.stage_copies(index, param, grad, buf, buf_is_new)
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
                f"parameter of another dtype in its group; a step updates each dtype of a "
                f"group (float32, float64, float16, bfloat16) in its own pass, so it cannot "
                f"keep their order: put them in different groups or stop sharing the memory")
        # Staging reads the parameters from the cache's tuple (the list's
        # items, by cache_holds), not from the list: stage_slowly can run
        # Python code (a .grad property, a finalizer) that changes the list.
        cdef Py_ssize_t i, n = PyTuple_GET_SIZE(self.cached_params)
        self.reset(n)
        if self.master_weights:
            return self.stage_master_group(state, group_index)
        # A looked-up buffer is never in the steady state: staging threads
        # would hand such a group back every step.
        if (n >= 2 * MIN_TENSORS_PER_STAGING_THREAD and not self.looks_up_buffers
                and self.stage_in_parallel(n)):
            return self.check_alphas(group_index)
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
        if self.staged_count:
            self.check_staged_apart(None, None, None, state, group_index)
        return self.check_alphas(group_index)

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
        cdef int d
        for d in range(FASTSGD_NDTYPES):
            self.batch(d).lend_arrays(&job, d)
        job.owner_slots = self.owners.slots
        job.owner_mask = self.owners.mask
        job.found = 0
        for d in range(FASTSGD_NDTYPES):
            self.batch(d).sync_clean_grads(self.owners)
        if kernels.parallel_ranges(n, MIN_TENSORS_PER_STAGING_THREAD, _stage_range,
                                   &job) <= 1:
            return False
        self.in_use |= job.found & ((1 << FASTSGD_NDTYPES) - 1)
        cdef int64_t result
        cdef int layout = job.found & ~(_FOUND_ALIAS * ((1 << FASTSGD_NDTYPES) - 1))
        cdef int only = -1  # the one dtype found, if one
        for d in range(FASTSGD_NDTYPES):
            if layout == _FOUND_ANY << d:
                only = d
        if only >= 0:
            # one dtype, no gaps: the entries are in place
            self.batch(only).count = n
        else:
            # compacted per dtype, so that the held grads end up in
            # [0, count) of their batch, where clear() lets go of them
            for i in range(n):
                result = self.staged[i]
                if result >= 0:
                    self.batch(result % FASTSGD_NDTYPES).keep(i)
        for d in range(FASTSGD_NDTYPES):
            self.batch(d).grads_alias = (job.found & (_FOUND_ALIAS << d)) != 0
        if job.found & _FOUND_SLOW:
            self.clear_batches()
            return False
        _parallel_stagings += 1
        return True

    cdef int stage_slowly(self, Py_ssize_t i, object param, object state,
                          Py_ssize_t group_index) except -1:
        """Everything the steady state does not cover: other types, first
        steps, buffers looked up per step, and rejections."""
        grad = _grad_of_parameter(param, i, group_index)
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
        if self.staged_count:
            self.check_staged_apart(params, grads, buffers if self.with_momentum else None,
                                    None, -1)
        return self.check_alphas(-1)

    cdef void run(self, bint roofline, float inv_scale):
        """Run every dtype's batch; inv_scale multiplies the grads of a
        master-weights step (1 without GradScaler)."""
        cdef const fastsgd_impl *impl = kernels.kernel()
        cdef fastsgd_tensor_list lists[FASTSGD_NDTYPES]
        cdef bint serial[FASTSGD_NDTYPES]
        cdef bint masters[FASTSGD_NDTYPES]
        cdef int d
        cdef Batch batch
        for d in range(FASTSGD_NDTYPES):
            lists[d].ntensors = 0
            if not self.in_use & (1 << d):
                continue
            batch = self.batch(d)
            lists[d] = batch.as_list(self.with_momentum)
            masters[d] = batch.with_masters
            # A grad that is another tensor's parameter or buffer must be
            # read after (or before) that tensor's update, in order, as torch
            # does.  (The roofline only measures: it runs as it finds its arrays.)
            serial[d] = self.serial or (
                not roofline and lists[d].ntensors > 0
                and batch.grads_may_alias(self.owners, self.with_momentum, d))
        with nogil:
            for d in range(FASTSGD_NDTYPES):
                if lists[d].ntensors == 0:
                    continue
                if roofline:
                    kernels.stream(impl, d, &lists[d], serial[d])
                elif masters[d]:
                    kernels.sgd_master(impl, d, &self.hyper, &lists[d], inv_scale, serial[d])
                else:
                    kernels.sgd(impl, d, &self.hyper, &lists[d], serial[d])
        if self.staged_count and not roofline:
            self.run_by_modes()

    cdef int commit(self, object state) except -1:
        """Copy the staged tensors' results back, store the buffers and
        masters this step created and let go of the arrays."""
        self.scatter()
        self.clear_batches()
        cdef Py_ssize_t i
        for i, buf in self.new_buffers:
            state[self.cached_params[i]]["momentum_buffer"] = buf
        for i, master in self.new_masters:
            state[self.cached_params[i]]["master_param"] = master
        if self.master_arrays:
            del self.master_arrays[:]
        return 0

    # ------------------------------------------------------ strided tensors

    cdef int stage_copies(self, Py_ssize_t index, object param, object grad, object buf,
                          bint buf_is_new) except -1:
        """Stage a tensor that passed the rules but not steps_as_is(): the
        kernel steps a contiguous copy of each of its arrays that is not
        dense in the layout of the parameter's copy (gather() fills the
        copies, scatter() writes the parameter and buffer back)."""
        while PyList_GET_SIZE(self.stagings) <= index:
            self.stagings.append(None)
        cdef Staging staging = <Staging>self.stagings[index]
        if staging is None:
            staging = Staging()
            self.stagings[index] = staging
        cdef object kernel_param = param
        if not cnp.PyArray_FLAGS(<cnp.ndarray>param) & DENSE:
            staging.param_copy = _copy_for(staging.param_copy, param)
            kernel_param = staging.param_copy
        cdef object kernel_grad = grad
        if not same_strides(<cnp.ndarray>grad, <cnp.ndarray>kernel_param):
            staging.grad_copy = _copy_for(staging.grad_copy, kernel_param)
            kernel_grad = staging.grad_copy
        cdef object kernel_buf = buf
        if buf is not None and not same_strides(<cnp.ndarray>buf, <cnp.ndarray>kernel_param):
            staging.buf_copy = _copy_for(staging.buf_copy, kernel_param)
            kernel_buf = staging.buf_copy
        staging.param = param
        staging.grad = grad
        staging.buf = buf
        staging.kernel_param = kernel_param
        staging.kernel_grad = kernel_grad
        staging.kernel_buf = kernel_buf
        # held as a batch holds its arrays (batch.pxd): gather() and scatter()
        # may release the GIL
        hold(<PyObject *>grad)
        if buf is not None:
            hold(<PyObject *>buf)
        self.staged_count += 1
        cdef Py_ssize_t size = size_of(<array_ptr>param)
        staging.by_modes = kernel_dtype(<array_ptr>param) >= FASTSGD_F16
        if staging.by_modes:
            # run() steps it alone, each op rounded as torch's loop of the op
            # reached the element; in the batch, with no elements, its
            # arrays are held and its alphas checked like the others'
            self.read_modes(staging, buf_is_new)
            staging.first = buf_is_new
            size = 0
        self.batch_of(<PyObject *>param).add(
            <PyObject *>kernel_param, <PyObject *>kernel_grad,
            <PyObject *>kernel_buf if buf is not None else NULL,
            size, buf_is_new, True)
        return 0

    cdef object staged_buffer(self, object param, object grad):
        """The new momentum buffer of a staged tensor: for 16-bit, laid out
        as torch lays out its first step's clone of the gradient, which
        decides how later steps round."""
        if kernel_dtype(<array_ptr>param) < FASTSGD_F16:
            return _empty_like(param, cnp.PyArray_TYPE(<cnp.ndarray>param))
        strides = _tensor_iterator.first_buffer_strides(
            param.shape, _tensor_iterator.element_strides(param),
            _tensor_iterator.element_strides(grad), maximize=self.hyper.maximize != 0,
            weight_decay=self.hyper.weight_decay != 0.0)
        return _tensor_iterator.empty_strided(param.shape, strides, param.dtype)

    cdef int read_modes(self, Staging staging, bint first) except -1:
        """staging.modes: per element of the kernel's copies, the ops torch
        computes in its vector body (fastsgd/_tensor_iterator.py), kept
        while the arrays' layouts and the options that pick the ops stay."""
        param, grad = staging.param, staging.grad
        buf = None if first else staging.buf
        key = (param.shape, param.strides, grad.strides, None if buf is None else buf.strides,
               self.hyper.maximize != 0, self.hyper.weight_decay != 0.0, self.with_momentum,
               self.hyper.nesterov != 0)
        if key == staging.modes_key:
            return 0
        modes = _tensor_iterator.step_modes(
            param.shape, *[None if a is None else _tensor_iterator.element_strides(a)
                           for a in (param, grad, buf)],
            maximize=key[4], weight_decay=key[5], momentum=key[6], nesterov=key[7])
        # in the memory order of the kernel's copies (order="K": dense, its
        # dimensions in the order of theirs)
        staging.modes = np.empty_like(staging.kernel_param, np.uint8)
        staging.modes[...] = modes
        staging.modes_key = key
        return 0

    cdef void run_by_modes(self) noexcept:
        """Step the staged 16-bit tensors (their copies), one call each."""
        cdef const fastsgd_impl *impl = kernels.kernel()
        cdef Staging staging
        cdef void *b
        for item in self.stagings:
            staging = <Staging>item
            if staging is None or staging.param is None or not staging.by_modes:
                continue
            b = (<array_ptr>staging.kernel_buf).data if staging.kernel_buf is not None else NULL
            with nogil:
                kernels.sgd_strided(impl, dtype_of(<array_ptr>staging.kernel_param),
                                    &self.hyper, (<array_ptr>staging.kernel_param).data,
                                    (<array_ptr>staging.kernel_grad).data, b,
                                    size_of(<array_ptr>staging.kernel_param), staging.first,
                                    <const uint8_t *>(<array_ptr>staging.modes).data)

    cdef int check_staged_apart(self, list params, list grads, list buffers, object state,
                                Py_ssize_t group_index) except -1:
        """Rule: a staged tensor's arrays share no memory with another
        tensor's of the group.  Its copies are filled before the group's
        kernel runs and written back after, so another tensor's update could
        not see its update, nor it theirs, in the group's order as in torch.
        The explicit lists of the functional API, or the cached group (params
        None)."""
        cdef Py_ssize_t i, j, count = 0, n
        cdef Staging staging
        n = len(params) if params is not None else PyTuple_GET_SIZE(self.cached_params)
        for i in range(n):
            staging = <Staging>self.stagings[i] if i < PyList_GET_SIZE(self.stagings) else None
            if staging is not None and staging.param is not None:
                self.add_span(&count, staging.param, i)
                self.add_span(&count, staging.grad, i)
                self.add_span(&count, staging.buf, i)
            elif params is not None:
                if grads[i] is not None:  # else not stepped
                    self.add_span(&count, params[i], i)
                    self.add_span(&count, grads[i], i)
                    if buffers is not None:
                        self.add_span(&count, buffers[i], i)
            else:
                param = <object>PyTuple_GET_ITEM(self.cached_params, i)
                grad = grad_of(param) if isinstance(param, Parameter) else None
                if grad is None:
                    continue  # not stepped
                self.add_span(&count, param, i)
                self.add_span(&count, grad, i)
                if self.with_momentum:
                    buf = <object>PyList_GET_ITEM(self.cached_buffers, i)
                    if buf is _LOOK_UP:
                        buf = _buffer_in_state(state, param, group_index, i)
                    self.add_span(&count, buf, i)
        qsort(self.spans, count, sizeof(Span), _by_low)
        cdef Span *a
        cdef Span *b
        cdef int shared
        for i in range(count):
            a = &self.spans[i]
            for j in range(i + 1, count):
                b = &self.spans[j]
                if b.low >= a.high:
                    break
                if a.position == b.position or not (a.staged or b.staged):
                    continue
                shared = 1 if a.dense and b.dense else sharing(<cnp.ndarray>a.array,
                                                               <cnp.ndarray>b.array)
                if shared:
                    if not b.staged or (a.staged and a.position > b.position):
                        a, b = b, a
                    raise ValueError(
                        f"{where(group_index, b.position)}: is stepped through contiguous "
                        f"copies (it is not contiguous), and its parameter, grad or "
                        f"momentum_buffer shares memory with those of "
                        f"{where(group_index, a.position)}{sharing_reason(shared)}; such a "
                        f"tensor must share memory with no other tensor of its group")
        return 0

    cdef int add_span(self, Py_ssize_t *count, object array, Py_ssize_t position) except -1:
        if not cnp.PyArray_Check(array):
            return 0
        if count[0] == self.spans_capacity:
            self.spans_capacity = 2 * self.spans_capacity + 16
            self.spans = <Span *>grow(self.spans, self.spans_capacity * sizeof(Span))
        cdef Span *span = &self.spans[count[0]]
        span_of(<cnp.ndarray>array, &span.low, &span.high)
        if span.low == span.high:
            return 0
        span.array = <PyObject *>array
        span.position = position
        span.staged = (position < PyList_GET_SIZE(self.stagings)
                       and self.stagings[position] is not None
                       and (<Staging>self.stagings[position]).param is not None)
        span.dense = (cnp.PyArray_FLAGS(<cnp.ndarray>array) & DENSE) != 0
        count[0] += 1
        return 0

    cdef int gather(self) except -1:
        """Fill the copies of the staged tensors, right before run()."""
        if not self.staged_count:
            return 0
        cdef Staging staging
        for item in self.stagings:
            staging = <Staging>item
            if staging is None or staging.param is None:
                continue
            if staging.kernel_param is not staging.param:
                _copy_into(staging.kernel_param, staging.param)
            if staging.kernel_grad is not staging.grad:
                _copy_into(staging.kernel_grad, staging.grad)
            if staging.kernel_buf is not staging.buf:
                _copy_into(staging.kernel_buf, staging.buf)
        return 0

    cdef int scatter(self) except -1:
        """Write the staged tensors' stepped copies back, right after run()."""
        if not self.staged_count:
            return 0
        cdef Staging staging
        for item in self.stagings:
            staging = <Staging>item
            if staging is None or staging.param is None:
                continue
            if staging.kernel_param is not staging.param:
                _copy_into(staging.param, staging.kernel_param)
            if staging.kernel_buf is not staging.buf:
                _copy_into(staging.buf, staging.kernel_buf)
        self.end_staging()
        return 0

    cdef void end_staging(self) noexcept:
        """Let go of the staged tensors' arrays (the copies are kept)."""
        if not self.staged_count:
            return
        cdef Staging staging
        for item in self.stagings:
            staging = <Staging>item
            if staging is None or staging.param is None:
                continue
            let_go(<PyObject *>staging.grad)
            if staging.buf is not None:
                let_go(<PyObject *>staging.buf)
            staging.param = staging.grad = staging.buf = None
            staging.kernel_param = staging.kernel_grad = staging.kernel_buf = None
            staging.by_modes = False
        self.staged_count = 0

    # ---------------------------------------------- half precision (issue 14)

    cdef int check_alphas(self, Py_ssize_t group_index) except -1:
        """torch's overflow error for an alpha of a float32 or 16-bit
        tensor's step (rules.pxd), for the alphas this step applies."""
        cdef int d
        cdef Py_ssize_t i
        cdef Batch batch
        cdef bint later_step
        for d in (FASTSGD_F32, FASTSGD_F16, FASTSGD_BF16):  # float64 takes any double
            if not self.in_use & (1 << d):
                continue
            batch = self.batch(d)
            later_step = False
            for i in range(batch.count):
                later_step = later_step or not batch.buf_is_new[i]
            check_step_alphas(&self.hyper, d, self.with_momentum, later_step, group_index)
        return 0

    cdef int stage_master_group(self, object state, Py_ssize_t group_index) except -1:
        """Stage a master-weights group, on the calling thread.  Its masters
        and buffers are float32 arrays beside 16-bit params: which of them
        share memory is decided afresh each step."""
        cdef Py_ssize_t i, n = PyTuple_GET_SIZE(self.cached_params)
        cdef dict pending = {}  # {param: (master, buf)} created for an earlier listing
        for i in range(n):
            self.stage_master(i, <object>PyTuple_GET_ITEM(self.cached_params, i), state,
                              pending, group_index)
        arrays = list(self.cached_params) + self.master_arrays[::2]
        self.serial = _any_overlap(arrays)
        self.owners.fill(arrays)
        return 0

    cdef int stage_master(self, Py_ssize_t i, object param, object state, dict pending,
                          Py_ssize_t group_index) except -1:
        """Check one master-weights tensor and add it to its dtype's batch,
        with a new float32 master (and buffer) on its first step."""
        grad = _grad_of_parameter(param, i, group_index)
        if grad is None:
            return 0
        refresh_bfloat16()
        master = buf = None
        param_state = state.get(param)
        if param_state is not None:
            if not PyDict_Check(param_state):
                raise TypeError(f"{where(group_index, i)}: optimizer.state of the parameter "
                                f"must be a dict, but got {type(param_state).__name__}")
            master = param_state.get("master_param")
            if self.with_momentum:
                buf = param_state.get("momentum_buffer")
        cdef int flags = 0
        if master is None or (self.with_momentum and buf is None):
            earlier = pending.get(param)
            if master is None:
                if earlier is not None:
                    master = earlier[0]
                else:
                    master = _empty_like(param, cnp.NPY_FLOAT32)
                    self.new_masters.append((i, master))
                    flags |= FASTSGD_NEW_MASTER
            if self.with_momentum and buf is None:
                if earlier is not None and earlier[1] is not None:
                    buf = earlier[1]
                else:
                    buf = _empty_like(param, cnp.NPY_FLOAT32)
                    self.new_buffers.append((i, buf))
                    flags |= FASTSGD_NEW_BUF
            pending[param] = (master, buf)
        # Checked after the last Python code above could run, right before
        # the batch takes the pointers.
        cdef Py_ssize_t size = master_steps_as_is(
            <PyObject *>param, <PyObject *>grad, <PyObject *>master,
            <PyObject *>buf if buf is not None else NULL)
        if size < 0:
            explain_master_rejection(param, grad, master, buf, group_index, i)
        cdef Batch batch = self.batch_of(<PyObject *>param)
        batch.with_masters = True
        batch.add_master(<PyObject *>param, <PyObject *>grad, <PyObject *>master,
                         <PyObject *>buf if buf is not None else NULL, size, flags)
        # held twice each for the step, as a batch holds a grad (batch.pxd)
        self.master_arrays += [master, master]
        if buf is not None:
            self.master_arrays += [buf, buf]
        return 0

    cdef bint grads_finite(self):
        """Whether every grad of the staged master-weights batches is finite
        (GradScaler's check, before anything is written)."""
        cdef const fastsgd_impl *impl = kernels.kernel()
        cdef fastsgd_tensor_list lst
        cdef int d
        cdef bint finite = True
        for d in range(FASTSGD_F16, FASTSGD_NDTYPES):  # float16, bfloat16
            lst = self.batch(d).as_list(self.with_momentum)
            if lst.ntensors:
                with nogil:
                    finite = kernels.grads_finite(impl, d, &lst, self.serial)
                if not finite:
                    return False
        return True


cdef object _grad_of_parameter(object param, Py_ssize_t i, Py_ssize_t group_index):
    """param.grad, once param is known to be a Parameter."""
    if not isinstance(param, Parameter):
        raise TypeError(f"{where(group_index, i)}: optimizer can only optimize "
                        f"Parameters, but got {type(param).__name__}")
    return grad_of(param)


cdef class Staging:
    pass


cdef int _by_low(const void *a, const void *b) noexcept nogil:
    cdef char *a_low = (<Span *>a).low
    cdef char *b_low = (<Span *>b).low
    return -1 if a_low < b_low else 1 if a_low > b_low else 0


cdef int _fastest(cnp.ndarray a) noexcept:
    """a's fastest-varying dimension (the smallest stride of a dimension
    longer than 1), or -1."""
    cdef int d, best = -1
    cdef Py_ssize_t stride, best_stride = 0
    for d in range(cnp.PyArray_NDIM(a)):
        stride = cnp.PyArray_STRIDE(a, d)
        stride = -stride if stride < 0 else stride  # (abs() would make Python ints)
        if cnp.PyArray_DIM(a, d) > 1 and (best < 0 or stride < best_stride):
            best, best_stride = d, stride
    return best


cdef int _copy_into(object dst, object src) except -1:
    """dst[...] = src between a staged array and its copy (same shape and
    dtype): tiled when their fastest dimensions differ (a transposed grad,
    say), where numpy's copy takes a cache miss per element."""
    cdef cnp.ndarray d = <cnp.ndarray>dst
    cdef cnp.ndarray s = <cnp.ndarray>src
    cdef int a = _fastest(d), b = _fastest(s)
    if a < 0 or b < 0 or a == b or cnp.PyArray_SIZE(d) < _TILED_COPY_MIN:
        cnp.PyArray_CopyInto(d, s)
        return 0
    with nogil:
        kernels.copy_transposing(<char *>cnp.PyArray_DATA(d), <int64_t *>cnp.PyArray_STRIDES(d),
                                 <char *>cnp.PyArray_DATA(s), <int64_t *>cnp.PyArray_STRIDES(s),
                                 <int64_t *>cnp.PyArray_DIMS(d), cnp.PyArray_NDIM(d), a, b,
                                 <int>cnp.PyArray_ITEMSIZE(d))
    return 0


cdef object _copy_for(object copy, object template):
    """copy if it can hold a copy of template (its shape, dtype and, for a
    dense template, strides), else a new array that can."""
    cdef cnp.ndarray t = <cnp.ndarray>template
    cdef cnp.ndarray c
    cdef int d
    if copy is not None:
        c = <cnp.ndarray>copy
        if (cnp.PyArray_TYPE(c) == cnp.PyArray_TYPE(t)
                and cnp.PyArray_NDIM(c) == cnp.PyArray_NDIM(t)
                and (not cnp.PyArray_FLAGS(t) & DENSE or same_strides(c, t))):
            for d in range(cnp.PyArray_NDIM(t)):
                if cnp.PyArray_DIM(c, d) != cnp.PyArray_DIM(t, d):
                    break
            else:
                return copy
    return dense_like(t)


cdef object _empty_like(object param, int typenum):
    """An uninitialised array of param's shape and memory order, of type
    typenum (a strided param's: its dimensions in the order of its strides,
    dense).  Not np.empty_like: it dispatches to a subclass's
    __array_function__, which may return anything."""
    if not cnp.PyArray_FLAGS(<cnp.ndarray>param) & DENSE:
        # (a momentum buffer: masters exist only for dense 16-bit params)
        return dense_like(param)
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>param),
                             cnp.PyArray_DIMS(<cnp.ndarray>param), typenum,
                             not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>param))
