/* Runs a kernel over a tensor list: the list is one run of elements, cut
 * into one span per thread.  Large tensors are split and small ones batched
 * alike, and cuts fall on the parameter's cache lines so that no two threads
 * write the same line.  Each element's result depends on that element alone,
 * so the numbers are the same for any thread count. */
#include <stddef.h>

#include "fastsgd.h"

#ifdef _OPENMP
#include <omp.h>
#include <pthread.h>
#endif

#define CACHE_LINE 64

/* Below this much memory traffic per thread a call stays on the calling
 * thread: waking a second thread costs more than it saves.  The default is
 * measured by benchmarks/threshold.py. */
static int64_t parallel_min_bytes_per_thread = (int64_t)1 << 18;

#ifdef _OPENMP
/* GNU OpenMP is not fork-safe: a child forked after the parent's thread pool
 * started hangs in its first parallel region, waiting for threads that fork
 * did not copy.  Such a child runs every call on its own thread. */
static int pool_started = 0;
static int forked_after_pool = 0;

static void after_fork_in_child(void)
{
    if (pool_started)
        forked_after_pool = 1;
}

__attribute__((constructor)) static void register_fork_handler(void)
{
    pthread_atfork(NULL, NULL, after_fork_in_child);
}
#endif

typedef struct {
    int64_t tensor;
    int64_t offset;
} position;

static size_t elem_size(int dtype)
{
    return dtype == FASTSGD_F32 ? 4 : dtype == FASTSGD_F64 ? 8 : 2;
}

/* What run() runs over a list's spans. */
typedef enum { RUN_SGD, RUN_STREAM, RUN_MASTER, RUN_STREAM_MASTER, RUN_CHECK } run_mode;

typedef struct {
    run_mode mode;
    const fastsgd_sgd_hyper *h;
    float inv_scale;   /* RUN_MASTER */
    int nonfinite;     /* RUN_CHECK: set when a span finds an inf or NaN */
} run_job;

static int64_t total_elements(const fastsgd_tensor_list *list)
{
    int64_t total = 0;
    for (int64_t t = 0; t < list->ntensors; t++)
        total += list->sizes[t];
    return total;
}

#ifdef _OPENMP
/* The position of element `v` of the run, moved forward to the next cache
 * line of its parameter (or the next tensor). */
static position locate(const fastsgd_tensor_list *list, int64_t v, size_t es)
{
    int64_t start = 0;
    for (int64_t t = 0; t < list->ntensors; t++) {
        int64_t n = list->sizes[t];
        if (v < start + n) {
            int64_t offset = v - start;
            uintptr_t addr = (uintptr_t)list->params[t] + (uintptr_t)offset * es;
            offset += (int64_t)(((CACHE_LINE - addr % CACHE_LINE) % CACHE_LINE) / es);
            if (offset >= n) {
                position next = {t + 1, 0};
                return next;
            }
            position here = {t, offset};
            return here;
        }
        start += n;
    }
    position end = {list->ntensors, 0};
    return end;
}

/* Where span k of nt begins (and span k - 1 ends): the run's ends stay put,
 * the cuts between spans move to a cache line. */
static position cut(const fastsgd_tensor_list *list, int64_t k, int64_t nt, int64_t total,
                    size_t es)
{
    if (k == 0) {
        position begin = {0, 0};
        return begin;
    }
    if (k == nt) {
        position end = {list->ntensors, 0};
        return end;
    }
    return locate(list, total * k / nt, es);
}
#endif

static void run_span(const fastsgd_impl *impl, int dtype, run_job *job,
                     const fastsgd_tensor_list *list, position begin, position end)
{
    const size_t es = elem_size(dtype);
    /* master weights: float32 masters and buffers beside 16-bit params */
    const size_t bs = list->masters ? sizeof(float) : es;
    for (int64_t t = begin.tensor; t < list->ntensors && t <= end.tensor; t++) {
        int64_t lo = t == begin.tensor ? begin.offset : 0;
        int64_t hi = t == end.tensor ? end.offset : list->sizes[t];
        if (hi <= lo)
            continue;
        char *p = (char *)list->params[t] + (size_t)lo * es;
        const char *g = (const char *)list->grads[t] + (size_t)lo * es;
        char *b = list->bufs ? (char *)list->bufs[t] + (size_t)lo * bs : NULL;
        const int flags = list->buf_is_new ? list->buf_is_new[t] : 0;
        if (job->mode == RUN_SGD) {  /* a step's path, first */
            /* 16-bit: torch's vector body ends where the tensor's last
             * n % 32 begin */
            int64_t n_body = hi - lo;
            if (es == 2) {
                const int64_t body_end = list->sizes[t] - list->sizes[t] % FASTSGD_HALF_CHUNK;
                n_body = body_end <= lo ? 0 : body_end >= hi ? hi - lo : body_end - lo;
            }
            impl->sgd[dtype](job->h, p, g, b, hi - lo, flags, n_body, NULL);
            continue;
        }
        char *master = list->masters ? (char *)list->masters[t] + (size_t)lo * bs : NULL;
        switch (job->mode) {
        case RUN_SGD:
            break;
        case RUN_STREAM:
            impl->stream[dtype](p, g, b, hi - lo);
            break;
        case RUN_MASTER:
            impl->master[dtype](job->h, p, g, b, master, hi - lo, flags, job->inv_scale);
            break;
        case RUN_STREAM_MASTER:
            impl->stream_master(p, g, b, master, hi - lo);
            break;
        case RUN_CHECK:
            if (!impl->finite[dtype](g, hi - lo)) {
                job->nonfinite = 1;
                return;
            }
            break;
        }
    }
}

/* As many threads as may run, but no more than have `per_thread` of the
 * `work` each (at least one). */
static int threads_with_at_least(int64_t work, int64_t per_thread)
{
    const int64_t wanted = work / (per_thread > 0 ? per_thread : 1);
    const int max_threads = fastsgd_get_num_threads();
    return wanted < 1 ? 1 : wanted > max_threads ? max_threads : (int)wanted;
}

int fastsgd_threads_for(int dtype, int64_t total, int with_buffers)
{
    /* param, grad read and param written; buffer read and written */
    const int64_t bytes = total * (int64_t)elem_size(dtype) * (with_buffers ? 5 : 3);
    return threads_with_at_least(bytes, parallel_min_bytes_per_thread);
}

static void run(const fastsgd_impl *impl, int dtype, run_job *job,
                const fastsgd_tensor_list *list, int serial)
{
    const int64_t total = total_elements(list);
    const int nthreads = fastsgd_threads_for(dtype, total, list->bufs != NULL);
    if (nthreads <= 1 || serial) {
        position begin = {0, 0}, end = {list->ntensors, 0};
        run_span(impl, dtype, job, list, begin, end);
        return;
    }
#ifdef _OPENMP
    const size_t es = elem_size(dtype);
    pool_started = 1;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t k = omp_get_thread_num(), nt = omp_get_num_threads();
        run_job mine = *job;  /* RUN_CHECK's flag, or'ed in below */
        run_span(impl, dtype, &mine, list, cut(list, k, nt, total, es),
                 cut(list, k + 1, nt, total, es));
        if (mine.nonfinite) {
#pragma omp atomic write
            job->nonfinite = 1;
        }
    }
#endif
}

void fastsgd_sgd(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                 const fastsgd_tensor_list *list, int serial)
{
    run_job job = {RUN_SGD, h, 1.0f, 0};
    run(impl, dtype, &job, list, serial);
}

void fastsgd_sgd_strided(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                         void *p, const void *g, void *b, int64_t n, int first,
                         const uint8_t *modes)
{
    impl->sgd[dtype](h, p, g, b, n, first, n, modes);
}

void fastsgd_stream(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                    int serial)
{
    run_job job = {list->masters ? RUN_STREAM_MASTER : RUN_STREAM, NULL, 1.0f, 0};
    run(impl, dtype, &job, list, serial);
}

/* ---- half precision (issue 14) */
void fastsgd_sgd_master(const fastsgd_impl *impl, int dtype, const fastsgd_sgd_hyper *h,
                        const fastsgd_tensor_list *list, float inv_scale, int serial)
{
    run_job job = {RUN_MASTER, h, inv_scale, 0};
    run(impl, dtype, &job, list, serial);
}

void fastsgd_stream_master(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                           int serial)
{
    run_job job = {RUN_STREAM_MASTER, NULL, 1.0f, 0};
    run(impl, dtype, &job, list, serial);
}

int fastsgd_grads_finite(const fastsgd_impl *impl, int dtype, const fastsgd_tensor_list *list,
                         int serial)
{
    run_job job = {RUN_CHECK, NULL, 1.0f, 0};
    run(impl, dtype, &job, list, serial);
    return !job.nonfinite;
}

int fastsgd_unscale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *arrays,
                    const int64_t *sizes, float inv_scale)
{
    int found = 0;
    for (int64_t t = 0; t < ntensors; t++)
        found |= impl->unscale[dtype](arrays[t], sizes[t], inv_scale);
    return found;
}
/* ---- */

void fastsgd_norms(const fastsgd_impl *impl, int dtype, int64_t ntensors,
                   const void *const *arrays, const int64_t *sizes, double p, double *norms)
{
    for (int64_t t = 0; t < ntensors; t++)
        norms[t] = impl->norm[dtype](arrays[t], sizes[t], p);
}

void fastsgd_scale(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *arrays,
                   const int64_t *sizes, double coef)
{
    for (int64_t t = 0; t < ntensors; t++)
        impl->scale[dtype](arrays[t], sizes[t], coef);
}

void fastsgd_clamp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *arrays,
                   const int64_t *sizes, double lo, double hi)
{
    for (int64_t t = 0; t < ntensors; t++)
        impl->clamp[dtype](arrays[t], sizes[t], lo, hi);
}

void fastsgd_lerp(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *avgs,
                  const void *const *curs, const int64_t *sizes, double weight)
{
    for (int64_t t = 0; t < ntensors; t++)
        impl->lerp[dtype](avgs[t], curs[t], sizes[t], weight);
}

void fastsgd_mean(const fastsgd_impl *impl, int dtype, int64_t ntensors, void *const *avgs,
                  const void *const *curs, const int64_t *sizes, double count)
{
    for (int64_t t = 0; t < ntensors; t++)
        impl->mean[dtype](avgs[t], curs[t], sizes[t], count);
}

int fastsgd_parallel_ranges(int64_t n, int64_t min_per_thread, fastsgd_range_fn fn, void *ctx)
{
    const int nthreads = threads_with_at_least(n, min_per_thread);
    if (nthreads <= 1)
        return 1;
#ifdef _OPENMP
    pool_started = 1;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t k = omp_get_thread_num(), nt = omp_get_num_threads();
        fn(ctx, n * k / nt, n * (k + 1) / nt);
    }
#else
    (void)fn, (void)ctx;  /* one thread: returned above */
#endif
    return nthreads;
}

int64_t fastsgd_get_parallel_min_bytes(void) { return parallel_min_bytes_per_thread; }

void fastsgd_set_parallel_min_bytes(int64_t bytes)
{
    parallel_min_bytes_per_thread = bytes > 0 ? bytes : 1;
}

int fastsgd_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fastsgd_get_num_threads(void)
{
#ifdef _OPENMP
    return forked_after_pool ? 1 : omp_get_max_threads();
#else
    return 1;
#endif
}

void fastsgd_set_num_threads(int n)
{
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}
