/* One SGD step of one lane -- an element, or a vector of elements -- in the
 * op order of torch's _single_tensor_sgd, so that every rounding happens
 * where torch's happens:
 *   d = maximize ? -g : g
 *   d = d.add(p, alpha=wd)                        if wd != 0
 *   b = d.clone()                                 first step
 *   b = b.mul_(m).add_(d, alpha=1 - dampening)    later steps
 *   d = nesterov ? d.add(b, alpha=m) : b          if m != 0
 *   p = p.add_(d, alpha=-lr)                      (-lr from the caller)
 * Written once; included once per set of lane operations (a dtype, an
 * instruction set, torch's vector body or its scalar remainder).  Before
 * including, define:
 *   STEP_FN              the function to define
 *   STEP_TARGET          its instruction set attribute (may be empty)
 *   STEP_P, STEP_G       element types of params and buffers, and of grads
 *   STEP_S               a lane of values as the ops pass them on
 *   STEP_A               an alpha or multiplier of such a lane
 *   STEP_LOAD(ptr, i), STEP_STORE(ptr, i, v)  the param or buffer lane at i
 *   STEP_LOAD_GRAD(ptr, i, inv_scale)         the grad lane (master weights
 *                        widen it and multiply it by GradScaler's inverse scale)
 *   STEP_NEGATE(op, x)   -x, the sign flipped as torch's neg does
 *   STEP_MADD(op, a, k, c)  c.add(a, alpha=k), rounded as the lane's code path does
 *   STEP_MUL(op, x, k)   x.mul_(k)
 *   STEP_STORE_OUT(out, i, v)  master weights: the 16-bit parameter from the
 *                        new float32 master v; otherwise nothing
 * where op is the op's FASTSGD_OP_* bit: the step of an element of a strided
 * 16-bit tensor rounds each op as that op's own loop in torch reached the
 * element (bit set in modes[i]: its vector body); every other step ignores
 * op and modes.  All are undefined after, but for the lane's (STEP_S to
 * STEP_STORE_OUT) while STEP_KEEP_LANES is defined. */

static inline __attribute__((always_inline)) STEP_TARGET void
STEP_FN(STEP_P *restrict p, const STEP_G *restrict g, STEP_P *restrict b,
        uint16_t *restrict out, const uint8_t *restrict modes, const int64_t i,
        const int maximize, const int use_wd, const int use_momentum, const int first_step,
        const int nesterov, const STEP_A wd, const STEP_A m, const STEP_A m_alpha,
        const STEP_A omd, const STEP_A neg_lr, const STEP_A inv_scale)
{
    (void)out, (void)modes, (void)inv_scale, (void)m_alpha;
    STEP_S d = STEP_LOAD_GRAD(g, i, inv_scale);
    if (maximize)
        d = STEP_NEGATE(FASTSGD_OP_NEG, d);
    if (use_wd)
        d = STEP_MADD(FASTSGD_OP_WEIGHT_DECAY, STEP_LOAD(p, i), wd, d);
    if (use_momentum) {
        STEP_S buf;
        if (first_step)
            buf = d;
        else
            buf = STEP_MADD(FASTSGD_OP_BUF, d, omd, STEP_MUL(FASTSGD_OP_MUL, STEP_LOAD(b, i), m));
        STEP_STORE(b, i, buf);
        d = nesterov ? STEP_MADD(FASTSGD_OP_NESTEROV, buf, m_alpha, d) : buf;
    }
    const STEP_S new_p = STEP_MADD(FASTSGD_OP_PARAM, d, neg_lr, STEP_LOAD(p, i));
    STEP_STORE(p, i, new_p);
    STEP_STORE_OUT(out, i, new_p);
}

#undef STEP_FN
#undef STEP_NEGATE
#undef STEP_MADD
#undef STEP_MUL
#ifndef STEP_KEEP_LANES  /* defined: the next include steps the same lanes */
#undef STEP_S
#undef STEP_A
#undef STEP_LOAD
#undef STEP_STORE
#undef STEP_LOAD_GRAD
#undef STEP_STORE_OUT
#endif

#ifndef STEP_DISPATCH
/* Literal flags make the compiler emit one branch-free loop per option
 * combination instead of testing the options per element: RUN(WD, MOM,
 * FIRST, NEST) is called with the combination of these options. */
#define STEP_DISPATCH(momentum, first, use_wd, nesterov, RUN)                                 \
    do {                                                                                        \
        if ((momentum) == 0.0) {                                                                \
            if (use_wd) RUN(1, 0, 0, 0); else RUN(0, 0, 0, 0);                                  \
        } else if (first) {                                                                     \
            if (use_wd) { if (nesterov) RUN(1, 1, 1, 1); else RUN(1, 1, 1, 0); }                \
            else        { if (nesterov) RUN(0, 1, 1, 1); else RUN(0, 1, 1, 0); }                \
        } else {                                                                                \
            if (use_wd) { if (nesterov) RUN(1, 1, 0, 1); else RUN(1, 1, 0, 0); }                \
            else        { if (nesterov) RUN(0, 1, 0, 1); else RUN(0, 1, 0, 0); }                \
        }                                                                                       \
    } while (0)
#endif
