/* Attention of a few query rows (decode, short appends) against a dense KV tensor,
 * for llmopt::attention on CPU. PyTorch's CPU flash kernel spends most of a call at
 * these sizes (one query row against a few hundred keys) on setup, not math
 * (docs/PERFORMANCE.md).
 *
 * Work item = (batch, kv head): the GQA group's query heads and all their query
 * rows (group * Lq <= MAX_ROWS) share each key/value row as it streams past.
 * Keys are taken in chunks of CHUNK with an online softmax (one rescale per
 * chunk). The mask (optional; additive fp32, or bool with true = visible) is read
 * with strides, so broadcast masks cost nothing; -inf (false) entries drop keys,
 * and a row that sees no key gets 0 and lse = -inf, as the op's contract says.
 * A chunk no row sees is skipped unread: a static KV cache is mostly not yet
 * written during decode. fp32 accumulation; inputs fp32 or bf16.
 *
 * Built and loaded by llmopt/kernels/native/__init__.py (ctypes), like paged_decode.c.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_common.h"

#define MAX_ROWS 64
#define MAX_HEAD_DIM 256
#define CHUNK 64

typedef struct {
    float q[MAX_ROWS][MAX_HEAD_DIM]; /* pre-scaled */
    float acc[MAX_ROWS][MAX_HEAD_DIM];
    float s[MAX_ROWS][CHUNK];
    float run_max[MAX_ROWS], run_sum[MAX_ROWS];
    const void *mask_row[MAX_ROWS];         /* the row's mask (fp32 or bool), NULL without one */
    const float *chunk_mask[MAX_ROWS];      /* the current chunk's additive mask, NULL without one */
    float bool_chunk[MAX_ROWS][CHUNK];      /* a bool mask's chunk as 0 / -inf */
    float k[CHUNK * MAX_HEAD_DIM], v[CHUNK * MAX_HEAD_DIM]; /* widened bf16 chunk */
} item_state;

static inline __attribute__((always_inline)) float dot(const float *restrict a, const float *restrict b,
                                                       int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
    return s;
}

/* The n keys of one chunk, rows k + t * kst (fp32), for all `rows` queries. */
static inline __attribute__((always_inline)) void attend_chunk(item_state *st, const float *restrict k,
                                                               const float *restrict v, int64_t kst, int64_t vst,
                                                               int64_t n, int rows, int64_t head_dim) {
    for (int r = 0; r < rows; ++r) {
        float *restrict s = st->s[r];
        const float *mask = st->chunk_mask[r];
        float chunk_max = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
            float x = dot(st->q[r], k + t * kst, head_dim);
            if (mask) x += mask[t];
            s[t] = x;
            chunk_max = x > chunk_max ? x : chunk_max;
        }
        const float new_max = chunk_max > st->run_max[r] ? chunk_max : st->run_max[r];
        if (new_max == -INFINITY) { /* nothing visible yet */
            for (int64_t t = 0; t < n; ++t) s[t] = 0.f;
            continue;
        }
        const float correction = st->run_max[r] == -INFINITY ? 0.f : expf(st->run_max[r] - new_max);
        st->run_max[r] = new_max;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
            s[t] = exp_nonpositive(s[t] - new_max);
            sum += s[t];
        }
        st->run_sum[r] = st->run_sum[r] * correction + sum;
        float *restrict acc = st->acc[r];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] *= correction;
    }
    /* Row by row, so that the row's accumulator stays in registers across the chunk
     * (the value rows are re-read from L1); two keys a step halve the FMA chain. */
    for (int r = 0; r < rows; ++r) {
        const float *restrict p = st->s[r];
        float a0[MAX_HEAD_DIM], a1[MAX_HEAD_DIM];
        for (int64_t d = 0; d < head_dim; ++d) { a0[d] = st->acc[r][d]; a1[d] = 0.f; }
        int64_t t = 0;
        for (; t + 1 < n; t += 2) {
            const float *restrict v0 = v + t * vst, *restrict v1 = v0 + vst;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) { a0[d] += p[t] * v0[d]; a1[d] += p[t + 1] * v1[d]; }
        }
        if (t < n) {
            const float *restrict v0 = v + t * vst;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a0[d] += p[t] * v0[d];
        }
        for (int64_t d = 0; d < head_dim; ++d) st->acc[r][d] = a0[d] + a1[d];
    }
}

/* The common head size gets a copy with constant loop bounds (unrolled, queries in registers). */
static void attend(item_state *st, const float *k, const float *v, int64_t kst, int64_t vst, int64_t n,
                   int rows, int64_t head_dim) {
    if (head_dim == 64) attend_chunk(st, k, v, kst, vst, n, rows, 64);
    else if (head_dim == 128) attend_chunk(st, k, v, kst, vst, n, rows, 128);
    else attend_chunk(st, k, v, kst, vst, n, rows, head_dim);
}

/* Points each row at the chunk [t0, t0 + n) of its mask; 0 if no row sees any of its keys. */
static int chunk_visible(item_state *st, int rows, int mask_is_bool, int64_t t0, int64_t n) {
    int visible = 0;
    for (int r = 0; r < rows; ++r) {
        if (!st->mask_row[r]) {
            st->chunk_mask[r] = NULL;
            visible = 1;
        } else if (mask_is_bool) {
            const uint8_t *m = (const uint8_t *)st->mask_row[r] + t0;
            for (int64_t t = 0; t < n; ++t) {
                st->bool_chunk[r][t] = m[t] ? 0.f : -INFINITY;
                visible |= m[t] != 0;
            }
            st->chunk_mask[r] = st->bool_chunk[r];
        } else {
            const float *m = (const float *)st->mask_row[r] + t0;
            for (int64_t t = 0; t < n; ++t) visible |= m[t] != -INFINITY;
            st->chunk_mask[r] = m;
        }
    }
    return visible;
}

/* Shapes: q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D), all with unit stride along D;
 * mask (B, Hq, Lq, Lk) fp32 or bool (mask_is_bool) with unit stride along Lk, or
 * NULL; strides: the first three strides (in elements) of q, k, v and the mask,
 * 0 to broadcast; out (B, Hq, Lq, D) and lse (B, Hq, Lq) contiguous.
 * Returns 1 for shapes past the fixed buffers (the caller then uses PyTorch). */
#define DEFINE_ATTENTION(NAME, ELEM, IS_BF16, LOAD, STORE)                                                  \
    int NAME(const ELEM *q, const ELEM *k, const ELEM *v, const void *mask, int mask_is_bool, ELEM *out,   \
             float *lse, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t q_len, int64_t k_len,    \
             int64_t head_dim, const int64_t *strides, float scale) {                                       \
        const int64_t *q_strides = strides, *k_strides = strides + 3, *v_strides = strides + 6;            \
        const int64_t *mask_strides = strides + 9;                                                          \
        const int64_t mask_elem = mask_is_bool ? 1 : 4;                                                     \
        const int64_t group = q_heads / kv_heads;                                                           \
        if (group * q_len > MAX_ROWS || head_dim > MAX_HEAD_DIM) return 1;                                  \
        const int rows = (int)(group * q_len);                                                              \
        _Pragma("omp parallel") {                                                                           \
            item_state st;                                                                                  \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t item = 0; item < batch * kv_heads; ++item) { \
                const int64_t b = item / kv_heads, h = item % kv_heads;                                    \
                for (int r = 0; r < rows; ++r) {                                                            \
                    const int64_t hq = h * group + r / q_len, l = r % q_len;                                \
                    const ELEM *qrow = q + b * q_strides[0] + hq * q_strides[1] + l * q_strides[2];         \
                    for (int64_t d = 0; d < head_dim; ++d) {                                                \
                        st.q[r][d] = LOAD(qrow[d]) * scale;                                                 \
                        st.acc[r][d] = 0.f;                                                                 \
                    }                                                                                       \
                    st.run_max[r] = -INFINITY;                                                              \
                    st.run_sum[r] = 0.f;                                                                    \
                    st.mask_row[r] = mask ? (const char *)mask + mask_elem * (b * mask_strides[0]           \
                                                + hq * mask_strides[1] + l * mask_strides[2]) : NULL;       \
                }                                                                                           \
                const ELEM *kh = k + b * k_strides[0] + h * k_strides[1];                                   \
                const ELEM *vh = v + b * v_strides[0] + h * v_strides[1];                                   \
                for (int64_t t0 = 0; t0 < k_len; t0 += CHUNK) {                                             \
                    const int64_t n = k_len - t0 < CHUNK ? k_len - t0 : CHUNK;                              \
                    if (!chunk_visible(&st, rows, mask_is_bool, t0, n)) continue;                           \
                    if (IS_BF16) {                                                                          \
                        widen_bf16_rows(st.k, (const uint16_t *)(kh + t0 * k_strides[2]), k_strides[2], n, head_dim); \
                        widen_bf16_rows(st.v, (const uint16_t *)(vh + t0 * v_strides[2]), v_strides[2], n, head_dim); \
                        attend(&st, st.k, st.v, head_dim, head_dim, n, rows, head_dim);                     \
                    } else {                                                                                \
                        attend(&st, (const float *)(kh + t0 * k_strides[2]),                                \
                               (const float *)(vh + t0 * v_strides[2]), k_strides[2], v_strides[2], n,      \
                               rows, head_dim);                                                             \
                    }                                                                                       \
                }                                                                                           \
                for (int r = 0; r < rows; ++r) {                                                            \
                    const int64_t hq = h * group + r / q_len, l = r % q_len;                                \
                    const int64_t o = (b * q_heads + hq) * q_len + l;                                       \
                    const float sum = st.run_sum[r];                                                        \
                    const float inv = sum > 0.f ? 1.f / sum : 0.f;                                          \
                    for (int64_t d = 0; d < head_dim; ++d) out[o * head_dim + d] = STORE(st.acc[r][d] * inv); \
                    lse[o] = sum > 0.f ? st.run_max[r] + logf(sum) : -INFINITY;                             \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        return 0;                                                                                           \
    }

#define IDENTITY(x) (x)

DEFINE_ATTENTION(dense_attention_f32, float, 0, IDENTITY, IDENTITY)
DEFINE_ATTENTION(dense_attention_bf16, uint16_t, 1, bf16_to_f32, f32_to_bf16)
