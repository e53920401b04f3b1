/* Instantiates, as the implementation `impl_<IMPL_NAME>`, the SGD loop of
 * sgd_loop.h, the roofline loops of stream_loop.h, the grad-wise loops
 * of clip_loop.h and the averaging loops of average_loop.h for float32 and
 * float64, and (half_instantiate.h) the same
 * plus the master-weights loop of master_loop.h for float16 and bfloat16.
 * Before including, define IMPL_NAME, IMPL_TARGET, IMPL_MADD_F32 and
 * IMPL_MADD_F64, and for the 16-bit dtypes:
 *   IMPL_FUSED16   1 if this implementation rounds as torch's AVX2/AVX-512
 *                  kernels (a vector body, then a scalar remainder), 0 as
 *                  torch at ATEN_CPU_CAPABILITY=default (scalar code only)
 *   IMPL_F16_NAN   the float16 NaN rule of torch's scalar code (half_convert.h)
 *   IMPL_VEC16     0, or 2 / 512: lanes of AVX2 / AVX-512 for the vector body */
#define IMPL_STR_(x) #x
#define IMPL_STR(x) IMPL_STR_(x)
#define IMPL_CAT_(a, b) a##b
#define IMPL_CAT(a, b) IMPL_CAT_(a, b)

#ifndef FASTSGD_INSTANTIATE_ONCE
#define FASTSGD_INSTANTIATE_ONCE
/* -x as torch's neg kernel computes it: the sign bit flipped, a NaN's too.
 * Written on the bits so that the compiler cannot fold it into a following
 * multiply-add as fmsub/fnmadd, which would propagate a NaN grad with the
 * other sign than torch's. */
static inline __attribute__((always_inline)) float fastsgd_negate_f32(float x)
{
    return fastsgd_float_of_bits(fastsgd_bits_of_float(x) ^ 0x80000000u);
}

static inline __attribute__((always_inline)) double fastsgd_negate_f64(double x)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits ^= (uint64_t)1 << 63;
    memcpy(&x, &bits, sizeof bits);
    return x;
}
#endif

#define SGD_TARGET IMPL_TARGET
#define STEP_TARGET IMPL_TARGET

/* ------------------------------------------------- float32 and float64 */
/* one element, compiled to vectors by the compiler */
#define STEP_LOAD(ptr, i) ((ptr)[i])
#define STEP_STORE(ptr, i, v) ((ptr)[i] = (v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) ((ptr)[i])
#define STEP_MUL(op, x, k) ((x) * (k))
#define STEP_STORE_OUT(out, i, v) ((void)0)

#define SGD_T float
#define SGD_C float
#define SGD_A float
#define STEP_P float
#define STEP_G float
#define STEP_S float
#define STEP_A float
#define STEP_FN IMPL_CAT(step_f32_, IMPL_NAME)
#define STEP_NEGATE(op, x) fastsgd_negate_f32(x)
#define STEP_MADD(op, a, k, c) IMPL_MADD_F32(a, k, c)
#include "sgd_step.h"
#define SGD_STEP IMPL_CAT(step_f32_, IMPL_NAME)
#define SGD_FN IMPL_CAT(sgd_f32_, IMPL_NAME)
#define SGD_ALPHA(x) ((float)(x))
#define SGD_MULTIPLIER(x) ((float)(x))
#define SGD_WIDEN(x) (x)
#define SGD_ROUND(x) (x)
#define SGD_BOUND(x) ((float)(x))
#define SGD_NAN_ROUNDED(n) (n)
#define SGD_NONFINITE(x) (((x) - (x)) != ((x) - (x)))
#define STREAM_FN IMPL_CAT(stream_f32_, IMPL_NAME)
#define NORM_FN IMPL_CAT(norm_f32_, IMPL_NAME)
#define SCALE_FN IMPL_CAT(scale_f32_, IMPL_NAME)
#define CLAMP_FN IMPL_CAT(clamp_f32_, IMPL_NAME)
#define UNSCALE_FN IMPL_CAT(unscale_f32_, IMPL_NAME)
#define FINITE_FN IMPL_CAT(finite_f32_, IMPL_NAME)
#define AVG_MADD IMPL_MADD_F32
#define LERP_FN IMPL_CAT(lerp_f32_, IMPL_NAME)
#define MEAN_FN IMPL_CAT(mean_f32_, IMPL_NAME)
#include "sgd_loop.h"
#include "stream_loop.h"
#include "clip_loop.h"
#include "average_loop.h"
#undef SGD_T
#undef SGD_C
#undef SGD_A
#undef STEP_P
#undef STEP_G
#undef SGD_STEP
#undef SGD_FN
#undef SGD_ALPHA
#undef SGD_MULTIPLIER
#undef SGD_BOUND
#undef SGD_NAN_ROUNDED
#undef STREAM_FN
#undef NORM_FN
#undef SCALE_FN
#undef CLAMP_FN
#undef UNSCALE_FN
#undef FINITE_FN
#undef AVG_MADD
#undef LERP_FN
#undef MEAN_FN

#define STEP_LOAD(ptr, i) ((ptr)[i])
#define STEP_STORE(ptr, i, v) ((ptr)[i] = (v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) ((ptr)[i])
#define STEP_MUL(op, x, k) ((x) * (k))
#define STEP_STORE_OUT(out, i, v) ((void)0)
#define SGD_T double
#define SGD_C double
#define SGD_A double
#define STEP_P double
#define STEP_G double
#define STEP_S double
#define STEP_A double
#define STEP_FN IMPL_CAT(step_f64_, IMPL_NAME)
#define STEP_NEGATE(op, x) fastsgd_negate_f64(x)
#define STEP_MADD(op, a, k, c) IMPL_MADD_F64(a, k, c)
#include "sgd_step.h"
#define SGD_STEP IMPL_CAT(step_f64_, IMPL_NAME)
#define SGD_FN IMPL_CAT(sgd_f64_, IMPL_NAME)
#define SGD_ALPHA(x) ((double)(x))
#define SGD_MULTIPLIER(x) ((double)(x))
#define SGD_BOUND(x) ((double)(x))
#define SGD_NAN_ROUNDED(n) (n)
#define STREAM_FN IMPL_CAT(stream_f64_, IMPL_NAME)
#define NORM_FN IMPL_CAT(norm_f64_, IMPL_NAME)
#define SCALE_FN IMPL_CAT(scale_f64_, IMPL_NAME)
#define CLAMP_FN IMPL_CAT(clamp_f64_, IMPL_NAME)
#define UNSCALE_FN IMPL_CAT(unscale_f64_, IMPL_NAME)
#define FINITE_FN IMPL_CAT(finite_f64_, IMPL_NAME)
#define AVG_MADD IMPL_MADD_F64
#define LERP_FN IMPL_CAT(lerp_f64_, IMPL_NAME)
#define MEAN_FN IMPL_CAT(mean_f64_, IMPL_NAME)
#include "sgd_loop.h"
#include "stream_loop.h"
#include "clip_loop.h"
#include "average_loop.h"
#undef SGD_T
#undef SGD_C
#undef SGD_A
#undef STEP_P
#undef STEP_G
#undef SGD_STEP
#undef SGD_FN
#undef SGD_ALPHA
#undef SGD_MULTIPLIER
#undef SGD_WIDEN
#undef SGD_ROUND
#undef SGD_BOUND
#undef SGD_NAN_ROUNDED
#undef SGD_NONFINITE
#undef STREAM_FN
#undef NORM_FN
#undef SCALE_FN
#undef CLAMP_FN
#undef UNSCALE_FN
#undef FINITE_FN
#undef AVG_MADD
#undef LERP_FN
#undef MEAN_FN

/* ------------------------------------------------ float16 and bfloat16 */
#if IMPL_VEC16 == 512
#define VEC_WIDTH 16
#define VEC_F __m512
#define VEC_H __m256i
#define VEC_HLOAD half16_load
#define VEC_HSTORE half16_store
#define VEC_HNEGATE half16_negate
#define VEC_FLOAD f32x16_load
#define VEC_FSTORE f32x16_store
#define VEC_FNEGATE f32x16_negate
#define VEC_FMA _mm512_fmadd_ps
#define VEC_MUL _mm512_mul_ps
#define VEC_SPLAT _mm512_set1_ps
#define VEC_NAN_FIRST f32x16_nan_first
#define VEC_F16_WIDEN f16x16_widen
#define VEC_F16_ROUND f16x16_round
#define VEC_BF16_WIDEN bf16x16_widen
#define VEC_BF16_ROUND bf16x16_round
#define VEC_BF16_ROUND_IN_LANE bf16x16_round_in_lane
#define VEC_BF16_PACK bf16x16_pack
#elif IMPL_VEC16 == 2
#define VEC_WIDTH 8
#define VEC_F __m256
#define VEC_H __m128i
#define VEC_HLOAD half8_load
#define VEC_HSTORE half8_store
#define VEC_HNEGATE half8_negate
#define VEC_FLOAD f32x8_load
#define VEC_FSTORE f32x8_store
#define VEC_FNEGATE f32x8_negate
#define VEC_FMA _mm256_fmadd_ps
#define VEC_MUL _mm256_mul_ps
#define VEC_SPLAT _mm256_set1_ps
#define VEC_NAN_FIRST f32x8_nan_first
#define VEC_F16_WIDEN f16x8_widen
#define VEC_F16_ROUND f16x8_round
#define VEC_BF16_WIDEN bf16x8_widen
#define VEC_BF16_ROUND bf16x8_round
#define VEC_BF16_ROUND_IN_LANE bf16x8_round_in_lane
#define VEC_BF16_PACK bf16x8_pack
#endif

#define HALF_NAME f16
#define HALF_WIDEN(x) fastsgd_f16_widen(x)
#define HALF_ROUND_BODY(f) fastsgd_f16_round((f), F16_NAN_QUIET)
#define HALF_ROUND_TAIL(f) fastsgd_f16_round((f), IMPL_F16_NAN)
#define HALF_NONFINITE(x) (((x) & 0x7C00u) == 0x7C00u)
#define HALF_KEEPS_NAN 1
#define VEC_WIDEN VEC_F16_WIDEN
#define VEC_ROUND VEC_F16_ROUND
#include "half_instantiate.h"

#define HALF_NAME bf16
#define HALF_WIDEN(x) fastsgd_bf16_widen(x)
#define HALF_ROUND_BODY(f) fastsgd_bf16_round((f), BF16_NAN_VECTOR)
#define HALF_ROUND_TAIL(f) fastsgd_bf16_round((f), BF16_NAN_SCALAR)
#define HALF_NONFINITE(x) (((x) & 0x7F80u) == 0x7F80u)
#define HALF_KEEPS_NAN 0
#define VEC_WIDEN VEC_BF16_WIDEN
#define VEC_ROUND VEC_BF16_ROUND
#include "half_instantiate.h"

#define STREAM_MASTER_FN IMPL_CAT(stream_master_, IMPL_NAME)
#define SGD_T uint16_t
#define STREAM_FN IMPL_CAT(stream_half_, IMPL_NAME)
#include "stream_loop.h"
#undef SGD_T
#undef STREAM_FN
#undef STREAM_MASTER_FN

#if IMPL_VEC16
#undef VEC_WIDTH
#undef VEC_F
#undef VEC_H
#undef VEC_HLOAD
#undef VEC_HSTORE
#undef VEC_HNEGATE
#undef VEC_FLOAD
#undef VEC_FSTORE
#undef VEC_FNEGATE
#undef VEC_FMA
#undef VEC_MUL
#undef VEC_SPLAT
#undef VEC_NAN_FIRST
#undef VEC_F16_WIDEN
#undef VEC_F16_ROUND
#undef VEC_BF16_WIDEN
#undef VEC_BF16_ROUND
#undef VEC_BF16_ROUND_IN_LANE
#undef VEC_BF16_PACK
#endif

#undef SGD_TARGET
#undef STEP_TARGET

#define IMPL_FNS(kind) \
    {IMPL_CAT(kind##_f32_, IMPL_NAME), IMPL_CAT(kind##_f64_, IMPL_NAME), \
     IMPL_CAT(kind##_f16_, IMPL_NAME), IMPL_CAT(kind##_bf16_, IMPL_NAME)}

static const fastsgd_impl IMPL_CAT(impl_, IMPL_NAME) = {
    IMPL_STR(IMPL_NAME),
    IMPL_FNS(sgd),
    {IMPL_CAT(stream_f32_, IMPL_NAME), IMPL_CAT(stream_f64_, IMPL_NAME),
     IMPL_CAT(stream_half_, IMPL_NAME), IMPL_CAT(stream_half_, IMPL_NAME)},
    IMPL_FNS(norm),
    IMPL_FNS(scale),
    IMPL_FNS(clamp),
    /* half precision: GradScaler's loops and the master-weights step */
    IMPL_FNS(unscale),
    IMPL_FNS(finite),
    {NULL, NULL, IMPL_CAT(master_f16_, IMPL_NAME), IMPL_CAT(master_bf16_, IMPL_NAME)},
    IMPL_CAT(stream_master_, IMPL_NAME),
    IMPL_FNS(lerp),
    IMPL_FNS(mean),
};

#undef IMPL_FNS
#undef IMPL_NAME
#undef IMPL_TARGET
#undef IMPL_MADD_F32
#undef IMPL_MADD_F64
#undef IMPL_FUSED16
#undef IMPL_F16_NAN
#undef IMPL_VEC16
