/* Instantiates the SGD loop of sgd_loop.h, the roofline loop of
 * stream_loop.h and the clipping loops of clip_loop.h for float32 and
 * float64 as the implementation `impl_<IMPL_NAME>`.  Before including,
 * define IMPL_NAME, IMPL_TARGET, IMPL_MADD_F32 and IMPL_MADD_F64. */
#define IMPL_STR_(x) #x
#define IMPL_STR(x) IMPL_STR_(x)
#define IMPL_CAT_(a, b) a##b
#define IMPL_CAT(a, b) IMPL_CAT_(a, b)

#define SGD_TARGET IMPL_TARGET

#define SGD_T float
#define SGD_UINT uint32_t
#define SGD_FN IMPL_CAT(sgd_f32_, IMPL_NAME)
#define STREAM_FN IMPL_CAT(stream_f32_, IMPL_NAME)
#define SGD_MADD IMPL_MADD_F32
#define NORM_FN IMPL_CAT(norm_f32_, IMPL_NAME)
#define SCALE_FN IMPL_CAT(scale_f32_, IMPL_NAME)
#define CLAMP_FN IMPL_CAT(clamp_f32_, IMPL_NAME)
#include "sgd_loop.h"
#include "stream_loop.h"
#include "clip_loop.h"
#undef SGD_T
#undef SGD_UINT
#undef SGD_FN
#undef STREAM_FN
#undef SGD_MADD
#undef NORM_FN
#undef SCALE_FN
#undef CLAMP_FN

#define SGD_T double
#define SGD_UINT uint64_t
#define SGD_FN IMPL_CAT(sgd_f64_, IMPL_NAME)
#define STREAM_FN IMPL_CAT(stream_f64_, IMPL_NAME)
#define SGD_MADD IMPL_MADD_F64
#define NORM_FN IMPL_CAT(norm_f64_, IMPL_NAME)
#define SCALE_FN IMPL_CAT(scale_f64_, IMPL_NAME)
#define CLAMP_FN IMPL_CAT(clamp_f64_, IMPL_NAME)
#include "sgd_loop.h"
#include "stream_loop.h"
#include "clip_loop.h"
#undef SGD_T
#undef SGD_UINT
#undef SGD_FN
#undef STREAM_FN
#undef SGD_MADD
#undef NORM_FN
#undef SCALE_FN
#undef CLAMP_FN

#undef SGD_TARGET

static const fastsgd_impl IMPL_CAT(impl_, IMPL_NAME) = {
    IMPL_STR(IMPL_NAME),
    {IMPL_CAT(sgd_f32_, IMPL_NAME), IMPL_CAT(sgd_f64_, IMPL_NAME)},
    {IMPL_CAT(stream_f32_, IMPL_NAME), IMPL_CAT(stream_f64_, IMPL_NAME)},
    {IMPL_CAT(norm_f32_, IMPL_NAME), IMPL_CAT(norm_f64_, IMPL_NAME)},
    {IMPL_CAT(scale_f32_, IMPL_NAME), IMPL_CAT(scale_f64_, IMPL_NAME)},
    {IMPL_CAT(clamp_f32_, IMPL_NAME), IMPL_CAT(clamp_f64_, IMPL_NAME)},
};

#undef IMPL_NAME
#undef IMPL_TARGET
#undef IMPL_MADD_F32
#undef IMPL_MADD_F64
