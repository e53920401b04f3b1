/* The loops of one 16-bit dtype for one implementation, included twice by
 * sgd_instantiate.h (float16, bfloat16) with HALF_NAME, HALF_WIDEN(x),
 * HALF_ROUND_BODY(f) and HALF_ROUND_TAIL(f) (the roundings of torch's vector
 * body and scalar remainder, half_convert.h), HALF_NONFINITE(x),
 * HALF_KEEPS_NAN (1 if a NaN's payload survives the rounding), and, with
 * IMPL_VEC16, the vector lanes VEC_* (half_simd.h).
 *
 * Every op widens its operands to float32, computes, and rounds to the
 * dtype, as torch does; each step keeps its values in the dtype, so that a
 * copy (the first momentum buffer) keeps the bits.  In the vector body
 * x.add(y, alpha=a) is one float32 fused multiply-add; in the scalar
 * remainder the product is rounded to the dtype before the sum; a negation
 * there goes through float32.
 *
 * x.add(y, alpha=a) with x and y both NaN gives y's NaN in torch's vector
 * body (and its float32 kernels), x's in its scalar code; a compiler is free
 * to pick either operand's, so where the payload survives (float16, and the
 * float32 master) the NaN is chosen explicitly (NAN_FIRST). */
#define HALF_FN(kind) IMPL_CAT(IMPL_CAT(kind, HALF_NAME), IMPL_CAT(_, IMPL_NAME))
#define NAN_FIRST(c, r) (HALF_KEEPS_NAN && (c) != (c) ? (c) : (r))

/* Lanes of 16-bit values: the element types and loads of every step below */
#define STEP_P uint16_t
#define STEP_G uint16_t

/* torch's scalar code, one element */
#define TAIL_NEGATE(x) HALF_ROUND_TAIL(-HALF_WIDEN(x))
#define TAIL_MADD(a, k, c)                                                 \
    HALF_ROUND_TAIL(NAN_FIRST(HALF_WIDEN(c),                                   \
                              HALF_WIDEN(c) + HALF_WIDEN(HALF_ROUND_TAIL(HALF_WIDEN(a) * (k)))))
#define TAIL_MUL(x, k) HALF_ROUND_TAIL(HALF_WIDEN(x) * (k))
/* torch's vector body, one element */
#if IMPL_FUSED16
#define BODY_NEGATE(x) ((uint16_t)((x) ^ 0x8000u))
#define BODY_MADD(a, k, c) \
    HALF_ROUND_BODY(NAN_FIRST(HALF_WIDEN(a), IMPL_MADD_F32(HALF_WIDEN(a), (k), HALF_WIDEN(c))))
#define BODY_MUL(x, k) HALF_ROUND_BODY(HALF_WIDEN(x) * (k))
#define HALF_ROUND_COPY HALF_ROUND_BODY
#define HALF_NAN_ROUNDED(n) ((n) - (n) % FASTSGD_HALF_CHUNK)
#else
/* at ATEN_CPU_CAPABILITY=default the body is torch's generic vector code,
 * element-wise scalar ops (the scalar code's roundings) computing
 * `y * a + x`: the product's NaN goes first */
#define BODY_NEGATE(x) HALF_ROUND_TAIL(-HALF_WIDEN(x))
#define BODY_MADD(a, k, c)                                                            \
    HALF_ROUND_TAIL(NAN_FIRST(HALF_WIDEN(HALF_ROUND_TAIL(HALF_WIDEN(a) * (k))),          \
                              HALF_WIDEN(c) + HALF_WIDEN(HALF_ROUND_TAIL(HALF_WIDEN(a) * (k)))))
#define BODY_MUL(x, k) HALF_ROUND_TAIL(HALF_WIDEN(x) * (k))
#define HALF_ROUND_COPY HALF_ROUND_TAIL
#define HALF_NAN_ROUNDED(n) 0
#endif

/* Lanes of 16-bit values, one element at a time */
#define STEP_S uint16_t
#define STEP_A float
#define STEP_LOAD(ptr, i) ((ptr)[i])
#define STEP_STORE(ptr, i, v) ((ptr)[i] = (v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) ((ptr)[i])
#define STEP_STORE_OUT(out, i, v) ((void)0)
#define STEP_KEEP_LANES

/* the last n % 32 elements of a contiguous tensor */
#define STEP_FN HALF_FN(step_tail_)
#define STEP_NEGATE(op, x) TAIL_NEGATE(x)
#define STEP_MADD(op, a, k, c) TAIL_MADD(a, k, c)
#define STEP_MUL(op, x, k) TAIL_MUL(x, k)
#include "sgd_step.h"

/* the rest of a contiguous tensor */
#define STEP_FN HALF_FN(step_body_)
#define STEP_NEGATE(op, x) BODY_NEGATE(x)
#define STEP_MADD(op, a, k, c) BODY_MADD(a, k, c)
#define STEP_MUL(op, x, k) BODY_MUL(x, k)
#include "sgd_step.h"

/* an element of a strided tensor: each op rounds as its own loop in torch
 * reached the element (modes[i]); functions, so that each operand (an op's
 * result) is computed once */
static inline __attribute__((always_inline)) IMPL_TARGET uint16_t
HALF_FN(negate_either_)(const int body, const uint16_t x)
{
    return body ? BODY_NEGATE(x) : TAIL_NEGATE(x);
}
static inline __attribute__((always_inline)) IMPL_TARGET uint16_t
HALF_FN(madd_either_)(const int body, const uint16_t a, const float k, const uint16_t c)
{
    return body ? BODY_MADD(a, k, c) : TAIL_MADD(a, k, c);
}
static inline __attribute__((always_inline)) IMPL_TARGET uint16_t
HALF_FN(mul_either_)(const int body, const uint16_t x, const float k)
{
    return body ? BODY_MUL(x, k) : TAIL_MUL(x, k);
}
#define STEP_FN HALF_FN(step_strided_)
#define STEP_NEGATE(op, x) HALF_FN(negate_either_)(modes[i] & (op), x)
#define STEP_MADD(op, a, k, c) HALF_FN(madd_either_)(modes[i] & (op), a, k, c)
#define STEP_MUL(op, x, k) HALF_FN(mul_either_)(modes[i] & (op), x, k)
#undef STEP_KEEP_LANES
#include "sgd_step.h"
#define SGD_STEP HALF_FN(step_body_)
#define SGD_STEP_TAIL HALF_FN(step_tail_)
#define SGD_STEP_STRIDED HALF_FN(step_strided_)
#undef TAIL_NEGATE
#undef TAIL_MADD
#undef TAIL_MUL
#undef BODY_NEGATE
#undef BODY_MADD
#undef BODY_MUL

#if IMPL_VEC16
/* torch's vector body, VEC_WIDTH elements at a time */
#define STEP_FN HALF_FN(step_vec_)
#define STEP_A VEC_F
#if HALF_KEEPS_NAN
/* float16: values pass between ops as 16-bit lanes (a NaN's bits, which a
 * copy keeps, never go through a conversion) */
#define STEP_S VEC_H
#define STEP_LOAD(ptr, i) VEC_HLOAD((ptr) + (i))
#define STEP_STORE(ptr, i, v) VEC_HSTORE((ptr) + (i), (v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) VEC_HLOAD((ptr) + (i))
#define STEP_NEGATE(op, x) VEC_HNEGATE(x)
#define STEP_MADD(op, a, k, c) \
    VEC_ROUND(VEC_NAN_FIRST(VEC_WIDEN(a), VEC_FMA(VEC_WIDEN(a), (k), VEC_WIDEN(c))))
#define STEP_MUL(op, x, k) VEC_ROUND(VEC_MUL(VEC_WIDEN(x), (k)))
#else
/* bfloat16: values pass between ops as float32 lanes holding bfloat16
 * values (widening is exact and free), rounded in place, packed on store:
 * about a third fewer instructions than 16-bit lanes */
#define STEP_S VEC_F
#define STEP_LOAD(ptr, i) VEC_WIDEN(VEC_HLOAD((ptr) + (i)))
#define STEP_STORE(ptr, i, v) VEC_HSTORE((ptr) + (i), VEC_BF16_PACK(v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) VEC_WIDEN(VEC_HLOAD((ptr) + (i)))
#define STEP_NEGATE(op, x) VEC_FNEGATE(x)
#define STEP_MADD(op, a, k, c) VEC_BF16_ROUND_IN_LANE(VEC_FMA((a), (k), (c)))
#define STEP_MUL(op, x, k) VEC_BF16_ROUND_IN_LANE(VEC_MUL((x), (k)))
#endif
#define STEP_STORE_OUT(out, i, v) ((void)0)
#include "sgd_step.h"
#define SGD_VEC_STEP HALF_FN(step_vec_)
#define SGD_VEC_WIDTH VEC_WIDTH
#define SGD_VEC_A VEC_F
#define SGD_VEC_SPLAT VEC_SPLAT
#endif

#if IMPL_VEC16
/* A strided tensor, 8 elements at a time (AVX2's lanes, in the AVX-512
 * kernel too): each op computed both as torch's vector body and as its
 * scalar code computes it, each lane keeping the one modes[i] names.  On
 * these CPUs the scalar code rounds float16 through F16C as the vector body
 * does; only x.add(y, alpha=a) rounds its product first. */
#if HALF_KEEPS_NAN
static inline __attribute__((always_inline)) IMPL_TARGET __m128i
HALF_FN(negate8_)(const __m128i body, const __m128i x)
{
    return _mm_blendv_epi8(f16x8_round(f32x8_negate(f16x8_widen(x))), half8_negate(x), body);
}
static inline __attribute__((always_inline)) IMPL_TARGET __m128i
HALF_FN(madd8_)(const __m128i body, const __m128i a, const __m256 k, const __m128i c)
{
    const __m256 wa = f16x8_widen(a), wc = f16x8_widen(c);
    const __m128i vec = f16x8_round(f32x8_nan_first(wa, _mm256_fmadd_ps(wa, k, wc)));
    const __m256 product = f16x8_widen(f16x8_round(_mm256_mul_ps(wa, k)));
    const __m128i scalar = f16x8_round(f32x8_nan_first(wc, _mm256_add_ps(wc, product)));
    return _mm_blendv_epi8(scalar, vec, body);
}
#define STEP_S __m128i
#define STEP_LOAD(ptr, i) half8_load((ptr) + (i))
#define STEP_STORE(ptr, i, v) half8_store((ptr) + (i), (v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) half8_load((ptr) + (i))
#define STEP_NEGATE(op, x) HALF_FN(negate8_)(half8_mode_mask(modes + i, op), x)
#define STEP_MADD(op, a, k, c) HALF_FN(madd8_)(half8_mode_mask(modes + i, op), a, k, c)
#define STEP_MUL(op, x, k) f16x8_round(_mm256_mul_ps(f16x8_widen(x), (k)))
#else
static inline __attribute__((always_inline)) IMPL_TARGET __m256
HALF_FN(negate8_)(const __m256 body, const __m256 x)
{
    const __m256 scalar = _mm256_blendv_ps(
        f32x8_negate(x), _mm256_castsi256_ps(_mm256_set1_epi32((int)BF16_NAN_SCALAR << 16)),
        _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_ps(scalar, f32x8_negate(x), body);
}
static inline __attribute__((always_inline)) IMPL_TARGET __m256
HALF_FN(madd8_)(const __m256 body, const __m256 a, const __m256 k, const __m256 c)
{
    const __m256 vec = bf16x8_round_in_lane(_mm256_fmadd_ps(a, k, c));
    const __m256 product = bf16x8_round_in_lane_nan(_mm256_mul_ps(a, k), BF16_NAN_SCALAR);
    const __m256 scalar = bf16x8_round_in_lane_nan(_mm256_add_ps(c, product), BF16_NAN_SCALAR);
    return _mm256_blendv_ps(scalar, vec, body);
}
static inline __attribute__((always_inline)) IMPL_TARGET __m256
HALF_FN(mul8_)(const __m256 body, const __m256 x, const __m256 k)
{
    const __m256 product = _mm256_mul_ps(x, k);
    return _mm256_blendv_ps(bf16x8_round_in_lane_nan(product, BF16_NAN_SCALAR),
                            bf16x8_round_in_lane(product), body);
}
#define STEP_S __m256
#define STEP_LOAD(ptr, i) bf16x8_widen(half8_load((ptr) + (i)))
#define STEP_STORE(ptr, i, v) half8_store((ptr) + (i), bf16x8_pack(v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) bf16x8_widen(half8_load((ptr) + (i)))
#define STEP_NEGATE(op, x) HALF_FN(negate8_)(f32x8_mode_mask(modes + i, op), x)
#define STEP_MADD(op, a, k, c) HALF_FN(madd8_)(f32x8_mode_mask(modes + i, op), a, k, c)
#define STEP_MUL(op, x, k) HALF_FN(mul8_)(f32x8_mode_mask(modes + i, op), x, k)
#endif
#define STEP_FN HALF_FN(step_strided8_)
#define STEP_A __m256
#define STEP_STORE_OUT(out, i, v) ((void)0)
#include "sgd_step.h"
#define SGD_STRIDED_VEC_STEP HALF_FN(step_strided8_)
#define SGD_STRIDED_VEC_WIDTH 8
#define SGD_STRIDED_VEC_A __m256
#define SGD_STRIDED_VEC_SPLAT _mm256_set1_ps
#endif
#undef STEP_P
#undef STEP_G

#define SGD_T uint16_t
#define SGD_C float
#define SGD_A float
#define SGD_FN HALF_FN(sgd_)
#define SGD_ALPHA(x) HALF_WIDEN(HALF_ROUND_TAIL((float)(x)))
#define SGD_MULTIPLIER(x) ((float)(x))
#define SGD_WIDEN(x) HALF_WIDEN(x)
#define SGD_ROUND(f) HALF_ROUND_COPY(f)
#define SGD_BOUND(x) HALF_ROUND_TAIL((float)(x))
#define SGD_NAN_ROUNDED(n) HALF_NAN_ROUNDED(n)
#define SGD_NONFINITE HALF_NONFINITE
#define NORM_FN HALF_FN(norm_)
#define SCALE_FN HALF_FN(scale_)
#define CLAMP_FN HALF_FN(clamp_)
#define UNSCALE_FN HALF_FN(unscale_)
#define FINITE_FN HALF_FN(finite_)
#define AVG_MADD IMPL_MADD_F32
#define LERP_FN HALF_FN(lerp_)
#define MEAN_FN HALF_FN(mean_)
#include "sgd_loop.h"
#include "clip_loop.h"
#include "average_loop.h"
#undef SGD_STEP
#undef SGD_STEP_TAIL
#undef SGD_STEP_STRIDED
#undef SGD_STRIDED_VEC_STEP
#undef SGD_STRIDED_VEC_WIDTH
#undef SGD_STRIDED_VEC_A
#undef SGD_STRIDED_VEC_SPLAT
#undef SGD_VEC_STEP
#undef SGD_VEC_WIDTH
#undef SGD_VEC_A
#undef SGD_VEC_SPLAT
#undef SGD_T
#undef SGD_C
#undef SGD_A
#undef SGD_FN
#undef SGD_ALPHA
#undef SGD_MULTIPLIER
#undef SGD_WIDEN
#undef SGD_ROUND
#undef SGD_BOUND
#undef SGD_NAN_ROUNDED
#undef SGD_NONFINITE
#undef NORM_FN
#undef SCALE_FN
#undef CLAMP_FN
#undef UNSCALE_FN
#undef FINITE_FN
#undef AVG_MADD
#undef LERP_FN
#undef MEAN_FN

/* Master weights: float32 params and buffers, 16-bit grads and output,
 * float32's rules (the float32 kernel's multiply-add) */
#define STEP_P float
#define STEP_G uint16_t
#define STEP_FN HALF_FN(master_step_)
#define STEP_S float
#define STEP_A float
#define STEP_LOAD(ptr, i) ((ptr)[i])
#define STEP_STORE(ptr, i, v) ((ptr)[i] = (v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) (HALF_WIDEN((ptr)[i]) * (inv_scale))
#define STEP_NEGATE(op, x) fastsgd_negate_f32(x)
#define STEP_MADD(op, a, k, c) ((a) != (a) ? (a) : IMPL_MADD_F32(a, k, c))
#define STEP_MUL(op, x, k) ((x) * (k))
#define STEP_STORE_OUT(out, i, v) ((out)[i] = HALF_ROUND_COPY(v))
#include "sgd_step.h"
#define MASTER_STEP HALF_FN(master_step_)
#if IMPL_VEC16
#define STEP_FN HALF_FN(master_step_vec_)
#define STEP_S VEC_F
#define STEP_A VEC_F
#define STEP_LOAD(ptr, i) VEC_FLOAD((ptr) + (i))
#define STEP_STORE(ptr, i, v) VEC_FSTORE((ptr) + (i), (v))
#define STEP_LOAD_GRAD(ptr, i, inv_scale) VEC_MUL(VEC_WIDEN(VEC_HLOAD((ptr) + (i))), (inv_scale))
#define STEP_NEGATE(op, x) VEC_FNEGATE(x)
#define STEP_MADD(op, a, k, c) VEC_NAN_FIRST((a), VEC_FMA(a, k, c))
#define STEP_MUL(op, x, k) VEC_MUL(x, k)
#define STEP_STORE_OUT(out, i, v) VEC_HSTORE((out) + (i), VEC_ROUND(v))
#include "sgd_step.h"
#define MASTER_VEC_STEP HALF_FN(master_step_vec_)
#define MASTER_VEC_WIDTH VEC_WIDTH
#define MASTER_VEC_A VEC_F
#define MASTER_VEC_SPLAT VEC_SPLAT
#endif
#undef STEP_P
#undef STEP_G
#define MASTER_FN HALF_FN(master_)
#define MASTER_WIDEN HALF_WIDEN
#include "master_loop.h"
#undef MASTER_FN
#undef MASTER_WIDEN
#undef MASTER_STEP
#undef MASTER_VEC_STEP
#undef MASTER_VEC_WIDTH
#undef MASTER_VEC_A
#undef MASTER_VEC_SPLAT

#undef HALF_ROUND_COPY
#undef HALF_NAN_ROUNDED
#undef HALF_FN
#undef NAN_FIRST
#undef HALF_KEEPS_NAN
#undef HALF_NAME
#undef HALF_WIDEN
#undef HALF_ROUND_BODY
#undef HALF_ROUND_TAIL
#undef HALF_NONFINITE
#undef VEC_WIDEN
#undef VEC_ROUND
