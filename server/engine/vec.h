/* The CPU kernels' vectors (gcc / clang vector extensions at the widest float width the
 * compiler targets) and the lane-by-lane helpers more than one kernel uses. */
#ifndef PREFIX_SERVE_VEC_H
#define PREFIX_SERVE_VEC_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VLEN 16 /* floats per vector */
#else
/* AVX2 and others: 8-float vectors (a 16-float one would be split in two halves). */
#define VLEN 8
#endif

typedef float vf __attribute__((vector_size(4 * VLEN)));
typedef float vfu __attribute__((vector_size(4 * VLEN), aligned(4))); /* vf at any address */
typedef int32_t vi __attribute__((vector_size(4 * VLEN)));

typedef uint32_t vu __attribute__((vector_size(4 * VLEN)));
typedef uint16_t vh __attribute__((vector_size(2 * VLEN))); /* VLEN bfloat16 values */

/* Lane by lane: a where `mask` is -1, b where it is 0 (what a vector comparison gives). */
static inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* VLEN bfloat16 values from p (any alignment) as float32 lanes: exact (the top halves). */
static inline vf bf16_load_v(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* VLEN float32 lanes rounded to bfloat16 (nearest, ties to even; a NaN stays a quiet NaN), as
 * bf16.h's bf16_round does one value, kept as float32 lanes (the low halves zero). */
static inline vf bf16_round_v(vf f) {
    const vu bits = (vu)f;
    const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const vu nan = (vu)((bits & 0x7fffffffu) > 0x7f800000u); /* all ones where NaN */
    return (vf)((rounded & ~nan) | (((bits & 0xffff0000u) | 0x400000u) & nan));
}

/* VLEN float32 lanes rounded to bfloat16 (bf16_round_v) and stored at p (any alignment). */
static inline void bf16_store_v(uint16_t *p, vf f) {
    const vh h = __builtin_convertvector((vu)bf16_round_v(f) >> 16, vh);
    memcpy(p, &h, sizeof h);
}

/* exp(x) lane by lane for x <= 0, to about 2 ulp (libm's expf takes one value at a time); 0
 * below -87, so -inf gives exactly 0; a NaN stays NaN. */
static inline vf exp_v(vf x) {
    const vi under = x < -87.0f;
    const vf lo = select(under, (vf){0} - 87.0f, x);
    const vf t = lo * 1.44269504f;
    const vf k = (t + 12582912.0f) - 12582912.0f; /* round to the nearest integer */
    const vf r = (lo - k * 0.693145752f) - k * 1.42860677e-6f; /* |r| <= ln2 / 2 */
    vf p = r * 1.98756912e-4f + 1.39819994e-3f;
    p = p * r + 8.33345205e-3f;
    p = p * r + 4.16657962e-2f;
    p = p * r + 1.66666672e-1f;
    p = p * r + 5.00000000e-1f;
    p = p * r * r + r + 1.0f;
    const vi two = (__builtin_convertvector(k, vi) + 127) << 23;
    const vf y = p * (vf)two;
    return (vf)((vi)y & ~under);
}

#endif
