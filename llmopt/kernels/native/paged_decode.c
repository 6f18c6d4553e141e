/* Paged decode attention on CPU: one query token per sequence, attending its
 * cached keys/values in place, read through its block table (no gather copy).
 *
 * Work item = (sequence, kv head); the query heads of that kv head's GQA group
 * share each key/value row as it streams past (the cache is read once per
 * item). Online softmax per cache block: one rescale per block, not per token; the
 * next block's rows are prefetched while one is computed.
 * fp32 accumulation; the cache and queries are fp32 or bf16 (bf16 blocks are
 * widened into a small fp32 buffer first, so one core routine serves both).
 *
 * Built and loaded by llmopt/kernels/native/__init__.py (ctypes); threads come
 * from the OpenMP runtime torch itself loads (same soname), so torch's thread
 * count and pool are shared rather than a second pool competing for the cores.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_common.h"

#define MAX_GROUP 32
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 128

typedef struct {
    float q[MAX_GROUP][MAX_HEAD_DIM];  /* pre-scaled queries of the group */
    float acc[MAX_GROUP][MAX_HEAD_DIM];
    float scores[MAX_GROUP][MAX_BLOCK];
    float run_max[MAX_GROUP], run_sum[MAX_GROUP];
    float k[MAX_BLOCK * MAX_HEAD_DIM], v[MAX_BLOCK * MAX_HEAD_DIM];  /* widened bf16 rows */
} item_state;

static inline __attribute__((always_inline)) float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
    return s;
}

/* Attend `rows` cached tokens (row r of K at k + r * stride) for every query of the group. */
static inline __attribute__((always_inline)) void attend_rows_impl(item_state *st, const float *restrict k, const float *restrict v, int64_t stride,
                        int64_t rows, int group, int64_t head_dim) {
    for (int g = 0; g < group; ++g) {
        float *restrict s = st->scores[g];
        float block_max = -INFINITY;
        for (int64_t t = 0; t < rows; ++t) {
            s[t] = dot(st->q[g], k + t * stride, head_dim);
            block_max = s[t] > block_max ? s[t] : block_max;
        }
        const float new_max = block_max > st->run_max[g] ? block_max : st->run_max[g];
        const float correction = expf(st->run_max[g] - new_max);
        st->run_max[g] = new_max;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < rows; ++t) {
            s[t] = exp_nonpositive(s[t] - new_max);
            sum += s[t];
        }
        st->run_sum[g] = st->run_sum[g] * correction + sum;
        float *restrict acc = st->acc[g];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] *= correction;
    }
    for (int64_t t = 0; t < rows; ++t) {
        const float *restrict vrow = v + t * stride;
        for (int g = 0; g < group; ++g) {
            const float p = st->scores[g][t];
            float *restrict acc = st->acc[g];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) acc[d] += p * vrow[d];
        }
    }
}

/* The common shapes get their own copy with the sizes known to the compiler, which then
 * unrolls the head_dim loops and keeps the queries in registers (docs/PERFORMANCE.md). */
static void attend_rows(item_state *st, const float *restrict k, const float *restrict v, int64_t stride,
                        int64_t rows, int group, int64_t head_dim) {
    if (head_dim == 64 && group == 3) attend_rows_impl(st, k, v, stride, rows, 3, 64);
    else if (head_dim == 64) attend_rows_impl(st, k, v, stride, rows, group, 64);
    else if (head_dim == 128) attend_rows_impl(st, k, v, stride, rows, group, 128);
    else attend_rows_impl(st, k, v, stride, rows, group, head_dim);
}

/* Blocks sit anywhere in the pool, so the hardware prefetcher cannot guess the next
 * one: ask for its rows while this block is computed (into L1; a further distance
 * or a lower cache level did no better). */
static inline void prefetch_rows(const char *first, int64_t stride_bytes, int64_t rows, int64_t row_bytes) {
    for (int64_t t = 0; t < rows; ++t)
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(first + t * stride_bytes + off, 0, 3);
}

typedef struct {
    const int64_t *q_rows, *seq_lens, *block_tables;
    int64_t table_stride, n_seqs, q_heads, kv_heads, head_dim, block_size;
    float scale;
} decode_args;

static int check_shapes(const decode_args *a) {
    return a->q_heads / a->kv_heads > MAX_GROUP || a->head_dim > MAX_HEAD_DIM || a->block_size > MAX_BLOCK;
}

#define DEFINE_DECODE(NAME, ELEM, IS_BF16, LOAD, STORE)                                                      \
    int NAME(const ELEM *q, const ELEM *k_cache, const ELEM *v_cache, ELEM *out, const int64_t *q_rows,     \
             const int64_t *seq_lens, const int64_t *block_tables, int64_t table_stride, int64_t n_seqs,    \
             int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale) {        \
        const decode_args a = {q_rows, seq_lens, block_tables, table_stride, n_seqs, q_heads, kv_heads,     \
                               head_dim, block_size, scale};                                                 \
        if (check_shapes(&a)) return 1;                                                                      \
        const int group = (int)(q_heads / kv_heads);                                                         \
        const int64_t row_stride = kv_heads * head_dim;                                                      \
        _Pragma("omp parallel") {                                                                            \
            item_state st;                                                                                   \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t item = 0; item < n_seqs * kv_heads; ++item) { \
                const int64_t i = item / kv_heads, h = item % kv_heads;                                     \
                const int64_t seq_len = seq_lens[i], n_blocks = (seq_len + block_size - 1) / block_size;    \
                const int64_t *table = block_tables + i * table_stride;                                     \
                for (int g = 0; g < group; ++g) {                                                            \
                    const ELEM *qrow = q + (q_rows[i] * q_heads + h * group + g) * head_dim;                \
                    for (int64_t d = 0; d < head_dim; ++d) {                                                 \
                        st.q[g][d] = LOAD(qrow[d]) * scale;                                                  \
                        st.acc[g][d] = 0.f;                                                                  \
                    }                                                                                        \
                    st.run_max[g] = -INFINITY;                                                               \
                    st.run_sum[g] = 0.f;                                                                     \
                }                                                                                            \
                for (int64_t b = 0; b < n_blocks; ++b) {                                                     \
                    const int64_t rows = b == n_blocks - 1 ? seq_len - b * block_size : block_size;          \
                    const int64_t base = (table[b] * block_size * kv_heads + h) * head_dim;                  \
                    if (b + 1 < n_blocks) {                                                                  \
                        const int64_t next = (table[b + 1] * block_size * kv_heads + h) * head_dim;         \
                        const int64_t next_rows = b + 2 == n_blocks ? seq_len - (b + 1) * block_size : block_size; \
                        const int64_t stride_bytes = row_stride * (int64_t)sizeof(ELEM);                     \
                        prefetch_rows((const char *)(k_cache + next), stride_bytes, next_rows, head_dim * (int64_t)sizeof(ELEM)); \
                        prefetch_rows((const char *)(v_cache + next), stride_bytes, next_rows, head_dim * (int64_t)sizeof(ELEM)); \
                    }                                                                                        \
                    if (IS_BF16) {                                                                           \
                        widen_bf16_rows(st.k, (const uint16_t *)(k_cache + base), row_stride, rows, head_dim);    \
                        widen_bf16_rows(st.v, (const uint16_t *)(v_cache + base), row_stride, rows, head_dim);    \
                        attend_rows(&st, st.k, st.v, head_dim, rows, group, head_dim);                       \
                    } else {                                                                                 \
                        attend_rows(&st, (const float *)(k_cache + base), (const float *)(v_cache + base),   \
                                    row_stride, rows, group, head_dim);                                      \
                    }                                                                                        \
                }                                                                                            \
                for (int g = 0; g < group; ++g) {                                                            \
                    ELEM *orow = out + (q_rows[i] * q_heads + h * group + g) * head_dim;                    \
                    const float inv = st.run_sum[g] > 0.f ? 1.f / st.run_sum[g] : 0.f;                       \
                    for (int64_t d = 0; d < head_dim; ++d) orow[d] = STORE(st.acc[g][d] * inv);              \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        return 0;                                                                                            \
    }

#define IDENTITY(x) (x)

DEFINE_DECODE(paged_decode_f32, float, 0, IDENTITY, IDENTITY)
DEFINE_DECODE(paged_decode_bf16, uint16_t, 1, bf16_to_f32, f32_to_bf16)
