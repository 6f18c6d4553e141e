/* fp32 matrix-vector products for CPU decode: out[m, n] = sum_k x[m, k] * W[n, k]
 * for a few activation rows (llmopt::dense_linear sends 1-8, or 3-8 on Intel CPUs),
 * W (n, k) row-major.
 *
 * Why not PyTorch's F.linear: a decode step of an fp32 model is one pass over
 * every weight, and for a few rows MKL reads it well below the memory's rate
 * (from 3 rows on, and on AMD also at 1-2 rows, where its sgemv runs on one
 * thread; kernels/dense_linear.py, docs/PERFORMANCE.md). Here the weight rows are
 * split over the OpenMP threads and streamed once, four rows at a time, each
 * loaded vector used for every activation row (the activations stay in L1).
 *
 * Accumulation is fp32 with 16 (AVX-512) or 8 (AVX2) partial sums per weight row,
 * added at the end: a different order from MKL's, so results differ from
 * F.linear by rounding only (the tests bound it against an fp64 reference).
 *
 * Parallel over blocks of weight rows with OpenMP (the runtime torch loads, so
 * torch.set_num_threads applies).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define WROWS 4 /* weight rows per block */
#define XROWS 4 /* activation rows per pass over a block (a block is re-read from cache for more) */
/* Software prefetch distance in bytes along each weight row: the four row streams of a
 * block are more than the hardware prefetcher keeps ahead of on its own. */
#define PREFETCH 1024

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void block(const float *const w[WROWS], const float *x, int64_t k,
                                                        int rows, float *res) {
    __m512 acc[XROWS][WROWS];
    for (int r = 0; r < XROWS; r++)
        for (int j = 0; j < WROWS; j++) acc[r][j] = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m512 wv[WROWS];
        for (int j = 0; j < WROWS; j++) {
            _mm_prefetch((const char *)(w[j] + kk) + PREFETCH, _MM_HINT_T0);
            wv[j] = _mm512_loadu_ps(w[j] + kk);
        }
        for (int r = 0; r < rows; r++) {
            const __m512 xv = _mm512_loadu_ps(x + r * k + kk);
            for (int j = 0; j < WROWS; j++) acc[r][j] = _mm512_fmadd_ps(wv[j], xv, acc[r][j]);
        }
    }
    if (kk < k) {
        const __mmask16 mask = (__mmask16)((1u << (k - kk)) - 1u);
        __m512 wv[WROWS];
        for (int j = 0; j < WROWS; j++) wv[j] = _mm512_maskz_loadu_ps(mask, w[j] + kk);
        for (int r = 0; r < rows; r++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * k + kk);
            for (int j = 0; j < WROWS; j++) acc[r][j] = _mm512_fmadd_ps(wv[j], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < WROWS; j++) res[r * WROWS + j] = _mm512_reduce_add_ps(acc[r][j]);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void block(const float *const w[WROWS], const float *x, int64_t k,
                                                        int rows, float *res) {
    __m256 acc[XROWS][WROWS];
    for (int r = 0; r < XROWS; r++)
        for (int j = 0; j < WROWS; j++) acc[r][j] = _mm256_setzero_ps();
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 wv[WROWS];
        for (int j = 0; j < WROWS; j++) {
            _mm_prefetch((const char *)(w[j] + kk) + PREFETCH, _MM_HINT_T0);
            wv[j] = _mm256_loadu_ps(w[j] + kk);
        }
        for (int r = 0; r < rows; r++) {
            const __m256 xv = _mm256_loadu_ps(x + r * k + kk);
            for (int j = 0; j < WROWS; j++) acc[r][j] = _mm256_fmadd_ps(wv[j], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < WROWS; j++) {
            float s = hsum256(acc[r][j]);
            for (int64_t t = kk; t < k; t++) s += w[j][t] * x[r * k + t];
            res[r * WROWS + j] = s;
        }
}
#else
static void block(const float *const w[WROWS], const float *x, int64_t k, int rows, float *res) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < WROWS; j++) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t t = 0; t < k; t++) s += w[j][t] * x[r * k + t];
            res[r * WROWS + j] = s;
        }
}
#endif

/* One call per constant `rows`, so each variant keeps its accumulators in registers. */
static void block_rows(const float *const w[WROWS], const float *x, int64_t k, int rows, float *res) {
    switch (rows) {
    case 1: block(w, x, k, 1, res); break;
    case 2: block(w, x, k, 2, res); break;
    case 3: block(w, x, k, 3, res); break;
    default: block(w, x, k, 4, res); break;
    }
}

/* x: (m, k) fp32 contiguous; w: (n, k) fp32 contiguous; out: (m, n) fp32.
 * Returns 0, or -1 for shapes it does not take. */
int llmopt_f32_gemv(const float *x, const float *w, float *out, int64_t m, int64_t n, int64_t k) {
    if (m < 0 || n < 1 || k < 1) return -1;
    if (m == 0) return 0;
    const int64_t blocks = (n + WROWS - 1) / WROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * WROWS;
        const int valid = (int)(n - n0 < WROWS ? n - n0 : WROWS);
        const float *rows_w[WROWS];
        /* a last, partial block reads its last row again in the missing places (results dropped) */
        for (int j = 0; j < WROWS; j++) rows_w[j] = w + (n0 + (j < valid ? j : valid - 1)) * k;
        for (int64_t r0 = 0; r0 < m; r0 += XROWS) {
            const int rows = (int)(m - r0 < XROWS ? m - r0 : XROWS);
            float res[XROWS * WROWS];
            block_rows(rows_w, x + r0 * k, k, rows, res);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < valid; j++) out[(r0 + r) * n + n0 + j] = res[r * WROWS + j];
        }
    }
    return 0;
}
