# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The benchmark's rooflines: the least a step over these arrays can cost.

Outside the product's step path: fastsgd.bench times Roofline beside the
optimizers.  It reuses a GroupPlan's batches and the kernels' split over
threads, so that it streams exactly the memory a step does, the same way.
"""
from cpython.object cimport PyObject
from libc.stdint cimport int64_t

from fastsgd._native cimport kernels
from fastsgd._native.batch cimport Batch, StagingJob, dtype_of, put_entry
from fastsgd._native.kernels cimport FASTSGD_NDTYPES
from fastsgd._native.objects cimport (GRAD_OFFSET, PyListObject, array_ptr, grad_slot,
                                      init_objects, refresh_bfloat16, size_of)
from fastsgd._native.plan cimport MIN_TENSORS_PER_STAGING_THREAD, GroupPlan

from fastsgd.parameter import Parameter

init_objects()


cdef class Roofline:
    """The roofline of a step: the C streaming loop with the same reads and
    writes per element as SGD over these arrays, split over threads the same
    way.  Calling it runs one pass; it writes into params and buffers.

    With read_objects, each pass first finds the arrays from the Python
    objects, as a step must: each parameter's grad from its slot, and the
    data and shape of the parameter, its grad and its buffer (a pass covers
    the fewest elements of the three, so that it never runs past an array).
    It checks nothing else, and reads on as many threads as a step stages
    on, so it is the least a step of Python arrays costs: the objects sit
    apart from the arrays and are read cold after a backward pass.  It needs
    Parameters of one dtype whose grads stay the ones it was made with.

    With masters (float32 master copies of 16-bit Parameters, whose .grad
    are the grads given), the roofline of a master-weights step: the 16-bit
    grad read, master and buffer read and written, the 16-bit param written."""
    cdef GroupPlan plan
    cdef list params  # the batches point into them
    cdef list buffers  # None without momentum
    cdef Batch objects_batch  # the batch read_objects rewrites, else None
    cdef dict master_state  # with masters: the state the plan found them in

    def __init__(self, params, grads, momentum_buffers, read_objects=False, masters=None):
        refresh_bfloat16()  # this module's dtype_of recognises bfloat16 from now on
        self.params = list(params)
        self.plan = GroupPlan()
        if masters is not None:
            if read_objects or not all(type(p) is Parameter and p.grad is g
                                       for p, g in zip(self.params, grads)):
                raise ValueError("the master-weights roofline needs Parameters whose .grad "
                                 "are the grads given, and does not read objects")
            buffers = list(momentum_buffers) or [None] * len(self.params)
            self.master_state = {p: {"master_param": m, "momentum_buffer": b}
                                 for p, m, b in zip(self.params, masters, buffers)}
            group = {"params": self.params, "lr": 0.0, "momentum": 0.0 if buffers[0] is None
                     else 1.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
                     "maximize": False, "differentiable": False, "master_weights": True}
            self.plan.prepare_group(group, self.master_state, None, 0)
            if self.plan.new_buffers or self.plan.new_masters:
                raise ValueError("the roofline needs existing masters and momentum buffers")
            return
        options = {"lr": 0.0, "momentum": 1.0 if momentum_buffers else 0.0,
                   "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
                   "maximize": False}
        self.plan.prepare_lists(self.params, list(grads),
                                list(momentum_buffers) or [None] * len(self.params), options)
        if self.plan.new_buffers:
            raise ValueError("the roofline needs existing momentum buffers")
        if not read_objects:
            return
        if not (GRAD_OFFSET >= 0 and all(type(p) is Parameter for p in self.params)
                and len({p.dtype for p in self.params}) <= 1
                and all(g is not None and p.grad is g for p, g in zip(self.params, grads))):
            raise ValueError("reading objects needs Parameters of one dtype whose .grad "
                             "are the grads given")
        self.buffers = list(momentum_buffers) or None
        dtypes = [d for d in range(FASTSGD_NDTYPES) if self.plan.batch(d).count]
        self.objects_batch = self.plan.batch(dtypes[0] if dtypes else 0)

    def __call__(self):
        if self.objects_batch is not None:
            self.read_objects()
        self.plan.run(True, 1.0)

    cdef int read_objects(self) except -1:
        cdef Batch batch = self.objects_batch
        cdef StagingJob job
        job.params = (<PyListObject *>self.params).ob_item
        job.buffers = NULL if self.buffers is None else (<PyListObject *>self.buffers).ob_item
        job.results = self.plan.staged
        cdef int d
        for d in range(FASTSGD_NDTYPES):
            if self.plan.batch(d) is batch:
                batch.lend_arrays(&job, d)
        cdef Py_ssize_t i, n = batch.count
        # on as many threads as a step would stage these tensors on
        if kernels.parallel_ranges(n, MIN_TENSORS_PER_STAGING_THREAD, _read_objects,
                                   &job) <= 1:
            _read_objects(&job, 0, n)
        for i in range(n):
            if job.results[i] < 0:
                raise ValueError(f"params[{i}].grad changed since the roofline was made")
        return 0


cdef void _read_objects(void *job_, int64_t begin, int64_t end) noexcept nogil:
    """Roofline.read_objects for positions [begin, end), on any thread while
    the caller holds the GIL.  Refuses (results[i] = -1) a grad other than
    the one the batch holds: only that one is safe to read."""
    cdef StagingJob *job = <StagingJob *>job_
    cdef array_ptr param
    cdef PyObject *grad
    cdef PyObject *buf
    cdef int64_t i, size
    for i in range(begin, end):
        param = <array_ptr>job.params[i]
        grad = grad_slot(<PyObject *>param)
        if grad != job.held[dtype_of(param)][2 * i]:
            job.results[i] = -1
            continue
        job.results[i] = 0
        size = min(size_of(param), size_of(<array_ptr>grad))
        buf = job.buffers[i] if job.buffers != NULL else NULL
        if buf != NULL:
            size = min(size, size_of(<array_ptr>buf))
        put_entry(job, i, param, grad, buf, size)


cdef class TorchApiFloor:
    """The least a step of torch tensors costs through torch's public Python
    API, stepping nothing: per parameter, its grad and the grad's data pointer
    read, then every parameter's version counter bumped in one call (bump:
    torch.autograd.graph.increment_version), as torch's in-place ops would.
    Any adapter reading tensors through that API does at least this each step."""
    cdef list params
    cdef object bump

    def __init__(self, params, bump):
        self.params = list(params)
        self.bump = bump

    def __call__(self):
        for p in self.params:
            p.grad.data_ptr()
        self.bump(self.params)
