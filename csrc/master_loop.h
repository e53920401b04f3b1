/* The master-weights range function: a float16 or bfloat16 parameter whose
 * float32 master copy and float32 momentum buffer the optimizer keeps.  It
 * reads the 16-bit grad, widens it (and multiplies it by GradScaler's
 * inverse scale, in float32, as torch's unscale does), steps the master
 * exactly as the float32 kernel steps a float32 parameter (the step of
 * sgd_step.h in float32), and writes the parameter as the new master
 * rounded to its dtype: one pass over the memory.  Instantiated like
 * sgd_loop.h, with:
 *   MASTER_FN      name of the function to define
 *   MASTER_WIDEN(x)  a 16-bit element to float32 (a new master's first value)
 *   MASTER_STEP    the step of one element; MASTER_VEC_STEP, MASTER_VEC_WIDTH,
 *                  MASTER_VEC_A, MASTER_VEC_SPLAT(x) (optional) of a vector. */

static inline __attribute__((always_inline)) SGD_TARGET void
SGD_FN_CAT(MASTER_FN, _run)(float *restrict master, const uint16_t *restrict g,
                            float *restrict b, uint16_t *restrict p, const int64_t n,
                            const int maximize, const int use_wd, const int use_momentum,
                            const int first_step, const int nesterov, const float wd,
                            const float m, const float omd, const float neg_lr,
                            const float inv_scale)
{
    int64_t i = 0;
#ifdef MASTER_VEC_STEP
    {
        const MASTER_VEC_A vwd = MASTER_VEC_SPLAT(wd), vm = MASTER_VEC_SPLAT(m);
        const MASTER_VEC_A vomd = MASTER_VEC_SPLAT(omd), vneg_lr = MASTER_VEC_SPLAT(neg_lr);
        const MASTER_VEC_A vinv = MASTER_VEC_SPLAT(inv_scale);
        for (; i + MASTER_VEC_WIDTH <= n; i += MASTER_VEC_WIDTH)
            MASTER_VEC_STEP(master, g, b, p, NULL, i, maximize, use_wd, use_momentum, first_step,
                            nesterov, vwd, vm, vm, vomd, vneg_lr, vinv);
    }
#endif
    for (; i < n; i++)
        MASTER_STEP(master, g, b, p, NULL, i, maximize, use_wd, use_momentum, first_step, nesterov,
                    wd, m, m, omd, neg_lr, inv_scale);
}

#define MASTER_RUN(WD, MOM, FIRST, NEST)                                                     \
    SGD_FN_CAT(MASTER_FN, _run)(master, g, b, p, n, maximize, WD, MOM, FIRST, NEST, wd, m, \
                                omd, neg_lr, inv_scale)

SGD_TARGET static void MASTER_FN(const fastsgd_sgd_hyper *h, void *p_, const void *g_,
                                 void *b_, void *master_, int64_t n, int flags, float inv_scale)
{
    uint16_t *p = (uint16_t *)p_;
    const uint16_t *g = (const uint16_t *)g_;
    float *b = (float *)b_;
    float *master = (float *)master_;
    if (flags & FASTSGD_NEW_MASTER)
        for (int64_t i = 0; i < n; i++)
            master[i] = MASTER_WIDEN(p[i]);
    /* float32 parameters' rules: every alpha and the multiplier is the
     * hyperparameter rounded to float32 */
    const float wd = (float)h->weight_decay;
    const float m = (float)h->momentum;
    const float omd = (float)(1.0 - h->dampening);
    const float neg_lr = (float)h->neg_lr;
    const int use_wd = h->weight_decay != 0.0;
    const int nesterov = h->nesterov != 0;
    const int maximize = h->maximize != 0;
    STEP_DISPATCH(h->momentum, flags & FASTSGD_NEW_BUF, use_wd, nesterov, MASTER_RUN);
}

#undef MASTER_RUN
