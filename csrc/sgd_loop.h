/* The SGD element loop, written once and instantiated per dtype, rounding and
 * instruction set.  Before including, define:
 *   SGD_T         element type (float or double)
 *   SGD_UINT      the unsigned integer type of the same size
 *   SGD_FN        name of the range function to define
 *   SGD_MADD(a, b, c)  c + a * b, rounded the way the instantiation wants
 *   SGD_TARGET    the instruction set attribute (may be empty)
 *
 * Each step is the op order of torch's _single_tensor_sgd, so that every
 * rounding happens where torch's happens:
 *   d = maximize ? -g : g
 *   d = d.add(p, alpha=wd)                        if wd != 0
 *   b = d.clone()                                 first step
 *   b = b.mul_(m).add_(d, alpha=1 - dampening)    later steps
 *   d = nesterov ? d.add(b, alpha=m) : b          if m != 0
 *   p = p.add_(d, alpha=-lr)                      (-lr from the caller)
 * Hyperparameters are rounded to the element type first, as ATen does with
 * a Scalar alpha; "!= 0" tests use the double value, as torch's Python does.
 * The compiler vectorises the loop; its scalar remainder runs the same
 * operations, so every element rounds alike wherever it falls. */

#define SGD_CAT_(a, b) a##b
#define SGD_FN_CAT(a, b) SGD_CAT_(a, b)

/* -x as torch's neg kernel computes it: the sign bit flipped, a NaN's too.
 * Written on the bits so that the compiler cannot fold it into a following
 * multiply-add as fmsub/fnmadd, which would propagate a NaN grad with the
 * other sign than torch's. */
static inline __attribute__((always_inline)) SGD_TARGET SGD_T
SGD_FN_CAT(SGD_FN, _negate)(SGD_T x)
{
    SGD_UINT bits;
    memcpy(&bits, &x, sizeof bits);
    bits ^= (SGD_UINT)1 << (8 * sizeof bits - 1);
    memcpy(&x, &bits, sizeof bits);
    return x;
}

static inline __attribute__((always_inline)) SGD_TARGET void
SGD_FN_CAT(SGD_FN, _body)(SGD_T *restrict p, const SGD_T *restrict g,
                          SGD_T *restrict b, int64_t n, const int maximize,
                          const int use_wd, const int use_momentum,
                          const int first_step, const int nesterov, SGD_T wd,
                          SGD_T m, SGD_T one_minus_dampening, SGD_T neg_lr)
{
    for (int64_t i = 0; i < n; i++) {
        SGD_T d = maximize ? SGD_FN_CAT(SGD_FN, _negate)(g[i]) : g[i];
        if (use_wd)
            d = SGD_MADD(p[i], wd, d);
        if (use_momentum) {
            SGD_T buf;
            if (first_step)
                buf = d;
            else
                buf = SGD_MADD(d, one_minus_dampening, b[i] * m);
            b[i] = buf;
            d = nesterov ? SGD_MADD(buf, m, d) : buf;
        }
        p[i] = SGD_MADD(d, neg_lr, p[i]);
    }
}

/* Literal flags make the compiler emit one branch-free, vectorisable loop
 * per combination instead of testing the flags per element. */
#define SGD_BODY(WD, MOM, FIRST, NEST)                                          \
    SGD_FN_CAT(SGD_FN, _body)(p, g, b, n, maximize, WD, MOM, FIRST, NEST, wd, m, \
                              omd, neg_lr)

SGD_TARGET static void SGD_FN(const fastsgd_sgd_hyper *h, void *p_, const void *g_,
                              void *b_, int64_t n, int first)
{
    SGD_T *p = (SGD_T *)p_;
    const SGD_T *g = (const SGD_T *)g_;
    SGD_T *b = (SGD_T *)b_;
    const SGD_T wd = (SGD_T)h->weight_decay;
    const SGD_T m = (SGD_T)h->momentum;
    const SGD_T omd = (SGD_T)(1.0 - h->dampening);
    const SGD_T neg_lr = (SGD_T)h->neg_lr;
    const int use_wd = h->weight_decay != 0.0;
    const int nesterov = h->nesterov != 0;
    /* maximize only flips a sign: it stays a runtime flag, hoisted out of
     * the loop by the compiler's unswitching. */
    const int maximize = h->maximize != 0;

    if (h->momentum == 0.0) {
        if (use_wd) SGD_BODY(1, 0, 0, 0);
        else        SGD_BODY(0, 0, 0, 0);
    } else if (first) {
        if (use_wd) { if (nesterov) SGD_BODY(1, 1, 1, 1); else SGD_BODY(1, 1, 1, 0); }
        else        { if (nesterov) SGD_BODY(0, 1, 1, 1); else SGD_BODY(0, 1, 1, 0); }
    } else {
        if (use_wd) { if (nesterov) SGD_BODY(1, 1, 0, 1); else SGD_BODY(1, 1, 0, 0); }
        else        { if (nesterov) SGD_BODY(0, 1, 0, 1); else SGD_BODY(0, 1, 0, 0); }
    }
}

#undef SGD_BODY
