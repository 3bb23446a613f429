/* A decoder layer's small operators on the CPU: RMSNorm, the SiLU gate and the rotary embedding
 * (float32, and bfloat16 below), and the step's keys and values written into the paged cache
 * (float32 or bfloat16).
 *
 * In torch each is a chain of operators (RMSNorm: a square, a mean, an addition, a reciprocal
 * square root, two products; the gate: SiLU, then a product; the cache: a finiteness check and
 * two indexed copies), and at decode sizes each operator's dispatch costs more than its
 * arithmetic: measured on a 2-core AVX2 EPYC at 16 rows, torch's RMSNorm over 576 values took
 * 24 us and the SiLU gate over 1,536 took 44 us. Here each is one call over the rows.
 *
 * RMSNorm sums each row's squares in its own order (vector lanes, then the lanes in turn), so
 * its bits can differ from torch's; the engine routes the model's RMSNorm modules here
 * (cpu_layers.py), so that every path through the model computes the same values. SiLU is
 * x / (1 + exp(-x)) (as x e / (1 + e), e = exp(x), for x < 0), with the vector exp of vec.h:
 * within 3.2 float32 roundings of the exact value above -80 (measured on 200,000 values; torch's
 * within 2.4), and 0 below -87, where the exact value is under 2e-36. One compiled body serves
 * the activation alone and the gate, so both give the same bits. The rotary embedding keeps
 * torch's bits (each product and the sum rounded on its own), so it needs no routing.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "vec.h"

/* Calls over more values than these split their rows between the threads (below, starting
 * the threads costs more than it saves): RMSNorm and rotary, which do little per value, and
 * SiLU, whose exp and division do more. */
#define PARALLEL_LIGHT 65536
#define PARALLEL_SILU 16384

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for rows r of x (row stride x_stride);
 * out is [rows, width], contiguous. The scale and the weight are applied as two products, as
 * transformers' RMSNorm does. */
void rms_norm(const float *x, int64_t x_stride, const float *weight, float *out, int64_t rows,
              int64_t width, float eps, int32_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * width > PARALLEL_LIGHT)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * width;
        vf a = {0}, b = {0};
        int64_t i = 0;
        for (; i + 2 * VLEN <= width; i += 2 * VLEN) {
            const vf u = *(const vfu *)(xr + i), v = *(const vfu *)(xr + i + VLEN);
            a += u * u;
            b += v * v;
        }
        for (; i + VLEN <= width; i += VLEN) {
            const vf u = *(const vfu *)(xr + i);
            a += u * u;
        }
        a += b;
        float sum = 0.0f;
        for (int lane = 0; lane < VLEN; lane++) sum += a[lane];
        for (; i < width; i++) sum += xr[i] * xr[i];
        const float scale = 1.0f / sqrtf(sum / (float)width + eps);
        for (int64_t j = 0; j < width; j++) o[j] = xr[j] * scale * weight[j];
    }
}

#define SILU_VECTORS 4 /* vectors a call of silu_block takes: independent chains to overlap */
#define SILU_VALUES (SILU_VECTORS * VLEN)

/* SiLU of SILU_VALUES values from x into out, each times up's where up is not NULL (one
 * rounding more, as torch's product after its activation). Not inlined: the activation alone
 * and the gate run this one body, so a value gets the same bits from both. */
static __attribute__((noinline)) void silu_block(const float *x, const float *up, float *out) {
    for (int s = 0; s < SILU_VECTORS; s++) {
        const vf v = *(const vfu *)(x + s * VLEN);
        const vi negative = v < 0.0f;
        const vf e = exp_v(select(negative, v, (vf){0} - v)); /* exp(-|v|), in (0, 1] */
        vf y = select(negative, v * e, v) / (1.0f + e);
        if (up) y *= *(const vfu *)(up + s * VLEN);
        *(vfu *)(out + s * VLEN) = y;
    }
}

/* SiLU of `width` values from `x` into `out` (times `up` where given); the last partial block
 * through a padded copy, so every value takes the same arithmetic. */
static inline void silu_row(const float *x, const float *up, float *out, int64_t width) {
    int64_t i = 0;
    for (; i + SILU_VALUES <= width; i += SILU_VALUES) silu_block(x + i, up ? up + i : NULL, out + i);
    if (i < width) {
        float xs[SILU_VALUES] = {0}, us[SILU_VALUES] = {0}, ys[SILU_VALUES];
        const size_t bytes = (size_t)(width - i) * sizeof(float);
        memcpy(xs, x + i, bytes);
        if (up) memcpy(us, up + i, bytes);
        silu_block(xs, up ? us : NULL, ys);
        memcpy(out + i, ys, bytes);
    }
}

/* out[r] = SiLU(gate[r]) (times up[r] where up is not NULL), rows of `width` values at row
 * strides gate_stride and up_stride; out is [rows, width], contiguous. */
void silu_gate(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride,
               float *out, int64_t rows, int64_t width, int32_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * width > PARALLEL_SILU)
    for (int64_t r = 0; r < rows; r++)
        silu_row(gate + r * gate_stride, up ? up + r * up_stride : NULL, out + r * width, width);
}

/* Rotary embedding without fused multiply-adds: each product and the sum rounded on its own,
 * as torch's operators round them, so the result has their bits. */
#if defined(__clang__)
#define SEPARATE_ROUNDINGS _Pragma("clang fp contract(off)")
#define SEPARATE_ROUNDINGS_FN
#else
#define SEPARATE_ROUNDINGS
#define SEPARATE_ROUNDINGS_FN __attribute__((optimize("fp-contract=off")))
#endif

/* out[t, h, i] = x[t, h, i] * cos[t, i] + x[t, h, (i + D / 2) % D] * signed_sin[t, i]: the
 * rotary embedding of rows of `heads` heads of D values (x's row stride x_stride, heads
 * contiguous within a row; cos and signed_sin [T, D], the sine's first half negated), for an
 * even D. out is [T, heads, D], contiguous. */
SEPARATE_ROUNDINGS_FN void rotate_heads(const float *x, int64_t x_stride, const float *cos,
                                        const float *signed_sin, float *out, int64_t tokens,
                                        int64_t heads, int64_t head_dim, int32_t threads) {
    SEPARATE_ROUNDINGS
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens * heads * head_dim > PARALLEL_LIGHT)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * head_dim, *s = signed_sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + h * head_dim;
            float *o = out + (t * heads + h) * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = xh[i] * c[i], b = xh[i + half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = half; i < head_dim; i++) {
                const float a = xh[i] * c[i], b = xh[i - half] * s[i];
                o[i] = a + b;
            }
        }
    }
}

/* Bfloat16: the same operators with torch's roundings for a bfloat16 model. transformers'
 * RMSNorm takes the statistics in float32, rounds the normalised row to bfloat16 and multiplies
 * it by the bfloat16 weight (one more rounding); torch's SiLU of bfloat16 computes in float32
 * and rounds, and the gate's product rounds again; each rotary product rounds to bfloat16 and
 * so does their float32 sum. A product of two bfloat16 values is exact in float32, so each of
 * those roundings is bf16_round of a float32 result, as torch's operators give it. The
 * RMSNorm's sum and the SiLU's exp are this file's (as in float32), so a model's RMSNorm and
 * SiLU modules are routed here to keep every path through the model equal (cpu_layers.py);
 * the rotary embedding has torch's bits. */

/* Chunks of a bfloat16 row widened at a time (a multiple of SILU_VALUES and of VLEN). */
#define BF16_CHUNK 256

void rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *weight, uint16_t *out,
                   int64_t rows, int64_t width, float eps, int32_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * width > PARALLEL_LIGHT)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * x_stride;
        uint16_t *o = out + r * width;
        vf a = {0};
        int64_t i = 0;
        for (; i + VLEN <= width; i += VLEN) {
            const vf u = bf16_load_v(xr + i);
            a += u * u;
        }
        float sum = 0.0f;
        for (int lane = 0; lane < VLEN; lane++) sum += a[lane];
        for (; i < width; i++) sum += bf16_load(xr + i) * bf16_load(xr + i);
        const float scale = 1.0f / sqrtf(sum / (float)width + eps);
        int64_t j = 0;
        for (; j + VLEN <= width; j += VLEN)
            bf16_store_v(o + j, bf16_round_v(bf16_load_v(xr + j) * scale) * bf16_load_v(weight + j));
        for (; j < width; j++) {
            const uint16_t h = bf16_round(bf16_load(xr + j) * scale);
            o[j] = bf16_round(bf16_load(&h) * bf16_load(weight + j));
        }
    }
}

/* SiLU of a bfloat16 row (rounded to bfloat16), times up's bfloat16 values where up is not
 * NULL (rounded again), through silu_block: the float32 values the float32 kernel gives. */
static void silu_row_bf16(const uint16_t *x, const uint16_t *up, uint16_t *out, int64_t width) {
    float xs[BF16_CHUNK], ys[BF16_CHUNK];
    for (int64_t c = 0; c < width; c += BF16_CHUNK) {
        const int64_t n = width - c < BF16_CHUNK ? width - c : BF16_CHUNK;
        int64_t i = 0;
        for (; i + VLEN <= n; i += VLEN) *(vfu *)(xs + i) = bf16_load_v(x + c + i);
        for (; i < n; i++) xs[i] = bf16_load(x + c + i);
        silu_row(xs, NULL, ys, n);
        for (i = 0; i + VLEN <= n; i += VLEN) {
            const vf s = bf16_round_v(*(const vfu *)(ys + i));
            bf16_store_v(out + c + i, up ? s * bf16_load_v(up + c + i) : s);
        }
        for (; i < n; i++) {
            const uint16_t s = bf16_round(ys[i]);
            out[c + i] = up ? bf16_round(bf16_load(&s) * bf16_load(up + c + i)) : s;
        }
    }
}

void silu_gate_bf16(const uint16_t *gate, int64_t gate_stride, const uint16_t *up,
                    int64_t up_stride, uint16_t *out, int64_t rows, int64_t width,
                    int32_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * width > PARALLEL_SILU)
    for (int64_t r = 0; r < rows; r++)
        silu_row_bf16(gate + r * gate_stride, up ? up + r * up_stride : NULL, out + r * width,
                      width);
}

/* x * c + partner * s, each product rounded to bfloat16, then their float32 sum. */
static inline uint16_t rotary_bf16(uint16_t x, uint16_t c, uint16_t partner, uint16_t s) {
    const uint16_t a = bf16_round(bf16_load(&x) * bf16_load(&c));
    const uint16_t b = bf16_round(bf16_load(&partner) * bf16_load(&s));
    return bf16_round(bf16_load(&a) + bf16_load(&b));
}

/* rotate_heads for bfloat16 (rotary_bf16 of each value and its partner half a head away). */
void rotate_heads_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *cos,
                       const uint16_t *signed_sin, uint16_t *out, int64_t tokens, int64_t heads,
                       int64_t head_dim, int32_t threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens * heads * head_dim > PARALLEL_LIGHT)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *c = cos + t * head_dim, *s = signed_sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *xh = x + t * x_stride + h * head_dim;
            uint16_t *o = out + (t * heads + h) * head_dim;
            int64_t i = 0;
            for (; i + VLEN <= half; i += VLEN) {
                const vf lo = bf16_load_v(xh + i), hi = bf16_load_v(xh + half + i);
                bf16_store_v(o + i, bf16_round_v(lo * bf16_load_v(c + i)) +
                                        bf16_round_v(hi * bf16_load_v(s + i)));
                bf16_store_v(o + half + i, bf16_round_v(hi * bf16_load_v(c + half + i)) +
                                               bf16_round_v(lo * bf16_load_v(s + half + i)));
            }
            for (; i < half; i++) {
                o[i] = rotary_bf16(xh[i], c[i], xh[half + i], s[i]);
                o[half + i] = rotary_bf16(xh[half + i], c[half + i], xh[i], s[half + i]);
            }
        }
    }
}

/* Whether any of n values (float32, or bfloat16 where elem is 2) is an infinity or a NaN: its
 * exponent bits all set. */
static int any_nonfinite(const void *row, int64_t n, int64_t elem) {
    uint32_t bad = 0;
    if (elem == 4) {
        const uint32_t *w = row;
        for (int64_t i = 0; i < n; i++) bad |= (w[i] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *h = row;
        for (int64_t i = 0; i < n; i++) bad |= (h[i] & 0x7f80u) == 0x7f80u;
    }
    return bad != 0;
}

/* Writes the step's keys and values into the paged cache: row t of k and of v ([heads, T, D],
 * each with its own head and row strides, in elements of `elem` bytes) goes to slot slots[t] of
 * k_cache and v_cache ([heads, num_slots, D], head stride cache_head_stride). A token whose key
 * or value holds a value that is not finite, in any head, is written as zeros and flagged
 * (flagged[t] = 1, else 0): the cache holds finite values only. Returns how many, or -1,
 * writing nothing, if a slot is not in [0, num_slots). */
int64_t write_kv(const void *k, const int64_t k_strides[2], const void *v, const int64_t v_strides[2],
                 void *k_cache, void *v_cache, int64_t cache_head_stride, int64_t num_slots,
                 const int64_t *slots, uint8_t *flagged, int64_t tokens, int64_t heads,
                 int64_t head_dim, int64_t elem) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    const size_t bytes = (size_t)(head_dim * elem);
    int64_t count = 0;
    for (int64_t t = 0; t < tokens; t++) {
        int bad = 0;
        for (int64_t h = 0; h < heads && !bad; h++)
            bad = any_nonfinite((const char *)k + (h * k_strides[0] + t * k_strides[1]) * elem,
                                head_dim, elem) ||
                  any_nonfinite((const char *)v + (h * v_strides[0] + t * v_strides[1]) * elem,
                                head_dim, elem);
        flagged[t] = (uint8_t)bad;
        count += bad;
        for (int64_t h = 0; h < heads; h++) {
            char *kd = (char *)k_cache + (h * cache_head_stride + slots[t] * head_dim) * elem;
            char *vd = (char *)v_cache + (h * cache_head_stride + slots[t] * head_dim) * elem;
            if (bad) {
                memset(kd, 0, bytes);
                memset(vd, 0, bytes);
            } else {
                memcpy(kd, (const char *)k + (h * k_strides[0] + t * k_strides[1]) * elem, bytes);
                memcpy(vd, (const char *)v + (h * v_strides[0] + t * v_strides[1]) * elem, bytes);
            }
        }
    }
    return count;
}
