/* The roofline's loops: the reads and writes per element of an SGD step
 * (param, grad and buffer read; param and buffer written) with next to no
 * arithmetic, instantiated like sgd_loop.h with STREAM_FN naming the
 * function to define; with STREAM_MASTER_FN defined, STREAM_FN's 16-bit
 * version and the loop of a master-weights step (16-bit grad read, float32
 * master and buffer read and written, 16-bit param written).  The
 * benchmark's yardstick, never a step's path. */

#ifndef STREAM_MASTER_FN
SGD_TARGET static void STREAM_FN(void *p_, const void *g_, void *b_, int64_t n)
{
    SGD_T *restrict p = (SGD_T *)p_;
    const SGD_T *restrict g = (const SGD_T *)g_;
    SGD_T *restrict b = (SGD_T *)b_;
    if (b) {
        for (int64_t i = 0; i < n; i++) {
            b[i] = b[i] + g[i];
            p[i] = p[i] + b[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            p[i] = p[i] + g[i];
    }
}
#else
/* 16-bit: each value keeps its magnitude and takes the sign of the one it
 * reads, so that the arrays, which fastsgd's step shares in the benchmark,
 * hold no subnormal or NaN a step would then be slowed by. */
#define STREAM_SIGN(x, from) ((uint16_t)(((x) & 0x7FFFu) | ((from) & 0x8000u)))

SGD_TARGET static void STREAM_FN(void *p_, const void *g_, void *b_, int64_t n)
{
    uint16_t *restrict p = (uint16_t *)p_;
    const uint16_t *restrict g = (const uint16_t *)g_;
    uint16_t *restrict b = (uint16_t *)b_;
    if (b) {
        for (int64_t i = 0; i < n; i++) {
            b[i] = STREAM_SIGN(b[i], g[i]);
            p[i] = STREAM_SIGN(p[i], b[i]);
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            p[i] = STREAM_SIGN(p[i], g[i]);
    }
}

SGD_TARGET static void STREAM_MASTER_FN(void *p_, const void *g_, void *b_, void *master_,
                                        int64_t n)
{
    uint16_t *restrict p = (uint16_t *)p_;
    const uint16_t *restrict g = (const uint16_t *)g_;
    uint32_t *restrict b = (uint32_t *)b_;
    uint32_t *restrict master = (uint32_t *)master_;
    for (int64_t i = 0; i < n; i++) {
        uint32_t x = (master[i] & 0x7FFFFFFFu) | ((uint32_t)(g[i] & 0x8000u) << 16);
        if (b) {
            b[i] = (b[i] & 0x7FFFFFFFu) | (x & 0x80000000u);
            x ^= b[i] & 0x80000000u;
        }
        master[i] = x;
        p[i] = STREAM_SIGN(p[i], x >> 16);
    }
}
#undef STREAM_SIGN
#endif
