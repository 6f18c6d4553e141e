/* int4 weight x int8 activation matrix-vector products for CPU decode.
 *
 * Computes out[m, n] = sum_k x[m, k] * W[n, k] for M <= a few rows (decode)
 * or any M (rows are taken four at a time), with
 *   W[n, k] = (q[n, k] - 8) * d[n, g] + z[n, g],   q in 0..15, g = k / group,
 * the "float zero point" int4 format of llmopt::linear_int4.
 *
 * Activations are quantized here, once per call, to int8 per block of 32
 * columns (symmetric: s = max|x| / 127, qa = round(x / s)), like llama.cpp's
 * Q8 blocks. Per block b and row n the integer dot product
 * dot[n, b] = sum_i q[n, i] * qa[i] (unsigned 4-bit times signed 8-bit, the
 * operand types of VNNI's vpdpbusd) is exact; then, per weight group g,
 *   A[n, g]  = sum_{b in g} s[b] * dot[n, b]
 *   xs[g]    = sum_{b in g} s[b] * sum_i qa[b, i]
 *   out[n]  += d[n, g] * (A[n, g] - 8 xs[g]) + z[n, g] * xs[g].
 *
 * Weight layout ("cpu_native"): rows in tiles of 16 (the last tile holds
 * N % 16 rows if N is not a multiple of 16). A tile is Kp/32 blocks of 256
 * bytes; a block is 4 chunks of 8 columns; a chunk is 64 bytes, 4 per row of
 * the tile (row j at bytes 4j..4j+3): byte 4j+i holds column 8c+i in its low
 * nibble and column 8c+4+i in its high nibble. So one 64-byte load gives, after
 * `& 0xF` and `>> 4`, two vectors of 16 rows x 4 columns: exactly what
 * vpdpbusd multiplies with 4 broadcast activation bytes, one row per int32 lane
 * (no horizontal sums). Scales: per tile, per group, one 32-bit word per row:
 * low half bf16 d, high half bf16 z. The tensors are (N, Kp/2) uint8 and
 * (Kp/g, N, 2) bf16 as in the saved format, only in this order.
 *
 * Parallel over row tiles with OpenMP (the runtime torch loads, so
 * torch.set_num_threads applies).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 16
#define CHUNK_BYTES 64 /* 16 rows x 4 bytes */
#define BLOCK_BYTES 256 /* 4 chunks: 32 columns of 16 rows */
#define ROWS 4 /* activation rows per pass over a tile */
/* Software prefetch distances (bytes ahead in the weight and scale streams). A
 * decode step streams the whole model from memory; the hardware prefetcher alone
 * falls behind (tuned on a Xeon: docs/PERFORMANCE.md). Prefetches past the end are
 * harmless. */
#define WEIGHT_PREFETCH 4096
#define SCALE_PREFETCH 2048

/* One activation row -> int8 blocks of 32 (qa), each block's scale (s) and, per
 * weight group, xs = sum over its blocks of s * sum(qa). x is fp32 (x_bf16 = 0)
 * or bf16 (1), kp columns (a multiple of the group size). */
static void quantize_row(const void *x, int x_bf16, int64_t kp, int64_t blocks_per_group, int8_t *qa,
                         float *s, float *xs) {
    const int64_t nb = kp / 32;
    float v[32];
    for (int64_t b = 0; b < nb; b++) {
        if (x_bf16) {
            const uint16_t *src = (const uint16_t *)x + b * 32;
            for (int i = 0; i < 32; i++) v[i] = bf16_to_f32(src[i]);
        } else {
            memcpy(v, (const float *)x + b * 32, sizeof v);
        }
        float amax = 0.f;
        for (int i = 0; i < 32; i++) {
            const float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.f;
        const float id = d > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            const int q = (int)nearbyintf(v[i] * id); /* round half to even, like the vector path */
            qa[b * 32 + i] = (int8_t)q;
            sum += q;
        }
        s[b] = d;
        if (b % blocks_per_group == 0) xs[b / blocks_per_group] = 0.f;
        xs[b / blocks_per_group] += d * (float)sum;
    }
}

/* out[r * TILE + j] = row j of the tile times activation row r, for r < rows. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

static inline __attribute__((always_inline)) void tile_rows(const uint8_t *w, const uint32_t *sc, const int8_t *qa,
                                                          const float *s, const float *xs, int64_t kp,
                                                          int64_t groups, int64_t bpg, int rows, float *out) {
    const int64_t nb = kp / 32;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 ga[ROWS];
        for (int r = 0; r < ROWS; r++) ga[r] = _mm512_setzero_ps();
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            const uint8_t *wb = w + b * BLOCK_BYTES;
            for (int c = 0; c < BLOCK_BYTES; c += 64) _mm_prefetch((const char *)(wb + WEIGHT_PREFETCH + c), _MM_HINT_T0);
            __m512i ia[ROWS];
            for (int r = 0; r < ROWS; r++) ia[r] = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wb + c * CHUNK_BYTES));
                const __m512i lo = _mm512_and_si512(v, low4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int r = 0; r < rows; r++) {
                    const int8_t *xr = qa + r * kp + b * 32 + c * 8;
                    int32_t a0, a1;
                    memcpy(&a0, xr, 4);
                    memcpy(&a1, xr + 4, 4);
                    ia[r] = _mm512_dpbusd_epi32(ia[r], lo, _mm512_set1_epi32(a0));
                    ia[r] = _mm512_dpbusd_epi32(ia[r], hi, _mm512_set1_epi32(a1));
                }
            }
            for (int r = 0; r < rows; r++)
                ga[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]), _mm512_set1_ps(s[r * nb + b]), ga[r]);
        }
        _mm_prefetch((const char *)(sc + g * TILE) + SCALE_PREFETCH, _MM_HINT_T0);
        const __m512i dz = _mm512_loadu_si512((const void *)(sc + g * TILE));
        const __m512 d = _mm512_castsi512_ps(_mm512_slli_epi32(dz, 16));
        const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(dz, high16));
        for (int r = 0; r < rows; r++) {
            const __m512 x8 = _mm512_set1_ps(xs[r * groups + g]);
            const __m512 t = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), x8, ga[r]); /* A - 8 xs */
            acc[r] = _mm512_fmadd_ps(z, x8, _mm512_fmadd_ps(d, t, acc[r]));
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out + r * TILE, acc[r]);
}

#elif defined(__AVX2__)

/* Two halves of 8 rows; u8 x s8 products through vpmaddubsw (no saturation:
 * 2 * 15 * 127 < 32767) and vpmaddwd, or AVX-VNNI where there is one. */
static inline __m256i dot4(__m256i acc, __m256i u, __m256i sgn) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, sgn);
#else
    const __m256i p = _mm256_maddubs_epi16(u, sgn);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void tile_rows(const uint8_t *w, const uint32_t *sc, const int8_t *qa,
                                                          const float *s, const float *xs, int64_t kp,
                                                          int64_t groups, int64_t bpg, int rows, float *out) {
    const int64_t nb = kp / 32;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i high16 = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 ga[ROWS][2];
        for (int r = 0; r < ROWS; r++) ga[r][0] = ga[r][1] = _mm256_setzero_ps();
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            const uint8_t *wb = w + b * BLOCK_BYTES;
            for (int c = 0; c < BLOCK_BYTES; c += 64) _mm_prefetch((const char *)(wb + WEIGHT_PREFETCH + c), _MM_HINT_T0);
            __m256i ia[ROWS][2];
            for (int r = 0; r < ROWS; r++) ia[r][0] = ia[r][1] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                for (int h = 0; h < 2; h++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + c * CHUNK_BYTES + h * 32));
                    const __m256i lo = _mm256_and_si256(v, low4);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for (int r = 0; r < rows; r++) {
                        const int8_t *xr = qa + r * kp + b * 32 + c * 8;
                        int32_t a0, a1;
                        memcpy(&a0, xr, 4);
                        memcpy(&a1, xr + 4, 4);
                        ia[r][h] = dot4(ia[r][h], lo, _mm256_set1_epi32(a0));
                        ia[r][h] = dot4(ia[r][h], hi, _mm256_set1_epi32(a1));
                    }
                }
            }
            for (int r = 0; r < rows; r++)
                for (int h = 0; h < 2; h++)
                    ga[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r][h]), _mm256_set1_ps(s[r * nb + b]), ga[r][h]);
        }
        for (int h = 0; h < 2; h++) {
            const __m256i dz = _mm256_loadu_si256((const __m256i *)(sc + g * TILE + h * 8));
            const __m256 d = _mm256_castsi256_ps(_mm256_slli_epi32(dz, 16));
            const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(dz, high16));
            for (int r = 0; r < rows; r++) {
                const __m256 x8 = _mm256_set1_ps(xs[r * groups + g]);
                const __m256 t = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), x8, ga[r][h]);
                acc[r][h] = _mm256_fmadd_ps(z, x8, _mm256_fmadd_ps(d, t, acc[r][h]));
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + r * TILE + h * 8, acc[r][h]);
}

#else

static void tile_rows(const uint8_t *w, const uint32_t *sc, const int8_t *qa, const float *s, const float *xs,
                      int64_t kp, int64_t groups, int64_t bpg, int rows, float *out) {
    const int64_t nb = kp / 32;
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < TILE; j++) {
            float acc = 0.f;
            for (int64_t g = 0; g < groups; g++) {
                float ga = 0.f;
                for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
                    int32_t dot = 0;
                    for (int c = 0; c < 4; c++) {
                        const uint8_t *p = w + b * BLOCK_BYTES + c * CHUNK_BYTES + j * 4;
                        const int8_t *xr = qa + r * kp + b * 32 + c * 8;
                        for (int i = 0; i < 4; i++) dot += (p[i] & 15) * xr[i] + (p[i] >> 4) * xr[4 + i];
                    }
                    ga += s[r * nb + b] * (float)dot;
                }
                const uint32_t dz = sc[g * TILE + j];
                const float x = xs[r * groups + g];
                acc += bf16_to_f32((uint16_t)(dz & 0xFFFFu)) * (ga - 8.f * x) + bf16_to_f32((uint16_t)(dz >> 16)) * x;
            }
            out[r * TILE + j] = acc;
        }
    }
}

#endif

static inline __attribute__((always_inline)) void tile_dispatch(const uint8_t *w, const uint32_t *sc,
                                                              const int8_t *qa, const float *s, const float *xs,
                                                              int64_t kp, int64_t groups, int64_t bpg, int rows,
                                                              float *out) {
    /* Constant row counts, so each variant is unrolled with its accumulators in registers. */
    switch (rows) {
    case 1: tile_rows(w, sc, qa, s, xs, kp, groups, bpg, 1, out); break;
    case 2: tile_rows(w, sc, qa, s, xs, kp, groups, bpg, 2, out); break;
    case 3: tile_rows(w, sc, qa, s, xs, kp, groups, bpg, 3, out); break;
    default: tile_rows(w, sc, qa, s, xs, kp, groups, bpg, 4, out); break;
    }
}

/* x: (m, kp) fp32 or bf16 (x_bf16), contiguous; weight/scales in the layout above;
 * out: (m, n) fp32 or bf16 (out_bf16). Returns 0, or -1 for shapes it cannot take. */
int llmopt_int4_gemv(const void *x, const uint8_t *weight, const uint16_t *scales, void *out, int64_t m,
                     int64_t n, int64_t kp, int64_t group, int x_bf16, int out_bf16) {
    if (m < 0 || n < 1 || kp < 32 || group < 32 || group % 32 != 0 || kp % group != 0) return -1;
    if (m == 0) return 0;
    const int64_t nb = kp / 32, groups = kp / group, bpg = group / 32;
    int8_t *qa = (int8_t *)malloc((size_t)(m * kp));
    float *s = (float *)malloc(sizeof(float) * (size_t)(m * nb));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(m * groups));
    if (qa == NULL || s == NULL || xs == NULL) {
        free(qa); free(s); free(xs);
        return -1;
    }
    const size_t x_row = (size_t)kp * (x_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) if (m >= 16)
    for (int64_t r = 0; r < m; r++)
        quantize_row((const char *)x + r * x_row, x_bf16, kp, bpg, qa + r * kp, s + r * nb, xs + r * groups);

    const int64_t tiles = (n + TILE - 1) / TILE;
    const int64_t tile_bytes = nb * BLOCK_BYTES; /* a full tile */
#pragma omp parallel
    {
        uint8_t *pad_w = NULL; /* the last, partial tile widened to 16 rows (zero rows) */
        uint32_t *pad_s = NULL;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * TILE;
            const int valid = (int)(n - n0 < TILE ? n - n0 : TILE);
            const uint8_t *w = weight + n0 * (kp / 2);
            const uint32_t *sc = (const uint32_t *)scales + n0 * groups;
            if (valid < TILE) {
                pad_w = (uint8_t *)calloc((size_t)tile_bytes, 1);
                pad_s = (uint32_t *)calloc((size_t)(groups * TILE), sizeof(uint32_t));
                if (pad_w == NULL || pad_s == NULL) continue; /* out stays unwritten; cannot happen in practice */
                for (int64_t ch = 0; ch < nb * 4; ch++)
                    memcpy(pad_w + ch * CHUNK_BYTES, w + ch * valid * 4, (size_t)valid * 4);
                for (int64_t g = 0; g < groups; g++)
                    memcpy(pad_s + g * TILE, sc + g * valid, (size_t)valid * sizeof(uint32_t));
                w = pad_w;
                sc = pad_s;
            }
            for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
                const int rows = (int)(m - r0 < ROWS ? m - r0 : ROWS);
                float res[ROWS * TILE];
                tile_dispatch(w, sc, qa + r0 * kp, s + r0 * nb, xs + r0 * groups, kp, groups, bpg, rows, res);
                for (int r = 0; r < rows; r++) {
                    if (out_bf16) {
                        uint16_t *o = (uint16_t *)out + (r0 + r) * n + n0;
                        for (int j = 0; j < valid; j++) o[j] = f32_to_bf16(res[r * TILE + j]);
                    } else {
                        memcpy((float *)out + (r0 + r) * n + n0, res + r * TILE, (size_t)valid * sizeof(float));
                    }
                }
            }
        }
        free(pad_w);
        free(pad_s);
    }
    free(qa);
    free(s);
    free(xs);
    return 0;
}
