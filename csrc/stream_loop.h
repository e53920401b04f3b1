/* The roofline's loop: the reads and writes per element of an SGD step
 * (param, grad and buffer read; param and buffer written) with next to no
 * arithmetic, instantiated like sgd_loop.h with STREAM_FN naming the
 * function to define.  The benchmark's yardstick, never a step's path. */

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
