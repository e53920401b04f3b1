/* fastsgd: multi-tensor SGD kernels over raw float32/float64 buffers.
 *
 * The kernels only compute: the caller (fastsgd/_native.pyx) has already
 * checked that every pointer is valid for `sizes[t]` elements, that the
 * param, grad and buffer of a tensor do not partially overlap, and that
 * `bufs` is non-NULL whenever momentum != 0.  They never fail. */
#ifndef FASTSGD_H
#define FASTSGD_H

#include <stdint.h>

typedef struct {
    double lr;
    double momentum;
    double dampening;
    double weight_decay;
    int nesterov;
    int maximize;
} fastsgd_sgd_hyper;

/* One call updates every tensor of a group in place.  `buf_is_new[t]` marks
 * a tensor whose momentum buffer is uninitialised memory that this step must
 * fill with the gradient (torch's first step: `buf = d.clone()`). */
typedef void (*fastsgd_sgd_f32_fn)(const fastsgd_sgd_hyper *h, int64_t ntensors,
                                   float *const *params, const float *const *grads,
                                   float *const *bufs, const uint8_t *buf_is_new,
                                   const int64_t *sizes);
typedef void (*fastsgd_sgd_f64_fn)(const fastsgd_sgd_hyper *h, int64_t ntensors,
                                   double *const *params, const double *const *grads,
                                   double *const *bufs, const uint8_t *buf_is_new,
                                   const int64_t *sizes);

/* One implementation: an instruction set and its rounding. */
typedef struct {
    const char *name;
    fastsgd_sgd_f32_fn sgd_f32;
    fastsgd_sgd_f64_fn sgd_f64;
} fastsgd_impl;

/* The implementation called `name`, or NULL if this build or this CPU lacks it.
 * "default" always exists: torch's ATEN_CPU_CAPABILITY=default rounding
 * (multiply, round, add, round).  The others round like torch's vectorised
 * kernels: one fused multiply-add per `x.add(y, alpha=a)`. */
const fastsgd_impl *fastsgd_find_impl(const char *name);

/* The fastest implementation this CPU runs. */
const fastsgd_impl *fastsgd_best_impl(void);

/* Names of every implementation compiled in, NULL-terminated. */
const char *const *fastsgd_impl_names(void);

#endif
