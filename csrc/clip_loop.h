/* Grad-wise loops: gradient clipping's and GradScaler's, instantiated like
 * sgd_loop.h (same macros, plus SGD_C, the type an element is computed in,
 * SGD_WIDEN(x) and SGD_ROUND(c) between the two, SGD_BOUND(x) a double
 * bound rounded to the dtype (stored, as torch rounds a scalar),
 * SGD_NAN_ROUNDED(n) how many leading elements of n torch's clamp rounds
 * a NaN element in (the others keep its bits: n for float32 and float64,
 * where rounding keeps it anyway, so the check compiles away), SGD_NONFINITE(x) whether a stored element is
 * inf or NaN, and NORM_FN, SCALE_FN, CLAMP_FN, UNSCALE_FN
 * and FINITE_FN naming the functions to define).
 *
 * A norm accumulates in double over 8 interleaved partial results (element i
 * goes to partial i % 8), combined as ((0+1)+(2+3))+((4+5)+(6+7)) at the end:
 * a fixed order, so every instruction set gives the same bits, and 8
 * independent chains that the compiler can keep in vector registers. */

#define NORM_LANES 8

/* One element's absolute value `a` into a partial result of the p-norm. */
static inline __attribute__((always_inline)) SGD_TARGET double
SGD_FN_CAT(NORM_FN, _accumulate)(double part, double a, double p)
{
    if (p == 2.0)
        return part + a * a;
    if (p == 1.0)
        return part + a;
    if (p == INFINITY)  /* a NaN, once met, stays */
        return (a > part || a != a) ? a : part;
    if (p == -INFINITY)
        return (a < part || a != a) ? a : part;
    if (p == 0.0)
        return part + (a != 0.0);
    return part + pow(a, p);
}

SGD_TARGET static double NORM_FN(const void *g_, int64_t n, double p)
{
    const SGD_T *restrict g = (const SGD_T *)g_;
    double part[NORM_LANES];
    for (int k = 0; k < NORM_LANES; k++)
        part[k] = p == -INFINITY ? INFINITY : 0.0;
    int64_t i = 0;
    for (; i + NORM_LANES <= n; i += NORM_LANES)
        for (int k = 0; k < NORM_LANES; k++)
            part[k] = SGD_FN_CAT(NORM_FN, _accumulate)(part[k],
                                                       fabs((double)SGD_WIDEN(g[i + k])), p);
    for (int k = 0; i < n; i++, k++)  /* the remainder takes lanes 0, 1, ... */
        part[k] = SGD_FN_CAT(NORM_FN, _accumulate)(part[k], fabs((double)SGD_WIDEN(g[i])), p);
    if (n == 0)
        return 0.0;
    if (isinf(p)) {
        double r = part[0];
        for (int k = 1; k < NORM_LANES && k < n; k++)
            r = SGD_FN_CAT(NORM_FN, _accumulate)(r, part[k], p);
        return r;
    }
    const double sum = ((part[0] + part[1]) + (part[2] + part[3])) +
                       ((part[4] + part[5]) + (part[6] + part[7]));
    if (p == 1.0 || p == 0.0)
        return sum;
    return p == 2.0 ? sqrt(sum) : pow(sum, 1.0 / p);
}

/* g *= coef, coef rounded to the computing type, as torch's g.mul_(coef). */
SGD_TARGET static void SCALE_FN(void *g_, int64_t n, double coef)
{
    SGD_T *restrict g = (SGD_T *)g_;
    const SGD_C c = (SGD_C)coef;
    for (int64_t i = 0; i < n; i++)
        g[i] = SGD_ROUND(SGD_WIDEN(g[i]) * c);
}

/* g = clamp(g, lo, hi) as torch's clip_grad_value_ (clamp_min, then
 * clamp_max), the bounds rounded to the dtype: a NaN element stays NaN; a
 * NaN hi (the caller passes lo = -hi) makes every element hi's NaN. */
SGD_TARGET static void CLAMP_FN(void *g_, int64_t n, double lo, double hi)
{
    SGD_T *restrict g = (SGD_T *)g_;
    const SGD_T hi_stored = SGD_BOUND(hi);
    const SGD_C l = SGD_WIDEN(SGD_BOUND(lo)), h = SGD_WIDEN(hi_stored);
    if (h != h) {
        for (int64_t i = 0; i < n; i++)
            g[i] = hi_stored;
        return;
    }
    const int64_t n_nan_rounded = SGD_NAN_ROUNDED(n);
    for (int64_t i = 0; i < n; i++) {
        SGD_C x = SGD_WIDEN(g[i]);
        if (x != x && i >= n_nan_rounded)
            continue;
        x = x < l ? l : x;
        g[i] = SGD_ROUND(x > h ? h : x);
    }
}

/* GradScaler's unscale, as torch's _amp_non_finite_check_and_unscale_:
 * g *= inv_scale in the computing type (inv_scale a float32, widened for
 * float64 grads), every element; returns whether any element was inf or
 * NaN before. */
SGD_TARGET static int UNSCALE_FN(void *g_, int64_t n, float inv_scale)
{
    SGD_T *restrict g = (SGD_T *)g_;
    const SGD_C inv = (SGD_C)inv_scale;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        bad |= SGD_NONFINITE(g[i]);
        g[i] = SGD_ROUND(SGD_WIDEN(g[i]) * inv);
    }
    return bad;
}

/* 1 if every element is finite: a master-weights step with GradScaler reads
 * every grad with this before it writes anything. */
SGD_TARGET static int FINITE_FN(const void *g_, int64_t n)
{
    const SGD_T *restrict g = (const SGD_T *)g_;
    int bad = 0;
    for (int64_t i = 0; i < n; i++)
        bad |= SGD_NONFINITE(g[i]);
    return !bad;
}
