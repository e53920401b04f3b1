/* fastsgd's C ABI: multi-tensor SGD, roofline, clipping and averaging kernels over raw
 * float32/float64/float16/bfloat16 buffers, the choice of kernel and the
 * threads.
 *
 * The kernels only compute: the caller (fastsgd/_native/, whose rules.pxd
 * states the checks) has already checked that every pointer is valid for
 * `sizes[t]` elements of the list's dtype, that the param, grad and buffer
 * of a tensor do not partially overlap, and that `bufs` is non-NULL
 * whenever momentum != 0.  They never fail, allocate nothing, call no
 * Python and may run without the GIL.  Each function below says what it
 * reads and what it writes; it touches nothing else. */
#ifndef FASTSGD_H
#define FASTSGD_H

#include <stdint.h>

typedef struct {
    /* -lr, computed by the caller as torch's Python computes `alpha=-lr`:
     * a negation the kernel could see would let the compiler turn
     * fma(d, -lr, p) into a negated multiply-add, which gives NaN lrs the
     * opposite sign in the scalar remainder than in the vector body. */
    double neg_lr;
    double momentum;
    double dampening;
    double weight_decay;
    int nesterov;
    int maximize;
} fastsgd_sgd_hyper;

/* float16 is IEEE binary16; bfloat16 the top half of a float32 (ml_dtypes'
 * and torch's).  Both are stored as uint16_t. */
enum { FASTSGD_F32 = 0, FASTSGD_F64 = 1, FASTSGD_F16 = 2, FASTSGD_BF16 = 3 };
#define FASTSGD_NDTYPES 4

/* torch's 16-bit kernels run a vector body over each tensor and its scalar
 * code over the last n % FASTSGD_HALF_CHUNK elements, which round
 * differently (measured on torch 2.13 at AVX2 and AVX-512 alike). */
#define FASTSGD_HALF_CHUNK 32

/* The ops of an SGD step (sgd_step.h), one bit each in the modes of a
 * strided 16-bit tensor: set where torch's loop of that op computes the
 * element in its vector body (fastsgd/_tensor_iterator.py decides). */
enum {
    FASTSGD_OP_NEG = 1,
    FASTSGD_OP_WEIGHT_DECAY = 2,
    FASTSGD_OP_MUL = 4,
    FASTSGD_OP_BUF = 8,
    FASTSGD_OP_NESTEROV = 16,
    FASTSGD_OP_PARAM = 32
};

/* Per-tensor flags of a master-weights step (buf_is_new's bits there). */
enum { FASTSGD_NEW_BUF = 1, FASTSGD_NEW_MASTER = 2 };

/* Every tensor of one dtype of a parameter group.  `buf_is_new[t]` marks a
 * tensor whose momentum buffer is uninitialised memory that this step fills
 * with the gradient (torch's first step: `buf = d.clone()`).  `bufs` and
 * `buf_is_new` are NULL when momentum is 0. */
typedef struct {
    int64_t ntensors;
    void *const *params;
    const void *const *grads;
    void *const *bufs;
    const uint8_t *buf_is_new;
    const int64_t *sizes;
    /* master weights: the float32 master copies (params are then the 16-bit
     * parameters, bufs float32 and buf_is_new the FASTSGD_NEW_* flags, never
     * NULL); NULL otherwise */
    void *const *masters;
} fastsgd_tensor_list;

/* One contiguous run of `n` elements of one tensor (p, g and b point at the
 * run's first element; b is NULL when momentum is 0).  For 16-bit dtypes,
 * the first n_body elements lie in torch's vector body, the others in its
 * scalar remainder -- unless `modes` is not NULL: then each element's ops
 * round as modes[i]'s FASTSGD_OP_* bits say (a strided tensor's copy).
 * float32 and float64 ignore both. */
typedef void (*fastsgd_sgd_range_fn)(const fastsgd_sgd_hyper *h, void *p, const void *g,
                                     void *b, int64_t n, int first_step, int64_t n_body,
                                     const uint8_t *modes);
/* The roofline: the same reads and writes per element as an SGD step, with
 * next to no arithmetic. */
typedef void (*fastsgd_stream_range_fn)(void *p, const void *g, void *b, int64_t n);

/* Gradient clipping over one array of n elements: its p-norm (accumulated
 * in double, in a fixed order: see clip_loop.h), g *= coef, and
 * g = clamp(g, lo, hi), each with the coefficients rounded to the dtype. */
typedef double (*fastsgd_norm_fn)(const void *g, int64_t n, double p);
typedef void (*fastsgd_scale_fn)(void *g, int64_t n, double coef);
typedef void (*fastsgd_clamp_fn)(void *g, int64_t n, double lo, double hi);

/* ---- half precision (issue 14) */
/* GradScaler's unscale of one array: g *= inv_scale (torch's
 * _amp_non_finite_check_and_unscale_); returns 1 if an element was inf or
 * NaN.  And the check alone: 1 if every element is finite. */
typedef int (*fastsgd_unscale_fn)(void *g, int64_t n, float inv_scale);
typedef int (*fastsgd_finite_fn)(const void *g, int64_t n);
/* A run of a master-weights step (master_loop.h): p the 16-bit parameter,
 * g its 16-bit grad, b the float32 buffer (NULL when momentum is 0),
 * master the float32 master; flags FASTSGD_NEW_*; the grad is multiplied
 * by inv_scale (1 without GradScaler). */
typedef void (*fastsgd_master_range_fn)(const fastsgd_sgd_hyper *h, void *p, const void *g,
                                        void *b, void *master, int64_t n, int flags,
                                        float inv_scale);
/* The roofline of a master-weights step: its reads and writes per element. */
typedef void (*fastsgd_stream_master_fn)(void *p, const void *g, void *b, void *master,
                                         int64_t n);
/* ---- */

/* Weight averaging over one pair of arrays of n elements (average_loop.h):
 * avg = lerp(avg, cur, weight) and avg = avg + (cur - avg) / count. */
typedef void (*fastsgd_average_fn)(void *avg, const void *cur, int64_t n, double x);

/* One implementation: an instruction set and its rounding, per dtype. */
typedef struct {
    const char *name;
    fastsgd_sgd_range_fn sgd[FASTSGD_NDTYPES];
    fastsgd_stream_range_fn stream[FASTSGD_NDTYPES];
    fastsgd_norm_fn norm[FASTSGD_NDTYPES];
    fastsgd_scale_fn scale[FASTSGD_NDTYPES];
    fastsgd_clamp_fn clamp[FASTSGD_NDTYPES];
    /* ---- half precision (issue 14); master[] is NULL for float32/float64 */
    fastsgd_unscale_fn unscale[FASTSGD_NDTYPES];
    fastsgd_finite_fn finite[FASTSGD_NDTYPES];
    fastsgd_master_range_fn master[FASTSGD_NDTYPES];
    fastsgd_stream_master_fn stream_master;
    /* ---- */
    fastsgd_average_fn lerp[FASTSGD_NDTYPES];
    fastsgd_average_fn mean[FASTSGD_NDTYPES];
} fastsgd_impl;

/* The implementation called `name`, or NULL if this build or this CPU lacks
 * it.  "default" rounds as torch at ATEN_CPU_CAPABILITY=default (multiply,
 * round, add, round); "portable", "avx2" and "avx512" as torch's vectorised
 * kernels (one fused multiply-add per `x.add(y, alpha=a)`; for 16-bit
 * dtypes, each tensor's last n % 32 elements as torch's scalar remainder),
 * bit-identical to each other. */
const fastsgd_impl *fastsgd_find_impl(const char *name);

/* The implementation whose rounding torch uses on this CPU, fastest first. */
const fastsgd_impl *fastsgd_best_impl(void);

/* Names of every implementation compiled in, NULL-terminated. */
const char *const *fastsgd_impl_names(void);

/* One SGD step of every tensor of `list`, split over threads unless
 * `serial` (tensors of the list share memory and must step in order).
 * Reads *h, the list, params[t], grads[t] and (when momentum != 0 and not
 * buf_is_new[t]) bufs[t]; writes params[t] and, when momentum != 0,
 * bufs[t], each element once, for t < ntensors. */
void fastsgd_sgd(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                 const fastsgd_tensor_list *list, int serial);

/* One SGD step of one 16-bit tensor of n elements laid out contiguously
 * (a strided tensor's copies), on the calling thread, each element's ops
 * rounded as modes[i] says; first: its buffer is new (torch's clone). */
void fastsgd_sgd_strided(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                         void *p, const void *g, void *b, int64_t n, int first,
                         const uint8_t *modes);

/* Copies the strided array src into dst, both of `shape` (ndim dimensions,
 * at most FASTSGD_MAX_DIMS) and elements of itemsize 2, 4 or 8 bytes, with
 * byte strides; dim a is dst's fastest-varying dimension, b (!= a) src's.
 * Reads src and writes dst, each element once, in tiles of both. */
#define FASTSGD_MAX_DIMS 64
void fastsgd_copy_transposing(char *dst, const int64_t *dst_strides, const char *src,
                              const int64_t *src_strides, const int64_t *shape, int ndim,
                              int a, int b, int itemsize);

/* The roofline loop over `list`, split over threads exactly as fastsgd_sgd:
 * reads and writes the same arrays, with next to no arithmetic (the values
 * it leaves are meaningless: it is for timing only). */
void fastsgd_stream(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                    int serial);

/* The clipping loops over `ntensors` arrays of one dtype, one call for all,
 * on the calling thread.  fastsgd_norms reads arrays[t] and writes norms[t]
 * (the p-norm of arrays[t]); fastsgd_scale and fastsgd_clamp read and
 * write arrays[t] in place. */
void fastsgd_norms(const fastsgd_impl *impl, int dtype, int64_t ntensors,
                   const void *const *arrays, const int64_t *sizes, double p, double *norms);
void fastsgd_scale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *arrays,
                   const int64_t *sizes, double coef);
void fastsgd_clamp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *arrays,
                   const int64_t *sizes, double lo, double hi);

/* ---- half precision (issue 14) */
/* GradScaler's unscale of `ntensors` arrays of one dtype, in place, on the
 * calling thread; returns 1 if any element of any array was inf or NaN. */
int fastsgd_unscale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *arrays,
                    const int64_t *sizes, float inv_scale);

/* 1 if every grad of `list` is finite.  Reads grads[t] only; split over
 * threads as fastsgd_sgd. */
int fastsgd_grads_finite(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                         int serial);

/* One master-weights step of every tensor of `list` (dtype FASTSGD_F16 or
 * FASTSGD_BF16, list->masters set), split over threads as fastsgd_sgd.
 * Reads *h, the list, grads[t], params[t] (when FASTSGD_NEW_MASTER),
 * masters[t] (otherwise) and bufs[t] (when momentum != 0 and not
 * FASTSGD_NEW_BUF); writes masters[t], params[t] and, when momentum != 0,
 * bufs[t]. */
void fastsgd_sgd_master(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                        const fastsgd_tensor_list *list, float inv_scale, int serial);

/* The roofline of fastsgd_sgd_master: the same arrays read and written. */
void fastsgd_stream_master(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                           int serial);
/* ---- */

/* The averaging loops over `ntensors` pairs of arrays of one dtype, one
 * call for all, on the calling thread: each reads avgs[t] and curs[t] and
 * writes avgs[t] (avgs[t] and curs[t] are the same array or disjoint).
 * fastsgd_lerp: avgs[t] = lerp(avgs[t], curs[t], weight), torch's lerp_;
 * fastsgd_mean: avgs[t] += (curs[t] - avgs[t]) / count, op by op. */
void fastsgd_lerp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *avgs,
                  const void *const *curs, const int64_t *sizes, double weight);
void fastsgd_mean(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *avgs,
                  const void *const *curs, const int64_t *sizes, double count);

/* Threads a call may use (OpenMP's max threads, honouring OMP_NUM_THREADS);
 * 1 in a build without OpenMP.  Setting it writes OpenMP's process-wide
 * setting, which every library sharing the OpenMP runtime sees. */
int fastsgd_get_num_threads(void);
void fastsgd_set_num_threads(int n);

/* How many threads a call over `total` elements of `dtype` uses (with
 * momentum buffers or not), unless it must run serially (a master-weights
 * step moves more bytes per element, but is split as its 16-bit dtype). */
int fastsgd_threads_for(int dtype, int64_t total, int with_buffers);

/* Runs fn(ctx, begin, end) over [0, n), one range per thread, on as many
 * threads as have at least `min_per_thread` items each, and returns that
 * number -- unless it is 1: then fn is not called and the caller does the
 * work itself.  The callers hold the GIL, which keeps still the Python
 * objects fn reads; fn must not call into Python. */
typedef void (*fastsgd_range_fn)(void *ctx, int64_t begin, int64_t end);
int fastsgd_parallel_ranges(int64_t n, int64_t min_per_thread, fastsgd_range_fn fn, void *ctx);

/* Memory traffic per thread below which a call uses fewer threads: one
 * process-wide value, read by every call. */
int64_t fastsgd_get_parallel_min_bytes(void);
void fastsgd_set_parallel_min_bytes(int64_t bytes);

/* 1 if this build has OpenMP. */
int fastsgd_has_openmp(void);

#endif
