/* The roofline's loops: the reads and writes per element of an SGD step
 * (param, grad and buffer read; param and buffer written) with next to no
 * arithmetic, instantiated like sgd_loop.h with STREAM_FN naming the
 * function to define; and, with STREAM_MASTER_FN defined, those of a
 * master-weights step (16-bit grad read, float32 master and buffer read and
 * written, 16-bit param written).  The benchmark's yardstick, never a
 * step's path. */

SGD_TARGET static void STREAM_FN(void *p_, const void *g_, void *b_, int64_t n)
{
    SGD_T *restrict p = (SGD_T *)p_;
    const SGD_T *restrict g = (const SGD_T *)g_;
    SGD_T *restrict b = (SGD_T *)b_;
    if (b) {
        for (int64_t i = 0; i < n; i++) {
            b[i] = (SGD_T)(b[i] + g[i]);
            p[i] = (SGD_T)(p[i] + b[i]);
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            p[i] = (SGD_T)(p[i] + g[i]);
    }
}

#ifdef STREAM_MASTER_FN
SGD_TARGET static void STREAM_MASTER_FN(void *p_, const void *g_, void *b_, void *master_,
                                        int64_t n)
{
    uint16_t *restrict p = (uint16_t *)p_;
    const uint16_t *restrict g = (const uint16_t *)g_;
    float *restrict b = (float *)b_;
    float *restrict master = (float *)master_;
    for (int64_t i = 0; i < n; i++) {
        float x = master[i] + (float)g[i];
        if (b) {
            x = x + b[i];
            b[i] = x;
        }
        master[i] = x;
        p[i] = (uint16_t)(fastsgd_bits_of_float(x) >> 16);
    }
}
#endif
