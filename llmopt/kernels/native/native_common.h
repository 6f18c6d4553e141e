/* Helpers shared by the CPU kernels of this folder (included, so each .c builds alone). */
#ifndef LLMOPT_NATIVE_COMMON_H
#define LLMOPT_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* n bf16 rows of head_dim values, `stride` elements apart, into packed fp32 rows. */
static inline void widen_bf16_rows(float *restrict dst, const uint16_t *restrict src, int64_t stride, int64_t n,
                                   int64_t head_dim) {
    for (int64_t t = 0; t < n; ++t)
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) dst[t * head_dim + d] = bf16_to_f32(src[t * stride + d]);
}

/* exp for x <= 0 (a score minus its row's running max), vectorizable: 2^(x log2 e)
 * as 2^n * 2^f with |f| <= 1/2 and a degree-7 Taylor polynomial (relative error
 * < 1e-8, below fp32's rounding). rintf, not roundf: GCC vectorizes the former and
 * calls libm for the latter. Below -87 (and for -inf, a masked key) it returns 0:
 * such a weight is below what fp32 accumulation can see anyway. */
static inline float exp_nonpositive(float x) {
    const int dead = !(x >= -87.f);
    x = dead ? -87.f : x;
    const float y = x * 1.44269504088896341f;
    const float n = __builtin_rintf(y);
    const float f = (y - n) * 0.69314718055994531f;
    float p = 1.f / 5040.f;
    p = p * f + 1.f / 720.f;
    p = p * f + 1.f / 120.f;
    p = p * f + 1.f / 24.f;
    p = p * f + 1.f / 6.f;
    p = p * f + 0.5f;
    p = p * f + 1.f;
    p = p * f + 1.f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return dead ? 0.f : p * scale.f;
}

#endif
