/* Weight averaging (fastsgd.swa_utils): torch's lerp_ with a Scalar weight
 * and the equal-weight running mean of its AveragedModel on CPU,
 * instantiated like clip_loop.h (SGD_T, SGD_C, SGD_WIDEN, SGD_ROUND,
 * SGD_TARGET) with AVG_MADD(a, b, c), the multiply-add of SGD_C (fused or
 * not as the implementation's), and LERP_FN and MEAN_FN naming the
 * functions to define.  `avg` and `cur` are the same array or disjoint. */

/* avg = lerp(avg, cur, weight), as aten/src/ATen/native/cpu/LerpKernel.cpp:
 * the weight rounded to the compute type; with |w| < 0.5,
 * avg + w * (cur - avg), else cur + (w - 1) * (cur - avg), each one
 * multiply-add (torch's vector body and, compiled with contraction, its
 * scalar remainder agree; at ATEN_CPU_CAPABILITY=default both round the
 * product first), rounded once to the dtype. */
SGD_TARGET static void LERP_FN(void *avg_, const void *cur_, int64_t n, double weight)
{
    SGD_T *avg = (SGD_T *)avg_;
    const SGD_T *cur = (const SGD_T *)cur_;
    const SGD_C w = (SGD_C)weight;
    const int small = w < (SGD_C)0.5 && w > (SGD_C)-0.5;  /* a NaN weight is not */
    const SGD_C coeff = small ? w : w - (SGD_C)1;
    for (int64_t i = 0; i < n; i++) {
        const SGD_C s = SGD_WIDEN(avg[i]), e = SGD_WIDEN(cur[i]);
        avg[i] = SGD_ROUND(AVG_MADD(coeff, e - s, small ? s : e));
    }
}

/* avg = avg + (cur - avg) / count, as torch's get_swa_avg_fn on tensors of
 * the dtype: three ops, each rounded to the dtype (16-bit ones computed in
 * float32, count a float32). */
SGD_TARGET static void MEAN_FN(void *avg_, const void *cur_, int64_t n, double count)
{
    SGD_T *avg = (SGD_T *)avg_;
    const SGD_T *cur = (const SGD_T *)cur_;
    const SGD_C k = (SGD_C)count;
    for (int64_t i = 0; i < n; i++) {
        const SGD_C s = SGD_WIDEN(avg[i]);
        const SGD_C d = SGD_WIDEN(SGD_ROUND(SGD_WIDEN(cur[i]) - s));
        avg[i] = SGD_ROUND(s + SGD_WIDEN(SGD_ROUND(d / k)));
    }
}
