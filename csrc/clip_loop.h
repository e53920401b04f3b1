/* Gradient-clipping loops, instantiated like sgd_loop.h (same macros, plus
 * NORM_FN, SCALE_FN and CLAMP_FN naming the functions to define).
 *
 * A norm accumulates in double over 8 interleaved partial results (element i
 * goes to partial i % 8), combined as ((0+1)+(2+3))+((4+5)+(6+7)) at the end:
 * a fixed order, so every instruction set gives the same bits, and 8
 * independent chains that the compiler can keep in vector registers. */

#define NORM_LANES 8

/* One element into a partial result of the p-norm. */
static inline __attribute__((always_inline)) SGD_TARGET double
SGD_FN_CAT(NORM_FN, _accumulate)(double part, SGD_T x, double p)
{
    const double a = fabs((double)x);
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
            part[k] = SGD_FN_CAT(NORM_FN, _accumulate)(part[k], g[i + k], p);
    for (int k = 0; i < n; i++, k++)  /* the remainder takes lanes 0, 1, ... */
        part[k] = SGD_FN_CAT(NORM_FN, _accumulate)(part[k], g[i], p);
    if (n == 0)
        return 0.0;
    if (isinf(p)) {
        double r = part[0];
        for (int k = 1; k < NORM_LANES && k < n; k++)
            r = SGD_FN_CAT(NORM_FN, _accumulate)(r, (SGD_T)part[k], p);
        return r;
    }
    const double sum = ((part[0] + part[1]) + (part[2] + part[3])) +
                       ((part[4] + part[5]) + (part[6] + part[7]));
    if (p == 1.0 || p == 0.0)
        return sum;
    return p == 2.0 ? sqrt(sum) : pow(sum, 1.0 / p);
}

/* g *= (T)coef, as torch's g.mul_(coef). */
SGD_TARGET static void SCALE_FN(void *g_, int64_t n, double coef)
{
    SGD_T *restrict g = (SGD_T *)g_;
    const SGD_T c = (SGD_T)coef;
    for (int64_t i = 0; i < n; i++)
        g[i] = g[i] * c;
}

/* g = clamp(g, lo, hi) as torch's clamp_: a NaN stays NaN. */
SGD_TARGET static void CLAMP_FN(void *g_, int64_t n, double lo, double hi)
{
    SGD_T *restrict g = (SGD_T *)g_;
    const SGD_T l = (SGD_T)lo, h = (SGD_T)hi;
    for (int64_t i = 0; i < n; i++) {
        SGD_T x = g[i];
        x = x < l ? l : x;
        g[i] = x > h ? h : x;
    }
}
