/* float16 and bfloat16 storage: widening to float32 and rounding back, on
 * one element, in integer and float32 arithmetic that any C99 compiler
 * runs.  The vector versions are in half_simd.h.
 *
 * torch 2.13 rounds every result of an op on 16-bit tensors to the storage
 * dtype, to nearest even, subnormals included; only NaNs differ between its
 * code paths, so each rounding here takes the NaN rule as an argument:
 *   float16, F16_NAN_QUIET:   sign, payload's top 10 bits, quiet bit set
 *                             (F16C's VCVTPS2PH: torch's AVX2/AVX-512 code);
 *   float16, F16_NAN_CANONICAL: sign | 0x7E00 (torch's software conversion,
 *                             ATEN_CPU_CAPABILITY=default);
 *   bfloat16: the 16-bit pattern to give every NaN (0xFFFF in torch's vector
 *             code, 0x7FC0 in its scalar code). */
#ifndef FASTSGD_HALF_CONVERT_H
#define FASTSGD_HALF_CONVERT_H

#include <stdint.h>
#include <string.h>

enum { F16_NAN_QUIET = 0, F16_NAN_CANONICAL = 1 };
#define BF16_NAN_VECTOR ((uint16_t)0xFFFF)
#define BF16_NAN_SCALAR ((uint16_t)0x7FC0)

static inline __attribute__((always_inline)) float fastsgd_float_of_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) uint32_t fastsgd_bits_of_float(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Exact: a bfloat16 is the top half of a float32. */
static inline __attribute__((always_inline)) float fastsgd_bf16_widen(uint16_t x)
{
    return fastsgd_float_of_bits((uint32_t)x << 16);
}

/* To nearest even by adding 0x7FFF plus the kept part's last bit (a carry
 * into the exponent is the correct rounding, up to infinity). */
static inline __attribute__((always_inline)) uint16_t fastsgd_bf16_round(float f, uint16_t nan)
{
    const uint32_t u = fastsgd_bits_of_float(f);
    const uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? nan : r;
}

/* Exact; a NaN keeps its sign and payload (shifted into float32's). */
static inline __attribute__((always_inline)) float fastsgd_f16_widen(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7FFFu;
    if (em >= 0x7C00u)  /* infinity or NaN */
        return fastsgd_float_of_bits(sign | 0x7F800000u | ((em & 0x3FFu) << 13));
    if (em >= 0x0400u)  /* normal: rebias the exponent from 15 to 127 */
        return fastsgd_float_of_bits(sign | ((em << 13) + 0x38000000u));
    const float v = (float)em * 0x1p-24f;  /* subnormal (or zero): exact */
    return sign ? -v : v;
}

static inline __attribute__((always_inline)) uint16_t fastsgd_f16_round(float f, int nan_rule)
{
    const uint32_t u = fastsgd_bits_of_float(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u)
        return (uint16_t)(sign | 0x7E00u |
                          (nan_rule == F16_NAN_QUIET ? (a >> 13) & 0x3FFu : 0u));
    if (a >= 0x477FF000u)  /* 65520 and above round to infinity */
        return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u) {  /* normal: rebias, then round the 13 dropped bits */
        const uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
    }
    /* Subnormal: in |f| + 0.5 the float32 ulp is float16's subnormal step,
     * 2**-24, so the float32 addition rounds to nearest even for us. */
    const float t = fastsgd_float_of_bits(a) + 0.5f;
    return (uint16_t)(sign | (fastsgd_bits_of_float(t) - 0x3F000000u));
}

#endif
