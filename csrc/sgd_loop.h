/* The SGD range function, written once and instantiated per dtype, rounding
 * and instruction set (sgd_instantiate.h).  Before including, define:
 *   SGD_T          element type (float, double, or uint16_t for float16/bfloat16)
 *   SGD_A          the type the hyperparameters are applied in (float for 16-bit)
 *   SGD_FN         name of the range function to define
 *   SGD_TARGET     the instruction set attribute (may be empty)
 *   SGD_ALPHA(x)   a double hyperparameter as torch's Scalar alpha: rounded
 *                  to the dtype (for 16-bit: double -> float -> dtype -> float)
 *   SGD_MULTIPLIER(x)  momentum as buf.mul_(momentum) takes it
 *   SGD_STEP       the step of one element (sgd_step.h) in torch's vector
 *                  body (or in its only code path, for float32 and float64)
 * and, for 16-bit dtypes:
 *   SGD_STEP_TAIL  the step of one element in torch's scalar remainder
 *   SGD_STEP_STRIDED  the step of one element whose ops round as modes[i]
 *                  says (an element of a strided tensor); SGD_STRIDED_VEC_STEP,
 *                  SGD_STRIDED_VEC_WIDTH, SGD_STRIDED_VEC_A, SGD_STRIDED_VEC_SPLAT(x)
 *                  (optional) the same for a vector of such elements
 *   SGD_VEC_STEP, SGD_VEC_WIDTH, SGD_VEC_A, SGD_VEC_SPLAT(x)  (optional) the
 *                  step of SGD_VEC_WIDTH elements of the vector body, its
 *                  alpha type and how a float alpha is broadcast into it.
 *
 * torch computes the last n % 32 elements of a 16-bit tensor in its scalar
 * code, which rounds x.add(y, alpha=a)'s product and sum separately; the
 * caller passes how many elements of the range lie before that remainder
 * (n_body).  "!= 0" tests use the double value, as torch's Python does.
 * For float32 and float64 the compiler vectorises the one loop. */

#define SGD_CAT_(a, b) a##b
#define SGD_FN_CAT(a, b) SGD_CAT_(a, b)

static inline __attribute__((always_inline)) SGD_TARGET void
SGD_FN_CAT(SGD_FN, _run)(SGD_T *restrict p, const SGD_T *restrict g, SGD_T *restrict b,
                         const int64_t n, const int64_t n_body, const uint8_t *restrict modes,
                         const int maximize,
                         const int use_wd, const int use_momentum, const int first_step,
                         const int nesterov, const SGD_A wd, const SGD_A m, const SGD_A m_alpha,
                         const SGD_A omd, const SGD_A neg_lr)
{
    int64_t i = 0;
#ifdef SGD_STEP_STRIDED
    if (modes) {
#ifdef SGD_STRIDED_VEC_STEP
        const SGD_STRIDED_VEC_A vwd = SGD_STRIDED_VEC_SPLAT(wd), vm = SGD_STRIDED_VEC_SPLAT(m);
        const SGD_STRIDED_VEC_A vm_alpha = SGD_STRIDED_VEC_SPLAT(m_alpha);
        const SGD_STRIDED_VEC_A vomd = SGD_STRIDED_VEC_SPLAT(omd);
        const SGD_STRIDED_VEC_A vneg_lr = SGD_STRIDED_VEC_SPLAT(neg_lr);
        const SGD_STRIDED_VEC_A vone = SGD_STRIDED_VEC_SPLAT(1.0f);
        for (; i + SGD_STRIDED_VEC_WIDTH <= n; i += SGD_STRIDED_VEC_WIDTH)
            SGD_STRIDED_VEC_STEP(p, g, b, NULL, modes, i, maximize, use_wd, use_momentum,
                                 first_step, nesterov, vwd, vm, vm_alpha, vomd, vneg_lr, vone);
#endif
        for (; i < n; i++)
            SGD_STEP_STRIDED(p, g, b, NULL, modes, i, maximize, use_wd, use_momentum,
                             first_step, nesterov, wd, m, m_alpha, omd, neg_lr, (SGD_A)1);
        return;
    }
#else
    (void)modes;
#endif
#ifdef SGD_VEC_STEP
    {
        const SGD_VEC_A vwd = SGD_VEC_SPLAT(wd), vm = SGD_VEC_SPLAT(m);
        const SGD_VEC_A vm_alpha = SGD_VEC_SPLAT(m_alpha), vomd = SGD_VEC_SPLAT(omd);
        const SGD_VEC_A vneg_lr = SGD_VEC_SPLAT(neg_lr), vone = SGD_VEC_SPLAT(1.0f);
        for (; i + SGD_VEC_WIDTH <= n_body; i += SGD_VEC_WIDTH)
            SGD_VEC_STEP(p, g, b, NULL, NULL, i, maximize, use_wd, use_momentum, first_step,
                         nesterov, vwd, vm, vm_alpha, vomd, vneg_lr, vone);
    }
#endif
#ifdef SGD_STEP_TAIL
    for (; i < n_body; i++)
        SGD_STEP(p, g, b, NULL, NULL, i, maximize, use_wd, use_momentum, first_step, nesterov,
                 wd, m, m_alpha, omd, neg_lr, (SGD_A)1);
    for (; i < n; i++)
        SGD_STEP_TAIL(p, g, b, NULL, NULL, i, maximize, use_wd, use_momentum, first_step,
                      nesterov, wd, m, m_alpha, omd, neg_lr, (SGD_A)1);
#else
    (void)n_body;
    for (; i < n; i++)
        SGD_STEP(p, g, b, NULL, NULL, i, maximize, use_wd, use_momentum, first_step, nesterov,
                 wd, m, m_alpha, omd, neg_lr, (SGD_A)1);
#endif
}

#define SGD_RUN(WD, MOM, FIRST, NEST)                                                    \
    SGD_FN_CAT(SGD_FN, _run)(p, g, b, n, n_body, modes, maximize, WD, MOM, FIRST, NEST, wd, \
                             m, m_alpha, omd, neg_lr)

SGD_TARGET static void SGD_FN(const fastsgd_sgd_hyper *h, void *p_, const void *g_, void *b_,
                              int64_t n, int first, int64_t n_body, const uint8_t *modes)
{
    SGD_T *p = (SGD_T *)p_;
    const SGD_T *g = (const SGD_T *)g_;
    SGD_T *b = (SGD_T *)b_;
    const SGD_A wd = SGD_ALPHA(h->weight_decay);
    const SGD_A m = SGD_MULTIPLIER(h->momentum);
    const SGD_A m_alpha = SGD_ALPHA(h->momentum);
    const SGD_A omd = SGD_ALPHA(1.0 - h->dampening);
    const SGD_A neg_lr = SGD_ALPHA(h->neg_lr);
    const int use_wd = h->weight_decay != 0.0;
    const int nesterov = h->nesterov != 0;
    /* maximize only flips a sign: it stays a runtime flag, hoisted out of
     * the loop by the compiler's unswitching. */
    const int maximize = h->maximize != 0;
    STEP_DISPATCH(h->momentum, first, use_wd, nesterov, SGD_RUN);
}

#undef SGD_RUN
