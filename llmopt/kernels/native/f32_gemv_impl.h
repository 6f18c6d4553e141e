/* The body of f32_gemv.c's products, included once per blocking with these macros set:
 *   GEMV_NAME  the exported function
 *   WROWS      weight rows per block (streamed together; more streams keep more loads in flight)
 *   XROWS      activation rows per pass over a block (the block is re-read from cache for more)
 *   PREFETCH   software prefetch distance in bytes along each weight row, 0 for none
 * Each inclusion defines static helpers named after GEMV_NAME, so two blockings live in one file.
 * No include guard: it is meant to be included more than once. */
#define GEMV_CAT_(a, b) a##b
#define GEMV_CAT(a, b) GEMV_CAT_(a, b)
#define GEMV_BLOCK GEMV_CAT(GEMV_NAME, _block)
#define GEMV_BLOCK_ROWS GEMV_CAT(GEMV_NAME, _block_rows)

#if PREFETCH > 0
#define GEMV_PREFETCH(p) _mm_prefetch((const char *)(p) + PREFETCH, _MM_HINT_T0)
#else
#define GEMV_PREFETCH(p) ((void)0)
#endif

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void GEMV_BLOCK(const float *const w[WROWS], const float *x, int64_t k,
                                                             int rows, float *res) {
    __m512 acc[XROWS][WROWS];
    for (int r = 0; r < XROWS; r++)
        for (int j = 0; j < WROWS; j++) acc[r][j] = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m512 wv[WROWS];
        for (int j = 0; j < WROWS; j++) {
            GEMV_PREFETCH(w[j] + kk);
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
static inline __attribute__((always_inline)) void GEMV_BLOCK(const float *const w[WROWS], const float *x, int64_t k,
                                                             int rows, float *res) {
    __m256 acc[XROWS][WROWS];
    for (int r = 0; r < XROWS; r++)
        for (int j = 0; j < WROWS; j++) acc[r][j] = _mm256_setzero_ps();
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 wv[WROWS];
        for (int j = 0; j < WROWS; j++) {
            GEMV_PREFETCH(w[j] + kk);
            wv[j] = _mm256_loadu_ps(w[j] + kk);
        }
        for (int r = 0; r < rows; r++) {
            const __m256 xv = _mm256_loadu_ps(x + r * k + kk);
            for (int j = 0; j < WROWS; j++) acc[r][j] = _mm256_fmadd_ps(wv[j], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < WROWS; j++) {
            float s = f32_gemv_hsum256(acc[r][j]);
            for (int64_t t = kk; t < k; t++) s += w[j][t] * x[r * k + t];
            res[r * WROWS + j] = s;
        }
}
#else
static void GEMV_BLOCK(const float *const w[WROWS], const float *x, int64_t k, int rows, float *res) {
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
static void GEMV_BLOCK_ROWS(const float *const w[WROWS], const float *x, int64_t k, int rows, float *res) {
#if XROWS >= 4
    switch (rows) {
    case 1: GEMV_BLOCK(w, x, k, 1, res); break;
    case 2: GEMV_BLOCK(w, x, k, 2, res); break;
    case 3: GEMV_BLOCK(w, x, k, 3, res); break;
    default: GEMV_BLOCK(w, x, k, 4, res); break;
    }
#elif XROWS == 2
    if (rows == 1) GEMV_BLOCK(w, x, k, 1, res);
    else GEMV_BLOCK(w, x, k, 2, res);
#else
    (void)rows;
    GEMV_BLOCK(w, x, k, 1, res);
#endif
}

/* x: (m, k) fp32 contiguous; w: (n, k) fp32 contiguous; out: (m, n) fp32.
 * Returns 0, or -1 for shapes it does not take. */
int GEMV_NAME(const float *x, const float *w, float *out, int64_t m, int64_t n, int64_t k) {
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
            GEMV_BLOCK_ROWS(rows_w, x + r0 * k, k, rows, res);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < valid; j++) out[(r0 + r) * n + n0 + j] = res[r * WROWS + j];
        }
    }
    return 0;
}

#undef GEMV_PREFETCH
#undef GEMV_BLOCK_ROWS
#undef GEMV_BLOCK
#undef GEMV_CAT
#undef GEMV_CAT_
