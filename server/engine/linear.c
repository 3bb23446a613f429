/* The product of a linear layer on the CPU, y[M, N] = x[M, K] @ W^T + b: float32, and bfloat16
 * (pairs of bfloat16 products where the compiler targets AVX512-BF16, widened to float32
 * elsewhere; at the end of this file).
 *
 * A decode step multiplies a few rows (one per running sequence) by every weight matrix of the
 * model, so its time is the time to stream the weights through the cores once: a product that
 * reaches the read bandwidth is as fast as the step can be. BLAS products are tuned for large
 * row counts: measured on a 2-core AMD EPYC (AVX-512) at 16 rows, MKL's packed float32 product
 * streamed the weights at about 6 GB/s (40-55 GFLOP/s), this kernel at 17-23 GB/s (140-185
 * GFLOP/s, the machine's read bandwidth). At prefill sizes (1,024 rows) it ran at 200-215
 * GFLOP/s against MKL's 160-195.
 *
 * The weight is packed once, at load, into panels of NR output columns: panel p holds
 * W[p*NR .. p*NR+NR, :] transposed, [K][NR], so one k step reads NR consecutive floats; the last
 * panel is padded with zero columns. Rows are taken in blocks of at most RB, of equal size (a
 * block's rows stay in the cache while its panels stream past) and a task owns whole (row
 * block, panel) pairs. For each tile of up to MR rows it keeps MR x NR sums in vector registers
 * and, for each k, adds x[r, k] times the panel's row k to them; the panel stays in the core's
 * cache while the row tiles after the first re-read it.
 *
 * Rounding: each output is summed over k in blocks of KB terms (a fresh register sum per
 * block, the blocks' sums added in order), so no running sum carries more than KB terms;
 * measured against float64 on the model's shapes, its error is about half of MKL's.
 * Bfloat16 (where the compiler targets AVX512-BF16): the same panels and tiles, with the
 * weight packed in pairs of k, [ceil(k / 2)][NR][2], so one dot-product instruction on
 * bfloat16 pairs (VDPBF16PS: both products exact in float32, added to a float32 sum) takes two
 * k steps of 16 columns; the sums are float32 over all of k, the bias is added in float32 and
 * each output rounded once to bfloat16 (nearest, ties to even), as oneDNN's product does.
 * Widening bfloat16 to float32 and running the float32 tiles was measured 1.3-2.5x slower than
 * oneDNN; the pair instruction does twice a float32 FMA's work.
 * Without AVX512-BF16 (AVX2 CPUs, where neither oneDNN nor torch multiplies bfloat16 fast),
 * the bfloat16 product widens bfloat16 to float32 and multiplies on the float32 instructions
 * (end of file): each pair as it goes for calls of a few rows, the inputs and panels once for
 * larger calls. Measured on a 2-core AVX2 EPYC, W1's four projection shapes hot: at 16 rows
 * 0.82 ms against float32's 0.75, from 156 to 1,235 rows 176-184 GFLOP/s against float32's
 * 167-179 (widening each pair as it went: 137-143); 3-5x faster than torch's bfloat16 product
 * at 16 rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__)
#define DL_VLEN 16 /* floats per vector */
#define MR 8       /* rows per register tile: 16 sums + 2 weights of 32 registers */
#else
/* AVX2 (16 registers of 8 floats): 16-float vectors would be split in two and an 8-row tile's
 * sums spilled to memory, which measured 6-30x slower than MKL on a 2-core AVX2 EPYC; an
 * 8-float vector and a 6-row tile keep 12 sums + 2 weights in registers. Each output's sum
 * runs over k in the same order at every width. */
#define DL_VLEN 8
#define MR 6
#endif
#define DL_NV 2              /* vectors per panel row */
#define NR (DL_NV * DL_VLEN) /* output columns per panel */
#define KB 64                /* terms per register sum */
#define RB 256               /* rows per block: a block's rows stay in cache across its panels */
#define PANEL_ROW (NR * 4)   /* bytes per panel row: NR floats, or NR pairs of bfloat16 */

/* The rows of the next panel a tile fetches into the cache as it runs (see each_tile). */
typedef struct {
    const char *at; /* the first row's bytes */
    int64_t rows;   /* how many: one per step of the tile's loop over the panel, from its start */
} Ahead;

static inline __attribute__((always_inline)) void fetch_ahead(Ahead ahead, int64_t i) {
    for (int b = 0; b < PANEL_ROW; b += 64) __builtin_prefetch(ahead.at + i * PANEL_ROW + b);
}

typedef float dl_vf __attribute__((vector_size(4 * DL_VLEN)));
static inline dl_vf dl_load(const float *p) {
    dl_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void dl_store(float *p, dl_vf v) { memcpy(p, &v, sizeof v); }

/* tile(mr, ...) with mr a constant at each call, so a tile's sums stay in registers. */
#if MR == 8
#define DL_WIDE_TILES(tile, ...)             \
    case 8: tile(8, __VA_ARGS__); break;     \
    case 7: tile(7, __VA_ARGS__); break;
#else
#define DL_WIDE_TILES(tile, ...)
#endif
#define BY_ROWS(tile, mr, ...)                   \
    switch (mr) {                                \
        DL_WIDE_TILES(tile, __VA_ARGS__)         \
        case 6: tile(6, __VA_ARGS__); break;     \
        case 5: tile(5, __VA_ARGS__); break;     \
        case 4: tile(4, __VA_ARGS__); break;     \
        case 3: tile(3, __VA_ARGS__); break;     \
        case 2: tile(2, __VA_ARGS__); break;     \
        default: tile(1, __VA_ARGS__); break;    \
    }

/* One step of a tile's loop: x[r, i] times the panel's row i, added to the tile's sums. */
static inline __attribute__((always_inline)) void dl_step(
    const int mr, const float *x, int64_t xs, const float *panel, int64_t i, dl_vf acc[MR][DL_NV]) {
    dl_vf w[DL_NV];
    for (int j = 0; j < DL_NV; j++) w[j] = dl_load(panel + i * NR + j * DL_VLEN);
    for (int r = 0; r < mr; r++) {
        float xv = x[r * xs + i];
        for (int j = 0; j < DL_NV; j++) acc[r][j] += xv * w[j];
    }
}

/* One tile: rows [0, mr) of x (row stride xs) against one panel; the sums go to sums[mr][NR].
 * mr is a constant at every call site, so the sums live in registers. */
static inline __attribute__((always_inline)) void dl_tile(
    const int mr, const float *x, int64_t xs, const float *panel, int64_t k, float sums[MR][NR],
    Ahead ahead) {
    for (int64_t k0 = 0; k0 < k; k0 += KB) {
        int64_t k1 = k0 + KB < k ? k0 + KB : k;
        dl_vf acc[MR][DL_NV];
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < DL_NV; j++) acc[r][j] = (dl_vf){0};
        /* The steps that fetch ahead, then the rest: no test in the loop that has none. */
        const int64_t fetching = ahead.rows < k0 ? k0 : ahead.rows < k1 ? ahead.rows : k1;
        for (int64_t i = k0; i < fetching; i++) {
            fetch_ahead(ahead, i);
            dl_step(mr, x, xs, panel, i, acc);
        }
        for (int64_t i = fetching; i < k1; i++) dl_step(mr, x, xs, panel, i, acc);
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < DL_NV; j++) {
                dl_vf a = acc[r][j];
                if (k0) a += dl_load(&sums[r][j * DL_VLEN]);
                dl_store(&sums[r][j * DL_VLEN], a);
            }
    }
}

typedef struct {
    const void *x;      /* [m, k], unit stride along k */
    int64_t x_stride;   /* elements between rows */
    const void *packed; /* ceil(n / NR) panels: float32 [k][NR], bfloat16 [ceil(k / 2)][NR][2] */
    const float *bias;  /* float32, ceil(n / NR) * NR values (the padding zeros), or NULL */
    void *y;            /* [m, n], row stride y_stride, the dtype of x */
    int64_t y_stride;
    int64_t m, n, k;
    int32_t threads;
} LinearJob;

int64_t linear_job_size(void) { return (int64_t)sizeof(LinearJob); }
int64_t linear_panel_width(void) { return NR; }

/* Rows [r0, r0 + mr) of the job against panel p: sums, bias, stored. */
static void dl_rows(const LinearJob *job, int64_t r0, int mr, int64_t p, Ahead ahead) {
    float sums[MR][NR];
    const int64_t k = job->k, c0 = p * NR, xs = job->x_stride;
    const int64_t cols = job->n - c0 < NR ? job->n - c0 : NR;
    const float *panel = (const float *)job->packed + p * k * NR;
    const float *xr = (const float *)job->x + r0 * xs;
    BY_ROWS(dl_tile, mr, xr, xs, panel, k, sums, ahead);
    for (int r = 0; r < mr; r++) {
        if (job->bias)
            for (int j = 0; j < DL_NV; j++)
                dl_store(&sums[r][j * DL_VLEN],
                         dl_load(&sums[r][j * DL_VLEN]) + dl_load(job->bias + c0 + j * DL_VLEN));
        memcpy((float *)job->y + (r0 + r) * job->y_stride + c0, sums[r], (size_t)cols * sizeof(float));
    }
}

/* The rows of each block: m rows split evenly over the fewest blocks of at most RB, in whole
 * tiles of mr. The static split hands each thread an equal run of (block, panel) pairs, so
 * blocks of unequal size left a thread idle (312 rows as 256 + 56 rows: 102-110 GFLOP/s on
 * W1's shapes with 2 threads on a 2-core AVX2 EPYC, 178-183 as 2 x 156). Which block a row is
 * in changes no sum. m >= 1. */
static int64_t block_rows_of(int64_t m, int mr) {
    const int64_t least = (m + RB - 1) / RB;
    return ((m + least - 1) / least + mr - 1) / mr * mr;
}

typedef void (*RowsFn)(const LinearJob *job, int64_t r0, int mr, int64_t p, Ahead ahead);

/* Row blocks of at most RB rows, each against every panel (of panel_rows rows); a task owns
 * whole (block, panel) pairs and runs `rows` on each tile of up to `mr` rows (at most MR).
 *
 * Fetching ahead: at decode sizes a panel's first tile reads it from memory and the tiles after
 * it re-read it from the cache, during which the memory would idle, so the step took as long
 * as the two phases end to end. Where a block holds at least two full tiles, each of its tiles
 * fetches an equal share of the next panel's rows into the cache as it runs (the loop steps
 * that fetch are apart from those that do not, so a block of many tiles, where each fetches
 * little, pays no test per step). Same arithmetic, same bits. Measured on a 2-core AVX2 EPYC,
 * all of SmolLM2-135M's products in a row (a C loop, best of 15, five alternating runs): 16
 * rows, a W1 decode step, 34.5-39.9 ms against 37.8-47.2 ms without; 64 rows 101.6-111.7 ms
 * against 106.7-116.7; 4 rows (nothing fetched) and 512 rows within the host's noise. */
static void each_tile(const LinearJob *job, RowsFn rows, int mr, int64_t panel_rows) {
    if (job->m < 1) return; /* no rows: nothing to write (and no blocks to divide them into) */
    const int64_t panels = (job->n + NR - 1) / NR;
    const int64_t block_rows = block_rows_of(job->m, mr);
    const int64_t blocks = (job->m + block_rows - 1) / block_rows;
    const char *packed = job->packed;
#pragma omp parallel for collapse(2) schedule(static) num_threads(job->threads)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t start = b * block_rows;
            const int64_t end = start + block_rows < job->m ? start + block_rows : job->m;
            const int64_t tiles = (end - start + mr - 1) / mr;
            const int64_t share =
                end - start >= 2 * mr && p + 1 < panels ? (panel_rows + tiles - 1) / tiles : 0;
            for (int64_t t = 0; t < tiles; t++) {
                Ahead ahead = {NULL, 0};
                if (share && t * share < panel_rows) {
                    const int64_t first = t * share;
                    ahead.at = packed + ((p + 1) * panel_rows + first) * PANEL_ROW;
                    ahead.rows = panel_rows - first < share ? panel_rows - first : share;
                }
                const int64_t r0 = start + t * mr;
                rows(job, r0, end - r0 < mr ? (int)(end - r0) : mr, p, ahead);
            }
        }
}

void linear_product(const LinearJob *job) { each_tile(job, dl_rows, MR, job->k); }

#if defined(__AVX512BF16__)
#include <immintrin.h>

/* One step of a bfloat16 tile: the pair of x[r, 2p], x[r, 2p + 1] times the panel's pair row p. */
static inline __attribute__((always_inline)) void bf_step(
    const int mr, const uint16_t *x, int64_t xs, const uint16_t *panel, int64_t p,
    __m512 acc[MR][DL_NV]) {
    __m512bh w[DL_NV];
    for (int j = 0; j < DL_NV; j++)
        w[j] = (__m512bh)_mm512_loadu_si512(panel + (p * NR + j * DL_VLEN) * 2);
    for (int r = 0; r < mr; r++) {
        int32_t pair;
        memcpy(&pair, x + r * xs + 2 * p, sizeof pair);
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < DL_NV; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, w[j]);
    }
}

/* One bfloat16 tile: rows [0, mr) of x against one pair-packed panel, float32 sums in sums. */
static inline __attribute__((always_inline)) void bf_tile(
    const int mr, const uint16_t *x, int64_t xs, const uint16_t *panel, int64_t k,
    float sums[MR][NR], Ahead ahead) {
    __m512 acc[MR][DL_NV];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < DL_NV; j++) acc[r][j] = _mm512_setzero_ps();
    const int64_t pairs = k / 2, fetching = ahead.rows < pairs ? ahead.rows : pairs;
    for (int64_t p = 0; p < fetching; p++) {
        fetch_ahead(ahead, p);
        bf_step(mr, x, xs, panel, p, acc);
    }
    for (int64_t p = fetching; p < pairs; p++) bf_step(mr, x, xs, panel, p, acc);
    if (k & 1) { /* the last k alone: its pair's second weight is a zero of the packing */
        __m512bh w[DL_NV];
        for (int j = 0; j < DL_NV; j++)
            w[j] = (__m512bh)_mm512_loadu_si512(panel + (pairs * NR + j * DL_VLEN) * 2);
        for (int r = 0; r < mr; r++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int32_t)x[r * xs + k - 1]);
            for (int j = 0; j < DL_NV; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, w[j]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < DL_NV; j++) _mm512_storeu_ps(&sums[r][j * DL_VLEN], acc[r][j]);
}

static void bf_rows(const LinearJob *job, int64_t r0, int mr, int64_t p, Ahead ahead) {
    float sums[MR][NR];
    const int64_t k = job->k, c0 = p * NR, xs = job->x_stride;
    const int64_t cols = job->n - c0 < NR ? job->n - c0 : NR;
    const uint16_t *panel = (const uint16_t *)job->packed + p * ((k + 1) / 2) * NR * 2;
    const uint16_t *xr = (const uint16_t *)job->x + r0 * xs;
    BY_ROWS(bf_tile, mr, xr, xs, panel, k, sums, ahead);
    for (int r = 0; r < mr; r++) {
        uint16_t out[NR];
        for (int j = 0; j < DL_NV; j++) {
            __m512 v = _mm512_loadu_ps(&sums[r][j * DL_VLEN]);
            if (job->bias) v = _mm512_add_ps(v, _mm512_loadu_ps(job->bias + c0 + j * DL_VLEN));
            const __m256bh h = _mm512_cvtneps_pbh(v);
            memcpy(out + j * DL_VLEN, &h, sizeof h);
        }
        memcpy((uint16_t *)job->y + (r0 + r) * job->y_stride + c0, out, (size_t)cols * 2);
    }
}

int linear_bf16_available(void) { return 1; }

void linear_product_bf16(const LinearJob *job) { each_tile(job, bf_rows, MR, (job->k + 1) / 2); }
int linear_bf16_widens(void) { return 0; }
#else
/* Without AVX512-BF16 (on AVX2 CPUs, where neither oneDNN nor torch has a fast bfloat16
 * product: torch's measured 2 GFLOP/s on a 2-core AVX2 EPYC): the same pair-packed panels,
 * each bfloat16 widened to float32 (a bfloat16 is the top half of a float32: a shift or a
 * mask of its 32-bit pair word) and multiplied on the float32 tiles' instructions. Each
 * output is summed in float32 over all of k in order, the bias added in float32, and rounded
 * once to bfloat16 (nearest, ties to even; NaN kept). The row tile is smaller than float32's:
 * each pair's even and odd weights take four registers. */
#if defined(__AVX512F__)
#define MRW 8
#else
#define MRW 4
#endif
#define KP 32 /* pairs of x widened per block */

typedef uint32_t dl_vu __attribute__((vector_size(4 * DL_VLEN)));

/* One step of a widening tile: x's pair i of the block (widened in xf) times the panel's pair
 * row p, the even and odd weights widened to float32. */
static inline __attribute__((always_inline)) void bw_step(
    const int mr, float xf[MR][2 * KP], int64_t i, const uint16_t *panel, int64_t p,
    dl_vf acc[MR][DL_NV]) {
    dl_vf even[DL_NV], odd[DL_NV];
    for (int j = 0; j < DL_NV; j++) {
        dl_vu raw;
        memcpy(&raw, panel + (p * NR + j * DL_VLEN) * 2, sizeof raw);
        even[j] = (dl_vf)(raw << 16);
        odd[j] = (dl_vf)(raw & 0xffff0000u);
    }
    for (int r = 0; r < mr; r++) {
        const float xe = xf[r][2 * i], xo = xf[r][2 * i + 1];
        for (int j = 0; j < DL_NV; j++) {
            acc[r][j] += xe * even[j];
            acc[r][j] += xo * odd[j];
        }
    }
}

static inline __attribute__((always_inline)) void bw_tile(
    const int mr, const uint16_t *x, int64_t xs, const uint16_t *panel, int64_t k,
    float sums[MR][NR], Ahead ahead) {
    dl_vf acc[MR][DL_NV];
    float xf[MR][2 * KP];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < DL_NV; j++) acc[r][j] = (dl_vf){0};
    const int64_t pairs = (k + 1) / 2;
    for (int64_t p0 = 0; p0 < pairs; p0 += KP) {
        const int64_t p1 = p0 + KP < pairs ? p0 + KP : pairs;
        const int64_t i0 = 2 * p0, i1 = 2 * p1 < k ? 2 * p1 : k;
        for (int r = 0; r < mr; r++) {
            for (int64_t i = i0; i < i1; i++) xf[r][i - i0] = bf16_load(x + r * xs + i);
            if (i1 < 2 * p1) xf[r][i1 - i0] = 0.0f; /* an odd k: the padding's partner */
        }
        const int64_t fetching = ahead.rows < p0 ? p0 : ahead.rows < p1 ? ahead.rows : p1;
        for (int64_t p = p0; p < fetching; p++) {
            fetch_ahead(ahead, p);
            bw_step(mr, xf, p - p0, panel, p, acc);
        }
        for (int64_t p = fetching; p < p1; p++) bw_step(mr, xf, p - p0, panel, p, acc);
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < DL_NV; j++) dl_store(&sums[r][j * DL_VLEN], acc[r][j]);
}

/* A tile's float32 sums, plus the bias, each rounded once to bfloat16 into rows [r0, r0 + mr)
 * of y at panel p's columns. */
static void bw_store(const LinearJob *job, int64_t r0, int mr, int64_t p, float sums[MR][NR]) {
    const int64_t c0 = p * NR, cols = job->n - c0 < NR ? job->n - c0 : NR;
    for (int r = 0; r < mr; r++) {
        uint16_t *y = (uint16_t *)job->y + (r0 + r) * job->y_stride + c0;
        for (int64_t c = 0; c < cols; c++)
            y[c] = bf16_round(sums[r][c] + (job->bias ? job->bias[c0 + c] : 0.0f));
    }
}

static void bw_rows(const LinearJob *job, int64_t r0, int mr, int64_t p, Ahead ahead) {
    float sums[MR][NR];
    const int64_t k = job->k, xs = job->x_stride;
    const uint16_t *panel = (const uint16_t *)job->packed + p * ((k + 1) / 2) * NR * 2;
    const uint16_t *xr = (const uint16_t *)job->x + r0 * xs;
    BY_ROWS(bw_tile, mr, xr, xs, panel, k, sums, ahead);
    bw_store(job, r0, mr, p, sums);
}

/* Calls of at least WIDE_ROWS rows widen once and multiply on the float32 tiles: the input
 * rows to float32 once per call, each panel once per row block (into a buffer of the thread's,
 * [2 * pairs][NR]: a pair row's even and odd weights as two float32 rows), so the tiles run
 * the float32 product's loop (MR rows, 2 loads a step) rather than widening every weight for
 * every tile of MRW rows. Each output is the same single float32 sum over k in the same order
 * (the odd k's zero padding included) with the same fused multiply-adds as bw_tile's, so a
 * row has the same bits whichever path its call takes. Measured on a 2-core AVX2 EPYC, all of
 * SmolLM2-135M's layer products in a row (weights from memory, best of 7): 16 rows 26.7 ms
 * widening each pair against 35.1 widening once (the once-widened panel is written and
 * re-read, and fetches nothing ahead), 24 rows 38.8 against 41.3, 32 rows 51.0 against 52.0,
 * 40 rows 62.4 against 61.2, 64 rows 97.9 against 89.6, 96 rows 146.7 against 123.9. */
#define WIDE_ROWS 32

static inline __attribute__((always_inline)) void bp_tile(
    const int mr, const float *x, int64_t xs, const float *panel, int64_t k, float sums[MR][NR]) {
    dl_vf acc[MR][DL_NV];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < DL_NV; j++) acc[r][j] = (dl_vf){0};
    for (int64_t i = 0; i < k; i++) dl_step(mr, x, xs, panel, i, acc);
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < DL_NV; j++) dl_store(&sums[r][j * DL_VLEN], acc[r][j]);
}

/* Panel `pair_panel` ([pairs][NR][2] bfloat16) as float32 rows [2 * pairs][NR] in `out`. */
static void widen_panel(const uint16_t *pair_panel, int64_t pairs, float *out) {
    for (int64_t p = 0; p < pairs; p++)
        for (int j = 0; j < DL_NV; j++) {
            dl_vu raw;
            memcpy(&raw, pair_panel + (p * NR + j * DL_VLEN) * 2, sizeof raw);
            dl_store(out + 2 * p * NR + j * DL_VLEN, (dl_vf)(raw << 16));
            dl_store(out + (2 * p + 1) * NR + j * DL_VLEN, (dl_vf)(raw & 0xffff0000u));
        }
}

/* The product through widened rows and panels (see WIDE_ROWS); returns 0, writing nothing,
 * where the widened rows' buffer cannot be had (the caller then runs the widening tiles). A
 * thread that cannot have its panel buffer runs the widening tiles on its pairs: the same
 * bits either way. */
static int widened_product(const LinearJob *job) {
    const int64_t m = job->m, pairs = (job->k + 1) / 2, kp = 2 * pairs;
    const int64_t panels = (job->n + NR - 1) / NR;
    const int threads = job->threads > 0 ? job->threads : 1;
    float *x = malloc((size_t)(m * kp) * sizeof(float));
    if (!x) return 0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *src = (const uint16_t *)job->x + r * job->x_stride;
        for (int64_t i = 0; i < job->k; i++) x[r * kp + i] = bf16_load(src + i);
        if (job->k < kp) x[r * kp + job->k] = 0.0f; /* an odd k: the padding's partner */
    }
    const int64_t block_rows = block_rows_of(m, MR);
    const int64_t blocks = (m + block_rows - 1) / block_rows;
#pragma omp parallel num_threads(threads)
    {
        float *panel = malloc((size_t)(kp * NR) * sizeof(float));
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t p = 0; p < panels; p++) {
                const int64_t end = (b + 1) * block_rows < m ? (b + 1) * block_rows : m;
                if (panel)
                    widen_panel((const uint16_t *)job->packed + p * pairs * NR * 2, pairs, panel);
                for (int64_t r0 = b * block_rows; r0 < end; r0 += MR) {
                    const int mr = end - r0 < MR ? (int)(end - r0) : MR;
                    if (!panel) {
                        bw_rows(job, r0, mr, p, (Ahead){NULL, 0});
                        continue;
                    }
                    float sums[MR][NR];
                    BY_ROWS(bp_tile, mr, x + r0 * kp, kp, panel, kp, sums);
                    bw_store(job, r0, mr, p, sums);
                }
            }
        free(panel);
    }
    free(x);
    return 1;
}

int linear_bf16_available(void) { return 1; }

int linear_bf16_widens(void) { return 1; }

void linear_product_bf16(const LinearJob *job) {
    if (job->m >= WIDE_ROWS && widened_product(job)) return;
    each_tile(job, bw_rows, MRW, (job->k + 1) / 2);
}
#endif
