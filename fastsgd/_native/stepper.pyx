# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The step: SGDStepper runs an optimizer's param_groups (every group
validated and staged before any is run), sgd() a step of explicit lists
(the functional API)."""
from cpython.dict cimport PyDict_Check
from cpython.list cimport PyList_GET_SIZE
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_get_thread_ident, PyThread_release_lock,
                               PyThread_type_lock)

from fastsgd._native.plan cimport GroupPlan

from fastsgd.optimizer import OptimizerState


cdef class SGDStepper:
    """Steps an optimizer's param_groups: every group is validated and staged
    before any is run, so a bad input anywhere leaves every array untouched.
    Steps of one stepper from several threads take turns."""
    cdef list plans
    cdef PyThread_type_lock lock
    cdef unsigned long holder  # the thread that holds the lock, else 0
    # GradScaler's request for the next steps (every group has master
    # weights): check every grad for inf/NaN before writing anything, skip
    # the step if one is (amp_skipped), else unscale by amp_inv_scale within it
    cdef public bint amp_unscale
    cdef public float amp_inv_scale
    cdef public bint amp_skipped

    def __cinit__(self):
        self.plans = []
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def step(self, list param_groups, object state):
        """Validate every group, then update every group (see amp_unscale)."""
        if self.amp_unscale:
            self.amp_skipped = not self._locked(param_groups, state, True, True,
                                                self.amp_inv_scale)
        else:
            self._locked(param_groups, state, True, False, 1.0)

    def validate(self, list param_groups, object state):
        """Raise what step() would raise, writing nothing."""
        self._locked(param_groups, state, False, False, 1.0)

    cdef int _locked(self, list param_groups, object state, bint run, bint check_finite,
                     float inv_scale) except -1:
        """1 if the groups were stepped, 0 if not (not run, or a grad not
        finite)."""
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            # Python code that a step runs (a .grad property, an option's
            # __float__) stepping the same optimizer would wait for itself.
            if self.holder == PyThread_get_thread_ident():
                raise RuntimeError("step() called during a step of the same optimizer")
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
        self.holder = PyThread_get_thread_ident()
        try:
            self._prepare_all(param_groups, state)
            if check_finite:
                for plan in self.plans:
                    if not (<GroupPlan>plan).grads_finite():
                        run = False
            for plan in self.plans:
                if run:
                    (<GroupPlan>plan).gather()
                    (<GroupPlan>plan).run(False, inv_scale)
                    (<GroupPlan>plan).commit(state)
                else:
                    (<GroupPlan>plan).reset(0)
        finally:
            self.holder = 0
            PyThread_release_lock(self.lock)
        return 1 if run else 0

    cdef int _prepare_all(self, list param_groups, object state) except -1:
        cdef Py_ssize_t g, n = len(param_groups)
        while len(self.plans) < n:
            self.plans.append(GroupPlan())
        if len(self.plans) > n:
            del self.plans[n:]
        version = OptimizerState.version if type(state) is OptimizerState else None
        cdef dict created = None  # buffers created by the groups staged so far
        cdef GroupPlan plan
        try:
            for g in range(n):
                # Staging runs Python code (option conversions, .grad
                # properties, hashes), which may shorten the caller's list.
                if g >= PyList_GET_SIZE(param_groups):
                    raise RuntimeError("optimizer.param_groups lost groups during step()")
                group = param_groups[g]
                if not PyDict_Check(group):
                    raise TypeError(f"param_groups[{g}] must be a dict, but got "
                                    f"{type(group).__name__}")
                plan = <GroupPlan>self.plans[g]
                plan.earlier_buffers = created
                plan.prepare_group(group, state, version, g)
                plan.earlier_buffers = None
                if plan.new_buffers:
                    if created is None:
                        created = {}
                    for i, buf in plan.new_buffers:
                        created[plan.cached_params[i]] = buf
        except BaseException:
            for plan in self.plans:
                plan.earlier_buffers = None
                plan.reset(0)
            raise
        return 0


def sgd(params, grads, momentum_buffers, dict options):
    """One step of explicit lists; returns [(position, new buffer), ...]."""
    cdef GroupPlan plan = GroupPlan()
    params = list(params)  # one hold on the params; the plan's arrays_held is the other
    plan.prepare_lists(params, list(grads), list(momentum_buffers), options)
    plan.gather()
    plan.run(False, 1.0)
    plan.scatter()
    plan.clear_batches()
    return plan.new_buffers
