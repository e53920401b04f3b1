# The C kernels as the other native modules call them: csrc/fastsgd.h's types and calls.
#
# The C library is linked into fastsgd._native.kernels alone, so that the kernel in use and the
# thread settings exist once in a process; the other modules reach it through the functions below
# (one indirect call per group and dtype, never per tensor).
from libc.stdint cimport int64_t, uint8_t


cdef extern from "fastsgd.h" nogil:
    ctypedef struct fastsgd_sgd_hyper:
        double neg_lr
        double momentum
        double dampening
        double weight_decay
        int nesterov
        int maximize

    enum:
        FASTSGD_F32
        FASTSGD_F64
        FASTSGD_F16
        FASTSGD_BF16
        FASTSGD_NDTYPES
        FASTSGD_NEW_BUF
        FASTSGD_NEW_MASTER
        FASTSGD_HALF_CHUNK
        FASTSGD_OP_NEG
        FASTSGD_OP_WEIGHT_DECAY
        FASTSGD_OP_MUL
        FASTSGD_OP_BUF
        FASTSGD_OP_NESTEROV
        FASTSGD_OP_PARAM

    ctypedef struct fastsgd_tensor_list:
        int64_t ntensors
        void **params
        const void **grads
        void **bufs
        const uint8_t *buf_is_new
        const int64_t *sizes
        void **masters

    ctypedef struct fastsgd_impl:
        const char *name

    ctypedef void (*fastsgd_range_fn)(void *ctx, int64_t begin, int64_t end) noexcept


# The kernel every call uses now (see set_cpu_capability).
cdef const fastsgd_impl *kernel() noexcept nogil

# What csrc/fastsgd.h says of fastsgd_sgd, fastsgd_stream, fastsgd_norms, fastsgd_scale,
# fastsgd_clamp, fastsgd_threads_for and fastsgd_parallel_ranges holds for these.
cdef void sgd(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
              const fastsgd_tensor_list *lst, bint serial) noexcept nogil
cdef void stream(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *lst,
                 bint serial) noexcept nogil
# csrc/fastsgd.h's fastsgd_copy_transposing
cdef void copy_transposing(char *dst, const int64_t *dst_strides, const char *src,
                           const int64_t *src_strides, const int64_t *shape, int ndim, int a,
                           int b, int itemsize) noexcept nogil
# csrc/fastsgd.h's fastsgd_sgd_strided: one strided 16-bit tensor's contiguous copies
cdef void sgd_strided(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h, void *p,
                      const void *g, void *b, int64_t n, bint first,
                      const uint8_t *modes) noexcept nogil
cdef void norms(const fastsgd_impl *impl, int dtype, int64_t ntensors, const void **arrays,
                const int64_t *sizes, double p, double *out) noexcept nogil
cdef void scale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                const int64_t *sizes, double coef) noexcept nogil
cdef void clamp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                const int64_t *sizes, double lo, double hi) noexcept nogil
# csrc/fastsgd.h's fastsgd_lerp and fastsgd_mean
cdef void lerp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **avgs,
               const void **curs, const int64_t *sizes, double weight) noexcept nogil
cdef void mean(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **avgs,
               const void **curs, const int64_t *sizes, double count) noexcept nogil

# ---- half precision (issue 14): csrc/fastsgd.h's fastsgd_unscale, fastsgd_grads_finite,
# fastsgd_sgd_master and fastsgd_stream_master
cdef bint unscale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void **arrays,
                  const int64_t *sizes, float inv_scale) noexcept nogil
cdef bint grads_finite(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *lst,
                       bint serial) noexcept nogil
cdef void sgd_master(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                     const fastsgd_tensor_list *lst, float inv_scale, bint serial) noexcept nogil
cdef void stream_master(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *lst,
                        bint serial) noexcept nogil
# ----

cdef int threads_for(int dtype, int64_t total, bint with_buffers) noexcept nogil
cdef int parallel_ranges(int64_t n, int64_t min_per_thread, fastsgd_range_fn fn,
                         void *ctx) noexcept nogil
