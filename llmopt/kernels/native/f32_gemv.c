/* fp32 matrix-vector products for CPU decode: out[m, n] = sum_k x[m, k] * W[n, k]
 * for a few activation rows (llmopt::dense_linear sends 1-16, or 3-8 on Intel CPUs),
 * W (n, k) row-major.
 *
 * Why not PyTorch's F.linear: a decode step of an fp32 model is one pass over
 * every weight, and for a few rows MKL reads it well below the memory's rate
 * (from 3 rows on, and on AMD also at 1-2 rows, where its sgemv runs on one
 * thread; kernels/dense_linear.py, docs/PERFORMANCE.md). Here the weight rows are
 * split over the OpenMP threads and streamed once, a block of rows at a time, each
 * loaded vector used for every activation row (the activations stay in L1).
 *
 * Accumulation is fp32 with 16 (AVX-512) or 8 (AVX2) partial sums per weight row,
 * added at the end: a different order from MKL's, so results differ from
 * F.linear by rounding only (the tests bound it against an fp64 reference).
 *
 * Two blockings of the same product (f32_gemv_impl.h), chosen by
 * kernels/dense_linear.py per CPU vendor:
 *   llmopt_f32_gemv       4 weight rows streamed together, 4 activation rows, software
 *                         prefetch 1 KiB ahead: tuned on an Intel Xeon.
 *   llmopt_f32_gemv_wide  16 weight rows (AVX-512; 12 on AVX2), 2 activation rows (1 on
 *                         AVX2), no software prefetch: tuned on an AMD EPYC (Zen 4), where
 *                         more concurrent row streams, not prefetches, bring the read
 *                         rate up to the memory's (docs/PERFORMANCE.md).
 * The wide blocking was the fastest of those tried on the EPYC (4 to 32 weight rows,
 * 1 to 4 activation rows, prefetch 0 to 4 KiB); more weight rows spill accumulators.
 *
 * Parallel over blocks of weight rows with OpenMP (the runtime torch loads, so
 * torch.set_num_threads applies).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
static inline float f32_gemv_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

#define GEMV_NAME llmopt_f32_gemv
#define WROWS 4
#define XROWS 4
#define PREFETCH 1024
#include "f32_gemv_impl.h"
#undef GEMV_NAME
#undef WROWS
#undef XROWS
#undef PREFETCH

#define GEMV_NAME llmopt_f32_gemv_wide
#if defined(__AVX512F__)
#define WROWS 16
#define XROWS 2
#else
#define WROWS 12
#define XROWS 1
#endif
#define PREFETCH 0
#include "f32_gemv_impl.h"
#undef GEMV_NAME
#undef WROWS
#undef XROWS
#undef PREFETCH
