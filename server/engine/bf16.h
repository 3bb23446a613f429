/* Bfloat16 <-> float32 for the native kernels (paged_attention.c, linear.c). A bfloat16 is the
 * top half of a float32: widening is exact; narrowing rounds to nearest, ties to even, and
 * keeps a NaN a NaN (quiet). */
#ifndef PREFIX_SERVE_BF16_H
#define PREFIX_SERVE_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_load(const uint16_t *p) {
    uint32_t bits = (uint32_t)(*p) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t bf16_round(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}
#endif
