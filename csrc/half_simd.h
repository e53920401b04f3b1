/* float16 and bfloat16 lanes for the AVX2 and AVX-512 kernels: a lane is 8
 * (AVX2) or 16 (AVX-512) elements, widened to float32 and rounded back as
 * torch's vectorised code does (half_convert.h states the rules; these are
 * the same roundings, NaN rules of torch's vector code: float16 through
 * F16C's VCVTPS2PH, bfloat16 by integer adds with every NaN made 0xFFFF).
 *
 * avx512_bf16's VCVTNEPS2BF16 is not used: it treats subnormal inputs as
 * zero and gives NaNs other bits than torch.  Each function carries its
 * instruction set as a target attribute; nothing here needs -march. */
#ifndef FASTSGD_HALF_SIMD_H
#define FASTSGD_HALF_SIMD_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define HALF_AVX2 __attribute__((always_inline, target("avx2,fma,f16c"))) static inline
#define HALF_AVX512 \
    __attribute__((always_inline, target("avx512f,avx512vl,avx512bw,avx2,fma,f16c"))) static inline

/* ---- AVX2: 8 elements, __m128i of storage, __m256 of float32 */

HALF_AVX2 __m128i half8_load(const uint16_t *p) { return _mm_loadu_si128((const __m128i *)p); }
HALF_AVX2 void half8_store(uint16_t *p, __m128i v) { _mm_storeu_si128((__m128i *)p, v); }
HALF_AVX2 __m128i half8_negate(__m128i v) { return _mm_xor_si128(v, _mm_set1_epi16((short)0x8000)); }

HALF_AVX2 __m256 f16x8_widen(__m128i v) { return _mm256_cvtph_ps(v); }
HALF_AVX2 __m128i f16x8_round(__m256 f)
{
    return _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

HALF_AVX2 __m256 bf16x8_widen(__m128i v)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
HALF_AVX2 __m128i bf16x8_round(__m256 f)
{
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)), u), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* c where c is NaN, else r: the NaN an op propagates, chosen explicitly
 * (a compiler's FMA form could pick another operand's). */
HALF_AVX2 __m256 f32x8_nan_first(__m256 c, __m256 r)
{
    return _mm256_blendv_ps(r, c, _mm256_cmp_ps(c, c, _CMP_UNORD_Q));
}

/* bfloat16 kept in float32 lanes between ops: rounded to nearest even in
 * place (low 16 bits cleared, every NaN nan << 16: torch's vector code's
 * 0xFFFF, or its scalar code's 0x7FC0), packed on store. */
HALF_AVX2 __m256 bf16x8_round_in_lane_nan(__m256 f, uint16_t nan)
{
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(
        _mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)), u),
        _mm256_set1_epi32((int)0xFFFF0000u));
    const __m256 is_nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(
                                _mm256_set1_epi32((int)((uint32_t)nan << 16))), is_nan);
}
HALF_AVX2 __m256 bf16x8_round_in_lane(__m256 f) { return bf16x8_round_in_lane_nan(f, 0xFFFF); }
HALF_AVX2 __m128i bf16x8_pack(__m256 f)
{
    const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(f), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* All ones in the lanes of the 8 elements at modes whose byte has a bit of
 * op set (a strided tensor's op computed by torch's vector body), as 16-bit
 * and as 32-bit lanes. */
HALF_AVX2 __m128i half8_mode_mask(const uint8_t *modes, int op)
{
    const __m128i m = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)modes));
    const __m128i zero = _mm_setzero_si128();
    return _mm_andnot_si128(_mm_cmpeq_epi16(_mm_and_si128(m, _mm_set1_epi16((short)op)), zero),
                            _mm_set1_epi16(-1));
}
HALF_AVX2 __m256 f32x8_mode_mask(const uint8_t *modes, int op)
{
    const __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)modes));
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_and_si256(m, _mm256_set1_epi32(op)), _mm256_setzero_si256()));
}

HALF_AVX2 __m256 f32x8_load(const float *p) { return _mm256_loadu_ps(p); }
HALF_AVX2 void f32x8_store(float *p, __m256 v) { _mm256_storeu_ps(p, v); }
HALF_AVX2 __m256 f32x8_negate(__m256 v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }

/* ---- AVX-512: 16 elements, __m256i of storage, __m512 of float32 */

HALF_AVX512 __m256i half16_load(const uint16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
HALF_AVX512 void half16_store(uint16_t *p, __m256i v) { _mm256_storeu_si256((__m256i *)p, v); }
HALF_AVX512 __m256i half16_negate(__m256i v)
{
    return _mm256_xor_si256(v, _mm256_set1_epi16((short)0x8000));
}

HALF_AVX512 __m512 f16x16_widen(__m256i v) { return _mm512_cvtph_ps(v); }
HALF_AVX512 __m256i f16x16_round(__m512 f)
{
    return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

HALF_AVX512 __m512 bf16x16_widen(__m256i v)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
HALF_AVX512 __m256i bf16x16_round(__m512 f)
{
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)), u), 16);
    const __mmask16 ordered = _mm512_cmp_ps_mask(f, f, _CMP_ORD_Q);
    r = _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0xFFFF), r);
    return _mm512_cvtepi32_epi16(r);
}

HALF_AVX512 __m512 f32x16_nan_first(__m512 c, __m512 r)
{
    return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q), c);
}

HALF_AVX512 __m512 bf16x16_round_in_lane(__m512 f)
{
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(
        _mm512_add_epi32(_mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)), u),
        _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32((int)0xFFFF0000u));
    return _mm512_castsi512_ps(r);
}
HALF_AVX512 __m256i bf16x16_pack(__m512 f)
{
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16));
}

HALF_AVX512 __m512 f32x16_load(const float *p) { return _mm512_loadu_ps(p); }
HALF_AVX512 void f32x16_store(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
HALF_AVX512 __m512 f32x16_negate(__m512 v)
{
    return _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000u)));
}

#endif
#endif
