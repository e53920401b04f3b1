/* Every instantiation of the SGD loop, and the choice between them.
 *
 * "default" is compiled for the baseline instruction set with separate
 * multiply and add: the rounding of torch at ATEN_CPU_CAPABILITY=default,
 * which torch also uses on x86-64 CPUs without AVX2.
 * "portable" rounds each multiply-add once through C99 fma(): the rounding
 * of torch's vectorised kernels on any CPU, and the reference the SIMD
 * builds are tested against.
 * For float16 and bfloat16 the same split: "default" rounds every element
 * as torch's scalar code at ATEN_CPU_CAPABILITY=default; "portable", "avx2"
 * and "avx512" as torch 2.13's AVX2/AVX-512 kernels (which agree: a vector
 * body, then the scalar code on each tensor's last n % 32 elements), the
 * SIMD builds with F16C and AVX-512 conversions, "portable" in C.
 * "avx2" and "avx512" are the same loop compiled per function for their
 * instruction set (never the whole file: the module must load on any
 * x86-64).  The build uses -ffp-contract=off so that no compiler fuses
 * what is written unfused. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "fastsgd.h"
#include "half_convert.h"
#include "half_simd.h"

#define IMPL_NAME default
#define IMPL_TARGET
#define IMPL_MADD_F32(a, b, c) ((c) + (a) * (b))
#define IMPL_MADD_F64(a, b, c) ((c) + (a) * (b))
#define IMPL_FUSED16 0
#define IMPL_F16_NAN F16_NAN_CANONICAL
#define IMPL_VEC16 0
#include "sgd_instantiate.h"

#define IMPL_NAME portable
#define IMPL_TARGET
#define IMPL_MADD_F32(a, b, c) fmaf((a), (b), (c))
#define IMPL_MADD_F64(a, b, c) fma((a), (b), (c))
#define IMPL_FUSED16 1
#define IMPL_F16_NAN F16_NAN_QUIET
#define IMPL_VEC16 0
#include "sgd_instantiate.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSGD_X86 1

#define IMPL_NAME avx2
#define IMPL_TARGET __attribute__((target("avx2,fma,f16c")))
#define IMPL_MADD_F32(a, b, c) __builtin_fmaf((a), (b), (c))
#define IMPL_MADD_F64(a, b, c) __builtin_fma((a), (b), (c))
#define IMPL_FUSED16 1
#define IMPL_F16_NAN F16_NAN_QUIET
#define IMPL_VEC16 2
#include "sgd_instantiate.h"

#define IMPL_NAME avx512
#define IMPL_TARGET \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma,f16c,prefer-vector-width=512")))
#define IMPL_MADD_F32(a, b, c) __builtin_fmaf((a), (b), (c))
#define IMPL_MADD_F64(a, b, c) __builtin_fma((a), (b), (c))
#define IMPL_FUSED16 1
#define IMPL_F16_NAN F16_NAN_QUIET
#define IMPL_VEC16 512
#include "sgd_instantiate.h"

static int cpu_runs(const fastsgd_impl *impl)
{
    __builtin_cpu_init();
    if (impl == &impl_avx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (impl == &impl_avx2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    return 1;
}
#else
static int cpu_runs(const fastsgd_impl *impl)
{
    (void)impl;
    return 1;
}
#endif

/* In order of preference: the first one the CPU runs is the default choice.
 * On x86-64 without AVX2, torch runs its "default" kernels, so fastsgd
 * does too; elsewhere torch's kernels fuse, and "portable" does. */
static const fastsgd_impl *const all_impls[] = {
#ifdef FASTSGD_X86
    &impl_avx512,
    &impl_avx2,
    &impl_default,
    &impl_portable,
#else
    &impl_portable,
    &impl_default,
#endif
};
#define N_IMPLS (sizeof all_impls / sizeof all_impls[0])

const fastsgd_impl *fastsgd_find_impl(const char *name)
{
    for (size_t i = 0; i < N_IMPLS; i++)
        if (strcmp(all_impls[i]->name, name) == 0)
            return cpu_runs(all_impls[i]) ? all_impls[i] : NULL;
    return NULL;
}

const fastsgd_impl *fastsgd_best_impl(void)
{
    for (size_t i = 0; i < N_IMPLS; i++)
        if (cpu_runs(all_impls[i]))
            return all_impls[i];
    return &impl_default;
}

const char *const *fastsgd_impl_names(void)
{
    static const char *names[N_IMPLS + 1];
    for (size_t i = 0; i < N_IMPLS; i++)
        names[i] = all_impls[i]->name;
    names[N_IMPLS] = NULL;
    return names;
}
