# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Which kernel runs and on how many threads.

This module owns the C library in csrc/: the kernel chosen at import (the
best this CPU runs), the OpenMP thread count and the size below which a call
stays on one thread.  The other native modules call the kernels through the
functions of kernels.pxd.
"""
from libc.stdint cimport int64_t


cdef extern from "fastsgd.h" nogil:
    const fastsgd_impl *fastsgd_find_impl(const char *name)
    const fastsgd_impl *fastsgd_best_impl()
    const char *const *fastsgd_impl_names()
    void fastsgd_sgd(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                     const fastsgd_tensor_list *list, int serial)
    void fastsgd_stream(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                        int serial)
    void fastsgd_norms(const fastsgd_impl *impl, int dtype, int64_t ntensors,
                       const void **arrays, const int64_t *sizes, double p, double *norms)
    void fastsgd_scale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                       const int64_t *sizes, double coef)
    void fastsgd_clamp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                       const int64_t *sizes, double lo, double hi)
    int fastsgd_unscale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                        const int64_t *sizes, float inv_scale)
    void fastsgd_lerp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **avgs,
                      const void **curs, const int64_t *sizes, double weight)
    void fastsgd_mean(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **avgs,
                      const void **curs, const int64_t *sizes, double count)
    int fastsgd_grads_finite(const fastsgd_impl *impl, int dtype,
                             const fastsgd_tensor_list *list, int serial)
    void fastsgd_copy_transposing(char *dst, const int64_t *dst_strides, const char *src,
                                  const int64_t *src_strides, const int64_t *shape, int ndim,
                                  int a, int b, int itemsize)
    void fastsgd_sgd_strided(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                             void *p, const void *g, void *b, int64_t n, int first,
                             const uint8_t *modes)
    void fastsgd_sgd_master(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                            const fastsgd_tensor_list *list, float inv_scale, int serial)
    void fastsgd_stream_master(const fastsgd_impl *impl, int dtype,
                               const fastsgd_tensor_list *list, int serial)
    int fastsgd_get_num_threads()
    void fastsgd_set_num_threads(int n)
    int fastsgd_has_openmp()
    int fastsgd_threads_for(int dtype, int64_t total, int with_buffers)
    int fastsgd_parallel_ranges(int64_t n, int64_t min_per_thread, fastsgd_range_fn fn,
                                void *ctx)
    int64_t fastsgd_get_parallel_min_bytes()
    void fastsgd_set_parallel_min_bytes(int64_t nbytes)


cdef extern from *:
    """
    /* Steps of different optimizers may run on several threads at once,
     * each without the GIL. */
    static Py_ssize_t fastsgd_kernel_calls = 0;
    static inline void fastsgd_count_kernel_call(void)
    {
        __atomic_fetch_add(&fastsgd_kernel_calls, 1, __ATOMIC_RELAXED);
    }
    """
    Py_ssize_t _kernel_calls "fastsgd_kernel_calls"
    void _count_kernel_call "fastsgd_count_kernel_call"() nogil


cdef const fastsgd_impl *_impl = fastsgd_best_impl()


# csrc/fastsgd.h's model of torch's 16-bit loops, for fastsgd/_tensor_iterator.py: the
# vector loop's stride, and the bit of each op of a step in a strided tensor's modes
HALF_CHUNK = FASTSGD_HALF_CHUNK
STEP_OPS = {"neg": FASTSGD_OP_NEG, "weight_decay": FASTSGD_OP_WEIGHT_DECAY,
            "mul": FASTSGD_OP_MUL, "buf": FASTSGD_OP_BUF, "nesterov": FASTSGD_OP_NESTEROV,
            "param": FASTSGD_OP_PARAM}


def available_capabilities():
    """Names of the kernels this build has and this CPU runs, in order of
    preference."""
    cdef const char *const *names = fastsgd_impl_names()
    found = []
    cdef Py_ssize_t i = 0
    while names[i] != NULL:
        if fastsgd_find_impl(names[i]) != NULL:
            found.append(names[i].decode())
        i += 1
    return found


def cpu_capability():
    """Name of the kernel every step uses."""
    return _impl.name.decode()


def set_cpu_capability(name):
    """Use the kernel called `name` (see available_capabilities())."""
    global _impl
    cdef const fastsgd_impl *impl = fastsgd_find_impl(str(name).encode())
    if impl == NULL:
        raise ValueError(
            f"unknown or unsupported CPU capability {name!r}; "
            f"this machine runs {available_capabilities()}")
    _impl = impl


def get_num_threads():
    """Threads a step may use (OpenMP's, so OMP_NUM_THREADS and threadpoolctl
    apply); 1 in a build without OpenMP."""
    return fastsgd_get_num_threads()


def set_num_threads(int n):
    """Let steps use up to n threads (small steps use fewer)."""
    if n < 1:
        raise ValueError(f"number of threads must be at least 1, but got {n}")
    fastsgd_set_num_threads(n)


def parallel_threshold(nbytes=None):
    """Memory traffic per thread (bytes) below which a step uses fewer
    threads; sets it when nbytes is given, returns the value in force."""
    if nbytes is not None:
        fastsgd_set_parallel_min_bytes(nbytes)
    return fastsgd_get_parallel_min_bytes()


def has_openmp():
    """Whether this build runs steps on several threads."""
    return bool(fastsgd_has_openmp())


def native_call_count():
    """How many times a C kernel has been called in this process (lets tests
    check that a step makes one call per group and dtype, not per tensor)."""
    return _kernel_calls


cdef const fastsgd_impl *kernel() noexcept nogil:
    return _impl


cdef void sgd(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
              const fastsgd_tensor_list *lst, bint serial) noexcept nogil:
    _count_kernel_call()
    fastsgd_sgd(impl, dtype, h, lst, serial)


cdef void copy_transposing(char *dst, const int64_t *dst_strides, const char *src,
                           const int64_t *src_strides, const int64_t *shape, int ndim, int a,
                           int b, int itemsize) noexcept nogil:
    fastsgd_copy_transposing(dst, dst_strides, src, src_strides, shape, ndim, a, b, itemsize)


cdef void sgd_strided(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h, void *p,
                      const void *g, void *b, int64_t n, bint first,
                      const uint8_t *modes) noexcept nogil:
    _count_kernel_call()
    fastsgd_sgd_strided(impl, dtype, h, p, g, b, n, first, modes)


cdef void stream(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *lst,
                 bint serial) noexcept nogil:
    _count_kernel_call()
    fastsgd_stream(impl, dtype, lst, serial)


cdef void norms(const fastsgd_impl *impl, int dtype, int64_t ntensors, const void **arrays,
                const int64_t *sizes, double p, double *out) noexcept nogil:
    fastsgd_norms(impl, dtype, ntensors, arrays, sizes, p, out)


cdef void scale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                const int64_t *sizes, double coef) noexcept nogil:
    fastsgd_scale(impl, dtype, ntensors, arrays, sizes, coef)


cdef void clamp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                const int64_t *sizes, double lo, double hi) noexcept nogil:
    fastsgd_clamp(impl, dtype, ntensors, arrays, sizes, lo, hi)


cdef void lerp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **avgs,
               const void **curs, const int64_t *sizes, double weight) noexcept nogil:
    fastsgd_lerp(impl, dtype, ntensors, avgs, curs, sizes, weight)


cdef void mean(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **avgs,
               const void **curs, const int64_t *sizes, double count) noexcept nogil:
    fastsgd_mean(impl, dtype, ntensors, avgs, curs, sizes, count)


# ---- half precision (issue 14)
cdef bint unscale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                  const int64_t *sizes, float inv_scale) noexcept nogil:
    return fastsgd_unscale(impl, dtype, ntensors, arrays, sizes, inv_scale) != 0


cdef bint grads_finite(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *lst,
                       bint serial) noexcept nogil:
    return fastsgd_grads_finite(impl, dtype, lst, serial) != 0


cdef void sgd_master(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                     const fastsgd_tensor_list *lst, float inv_scale, bint serial) noexcept nogil:
    _count_kernel_call()
    fastsgd_sgd_master(impl, dtype, h, lst, inv_scale, serial)


cdef void stream_master(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *lst,
                        bint serial) noexcept nogil:
    _count_kernel_call()
    fastsgd_stream_master(impl, dtype, lst, serial)
# ----


cdef int threads_for(int dtype, int64_t total, bint with_buffers) noexcept nogil:
    return fastsgd_threads_for(dtype, total, with_buffers)


cdef int parallel_ranges(int64_t n, int64_t min_per_thread, fastsgd_range_fn fn,
                         void *ctx) noexcept nogil:
    return fastsgd_parallel_ranges(n, min_per_thread, fn, ctx)
