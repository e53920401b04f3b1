/* Every instantiation of the SGD loop, and the choice between them.
 *
 * "default" is compiled for the baseline instruction set with separate
 * multiply and add, the rounding of torch at ATEN_CPU_CAPABILITY=default.
 * "avx2" and "avx512" are compiled per function for their instruction set
 * (never the whole file: the module must load on any x86-64) and round each
 * multiply-add once, as torch's vectorised CPU kernels do.  The build uses
 * -ffp-contract=off so that no compiler fuses what is written unfused. */
#include <stddef.h>
#include <string.h>

#include "fastsgd.h"

#define SGD_UNFUSED(a, b, c) ((c) + (a) * (b))

#define SGD_TARGET
#define SGD_MADD SGD_UNFUSED
#define SGD_T float
#define SGD_FN sgd_f32_default
#include "sgd_loop.h"
#undef SGD_T
#undef SGD_FN
#define SGD_T double
#define SGD_FN sgd_f64_default
#include "sgd_loop.h"
#undef SGD_T
#undef SGD_FN
#undef SGD_MADD
#undef SGD_TARGET

static const fastsgd_impl impl_default = {"default", sgd_f32_default, sgd_f64_default};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSGD_HAVE_X86_IMPLS 1

#define SGD_FUSED_F32(a, b, c) __builtin_fmaf((a), (b), (c))
#define SGD_FUSED_F64(a, b, c) __builtin_fma((a), (b), (c))

#define SGD_TARGET __attribute__((target("avx2,fma")))
#define SGD_T float
#define SGD_FN sgd_f32_avx2
#define SGD_MADD SGD_FUSED_F32
#include "sgd_loop.h"
#undef SGD_T
#undef SGD_FN
#undef SGD_MADD
#define SGD_T double
#define SGD_FN sgd_f64_avx2
#define SGD_MADD SGD_FUSED_F64
#include "sgd_loop.h"
#undef SGD_T
#undef SGD_FN
#undef SGD_MADD
#undef SGD_TARGET

#define SGD_TARGET                                                              \
    __attribute__((target("avx512f,avx512vl,avx2,fma,prefer-vector-width=512")))
#define SGD_T float
#define SGD_FN sgd_f32_avx512
#define SGD_MADD SGD_FUSED_F32
#include "sgd_loop.h"
#undef SGD_T
#undef SGD_FN
#undef SGD_MADD
#define SGD_T double
#define SGD_FN sgd_f64_avx512
#define SGD_MADD SGD_FUSED_F64
#include "sgd_loop.h"
#undef SGD_T
#undef SGD_FN
#undef SGD_MADD
#undef SGD_TARGET

static const fastsgd_impl impl_avx2 = {"avx2", sgd_f32_avx2, sgd_f64_avx2};
static const fastsgd_impl impl_avx512 = {"avx512", sgd_f32_avx512, sgd_f64_avx512};

static int cpu_runs(const fastsgd_impl *impl)
{
    __builtin_cpu_init();
    if (impl == &impl_avx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (impl == &impl_avx2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return 1;
}
#else
static int cpu_runs(const fastsgd_impl *impl)
{
    (void)impl;
    return 1;
}
#endif

/* Best first. */
static const fastsgd_impl *const all_impls[] = {
#ifdef FASTSGD_HAVE_X86_IMPLS
    &impl_avx512,
    &impl_avx2,
#endif
    &impl_default,
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
