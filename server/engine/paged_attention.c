/* Attention of padded query units straight over the paged KV cache, on the CPU.
 *
 * torch's backends copy every unit's keys and values out of the paged cache (a gather per
 * layer) and then run a kernel over the copy. This kernel reads each key and value row where
 * it lies in the cache, through the unit's slot list, once per unit and kv head: all of the
 * unit's queries (every member of a shared-prefix group, every query head of the kv head) are
 * scored against a block of keys while it sits in the core's cache, so a group's shared
 * segment is read once for the group (Hydragen's batching), not once per member.
 *
 * Layout, as in server/engine/attention.py: q [Hq, T, D] and out [Hq, T, D] with any head and
 * row strides (unit stride along D); the caches [Hkv, num_slots, D] with a head stride and row
 * stride D; slots [U, S]; hidden [U, q_len | 1, S] (1 where the query must not see the key);
 * q_index [U * q_len] (the flat row of each padded query); dest [U * q_len] (the flat row its
 * result goes to, or -1 for padding: not computed). Query head h reads kv head h / (Hq / Hkv).
 * Scores, softmax and the weighted sum are float32 whatever the storage type (float32 or
 * bfloat16), with the online softmax of flash attention over blocks of keys. In bfloat16, where
 * the compiler targets AVX512-BF16 and the head dimension is a multiple of 32, products are
 * taken two at a time by the pair instruction (exact products, float32 sums) and the weights
 * of the weighted sum are rounded to bfloat16 first (see load_pair_block). A query that sees
 * no key gets zeros and a log-sum-exp of -inf.
 *
 * Work is split over (unit, kv head) tasks by OpenMP. The library is linked against libgomp
 * by its soname, which the loader resolves to the copy torch has already loaded, so the tasks
 * run on torch's own worker threads (a second OpenMP runtime's threads would compete with
 * torch's for the same cores).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vec.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__)
#define PAIR_DOT 1 /* bfloat16 keys and values multiply in pairs (VDPBF16PS) */
#else
#define PAIR_DOT 0
#endif

#define SUB 4 /* vectors of keys per block */
/* Query rows per tile (they share each load of a key or a value vector), and PART: how many
 * vectors of each row's scores or weighted sums a tile holds in registers at once. */
#if VLEN == 16
#define ROWS 4   /* 16 score vectors + 4 key vectors of 32 registers */
#define PART SUB /* the whole block at once */
#else
/* AVX2 (16 registers of 8 floats): 6 rows by 2 vectors (12 sums, 2 key or value vectors and a
 * row's broadcast value), a block's 4 vectors of scores in two passes. The earlier 2 rows by 4
 * vectors (8 sums) left the compiler reading each key vector from memory once per row, so its
 * loops waited on loads: on a 2-core AVX2 EPYC, W1's prefill calls took 20-25% less time with
 * 6 x 2 (one thread, hot caches: 10.9 against 13.1-13.5 ms for a 4 x 312-query batch) and
 * decode calls as long or less; 3 x 4, 4 x 2 and 5 x 2 were no faster. Same arithmetic per
 * row, in the same order: the same bits. */
#define ROWS 6
#define PART 2
#endif
#if PAIR_DOT && PART != SUB
#error "the bfloat16 pair path sums a whole block of vectors per tile (PART == SUB)"
#endif
#define BLOCK (SUB * VLEN) /* keys per block */
/* Blocks ahead whose rows are fetched: in W1's run (T = 4) on a 2-core AVX2 EPYC the kernel's
 * decode calls took 0.366-0.390 s four blocks ahead against 0.411-0.421 s one block ahead. */
#define DISTANCE 4
#define MAX_HEAD_DIM 256

typedef struct {
    const void *q;
    int64_t q_head_stride, q_row_stride;
    const void *k, *v;
    int64_t cache_head_stride;
    const int64_t *slots;
    int64_t width; /* S */
    const uint8_t *hidden;
    int64_t hidden_unit_stride, hidden_query_stride; /* query stride 0: one row for the unit */
    const int64_t *q_index, *dest;
    int64_t q_len;
    void *out;
    int64_t out_head_stride, out_row_stride;
    float *lse; /* [Hq, T] float32, or NULL */
    int64_t lse_head_stride;
    int64_t units, q_heads, kv_heads, head_dim;
    float scale;
    int32_t bf16, threads;
} Job;

typedef uint8_t vb __attribute__((vector_size(VLEN)));

/* n values of a float32 or bfloat16 array from element `offset`, as float32 into dst. */
static inline void load_row(float *dst, const void *base, int64_t offset, int64_t n, int bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + offset;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_load(src + i);
    } else {
        memcpy(dst, (const float *)base + offset, (size_t)n * sizeof(float));
    }
}

/* The block's mask as vector lanes (-1: hidden, or past the block's `count` keys; 0: seen);
 * returns whether any key is seen. A full block's 64 flags are read as whole vectors. */
static inline int block_mask(const uint8_t *mask, int64_t count, vi masked[SUB]) {
    vi seen = {0};
    if (count == BLOCK) {
        for (int s = 0; s < SUB; s++) {
#if defined(__AVX512F__) /* gcc widens a generic byte vector lane by lane */
            const vi flags = (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mask + s * VLEN)));
            masked[s] = flags != 0;
#else
            vb flags;
            memcpy(&flags, mask + s * VLEN, sizeof flags);
            masked[s] = __builtin_convertvector(flags, vi) != 0;
#endif
            seen |= ~masked[s];
        }
    } else {
        for (int s = 0; s < SUB; s++)
            for (int b = 0; b < VLEN; b++) {
                const int64_t key = s * VLEN + b;
                masked[s][b] = key < count && !mask[key] ? 0 : -1;
                seen[b] |= !masked[s][b];
            }
    }
    for (int b = 0; b < VLEN; b++)
        if (seen[b]) return 1;
    return 0;
}

/* The calling thread's working buffer, at least `floats` long (64-byte aligned), kept for the
 * thread's next task: a layer runs dozens of tasks per step, and allocating and clearing a
 * fresh buffer for each cost more than a small task's arithmetic. NULL if out of memory. */
static float *task_buffer(size_t floats) {
    static _Thread_local float *buffer = NULL;
    static _Thread_local size_t capacity = 0;
    if (floats > capacity) {
        const size_t want = floats < 65536 ? 65536 : floats;
        float *grown = aligned_alloc(64, (want * sizeof(float) + 63) / 64 * 64);
        if (!grown) return NULL;
        free(buffer);
        buffer = grown;
        capacity = want;
    }
    return buffer;
}

/* Two vectors' lanes picked by index (0 to VLEN - 1: a's lanes, then b's), as the compiler
 * spells it. */
#if defined(__clang__)
#define PICK(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PICK(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* One stage of a VLEN x VLEN transpose: rows i and i + step (i's `step` bit clear) trade the
 * lanes where the row's and the lane's `step` bits differ. After the stages VLEN / 2, ..., 2, 1
 * lane j of row i holds what lane i of row j held. */
#define TRADE(r, step, lo, hi)                                   \
    for (int i = 0; i < VLEN; i++)                               \
        if (!(i & (step))) {                                     \
            const vf a = r[i], b = r[i + (step)];                \
            r[i] = lo;                                           \
            r[i + (step)] = hi;                                  \
        }

#if VLEN == 16
static inline void transpose(vf r[VLEN]) {
    TRADE(r, 8, PICK(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
          PICK(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    TRADE(r, 4, PICK(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
          PICK(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31));
    TRADE(r, 2, PICK(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
          PICK(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31));
    TRADE(r, 1, PICK(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
          PICK(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31));
}
/* Lanes of x, the halves, quarters, eighths and sixteenths swapped (for lane trees). */
#define SWAP8(x) PICK(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
#define SWAP4(x) PICK(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
#define SWAP2(x) PICK(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
#define SWAP1(x) PICK(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
#else
static inline void transpose(vf r[VLEN]) {
    TRADE(r, 4, PICK(a, b, 0, 1, 2, 3, 8, 9, 10, 11), PICK(a, b, 4, 5, 6, 7, 12, 13, 14, 15));
    TRADE(r, 2, PICK(a, b, 0, 1, 8, 9, 4, 5, 12, 13), PICK(a, b, 2, 3, 10, 11, 6, 7, 14, 15));
    TRADE(r, 1, PICK(a, b, 0, 8, 2, 10, 4, 12, 6, 14), PICK(a, b, 1, 9, 3, 11, 5, 13, 7, 15));
}
#define SWAP4(x) PICK(x, x, 4, 5, 6, 7, 0, 1, 2, 3)
#define SWAP2(x) PICK(x, x, 2, 3, 0, 1, 6, 7, 4, 5)
#define SWAP1(x) PICK(x, x, 1, 0, 3, 2, 5, 4, 7, 6)
#endif

/* The largest of `start` and x's lanes (a comparison tree, so the same value as lane by lane;
 * the lanes hold no NaN: they come from `x > y ? x : y` selections). */
static inline float most_of(vf x, float start) {
    vf y;
#if VLEN == 16
    y = SWAP8(x);
    x = select(y > x, y, x);
#endif
    y = SWAP4(x);
    x = select(y > x, y, x);
    y = SWAP2(x);
    x = select(y > x, y, x);
    y = SWAP1(x);
    x = select(y > x, y, x);
    return x[0] > start ? x[0] : start;
}

/* The sum of x's lanes, as a tree of halves. */
static inline float lane_sum(vf x) {
#if VLEN == 16
    x += SWAP8(x);
#endif
    x += SWAP4(x);
    x += SWAP2(x);
    x += SWAP1(x);
    return x[0];
}

/* VLEN values from element `offset` of a float32 or bfloat16 array, as float32 lanes. */
static inline vf load_vec(const void *base, int64_t offset, int bf16) {
    if (bf16) return bf16_load_v((const uint16_t *)base + offset);
    vf x;
    memcpy(&x, (const float *)base + offset, sizeof x);
    return x;
}

/* The block's keys, transposed into keys_t [dp][BLOCK], and values into values [BLOCK][dp]
 * unless `values` is NULL (read in place); keys past `count` are zeros in keys_t (their values
 * are never read). A head dimension of whole vectors is moved as VLEN x VLEN tiles, any other key
 * by key. */
static inline void load_block(const Job *job, const int64_t *slots, int64_t count,
                              int64_t cache_base, float *keys_t, float *values, int64_t dp) {
    const int64_t d = job->head_dim;
    if (d % VLEN == 0) {
        for (int s = 0; s < SUB; s++)
            for (int64_t c = 0; c < d; c += VLEN) {
                vf tile[VLEN];
                for (int b = 0; b < VLEN; b++) {
                    const int64_t key = s * VLEN + b;
                    tile[b] = key < count
                                  ? load_vec(job->k, cache_base + slots[key] * d + c, job->bf16)
                                  : (vf){0};
                }
                transpose(tile);
                for (int i = 0; i < VLEN; i++) *(vf *)(keys_t + (c + i) * BLOCK + s * VLEN) = tile[i];
            }
        if (values)
            for (int64_t b = 0; b < count; b++)
                for (int64_t c = 0; c < d; c += VLEN)
                    *(vf *)(values + b * dp + c) = load_vec(job->v, cache_base + slots[b] * d + c, job->bf16);
        return;
    }
    float row[MAX_HEAD_DIM];
    for (int64_t b = 0; b < count; b++) {
        const int64_t at = cache_base + slots[b] * d;
        load_row(row, job->k, at, d, job->bf16);
        for (int64_t i = 0; i < d; i++) keys_t[i * BLOCK + b] = row[i];
        load_row(values + b * dp, job->v, at, d, job->bf16);
    }
}

#if PAIR_DOT
/* Bfloat16 with the pair instruction (VDPBF16PS: two bfloat16 products, exact in float32,
 * added to a float32 sum). A key row's bfloat16 values read as 32-bit words are pairs of
 * dimensions, so the block's keys are transposed word by word into keys_t [dp / 2][BLOCK]
 * (pair i of each key) with the float32 path's 16 x 16 transpose, half as many of them; a
 * score takes one instruction per pair of dimensions (the queries are used as stored, the scale
 * applied to the float32 scores). The values are interleaved key by key
 * into values [BLOCK / 2][dp] (word: key 2j's value in the low half, key 2j + 1's in the high
 * half), so the weighted sum takes one instruction per pair of keys, with the weights rounded
 * to bfloat16 (as transformers' eager attention rounds its probabilities in bfloat16);
 * the running totals keep the float32 weights. A missing key of the last pair is zeros. */
static inline void load_pair_block(const Job *job, const int64_t *slots, int64_t count,
                                   int64_t cache_base, uint32_t *keys_t, uint32_t *values,
                                   int64_t dp) {
    const int64_t d = job->head_dim;
    const uint16_t *k = (const uint16_t *)job->k, *v = (const uint16_t *)job->v;
    for (int s = 0; s < SUB; s++)
        for (int64_t c = 0; c < d / 2; c += VLEN) {
            vf tile[VLEN];
            for (int b = 0; b < VLEN; b++) {
                const int64_t key = s * VLEN + b;
                if (key < count)
                    memcpy(&tile[b], k + cache_base + slots[key] * d + 2 * c, sizeof tile[b]);
                else
                    tile[b] = (vf){0};
            }
            transpose(tile);
            for (int i = 0; i < VLEN; i++) memcpy(keys_t + (c + i) * BLOCK + s * VLEN, &tile[i], sizeof tile[i]);
        }
    uint16_t order[2 * VLEN]; /* lane 2i: a's lane i, lane 2i + 1: b's lane i */
    for (int i = 0; i < VLEN; i++) order[2 * i] = (uint16_t)i, order[2 * i + 1] = (uint16_t)(2 * VLEN + i);
    const __m512i low = _mm512_loadu_si512(order);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(VLEN));
    for (int64_t j = 0; 2 * j < count; j++) {
        const uint16_t *a = v + cache_base + slots[2 * j] * d;
        const uint16_t *b = 2 * j + 1 < count ? v + cache_base + slots[2 * j + 1] * d : NULL;
        for (int64_t c = 0; c < d; c += 2 * VLEN) {
            const __m512i va = _mm512_loadu_si512(a + c);
            const __m512i vb = b ? _mm512_loadu_si512(b + c) : _mm512_setzero_si512();
            _mm512_storeu_si512(values + j * dp + c, _mm512_permutex2var_epi16(va, low, vb));
            _mm512_storeu_si512(values + j * dp + c + VLEN, _mm512_permutex2var_epi16(va, high, vb));
        }
    }
}

/* A tile's scores against the block: each row's `half` query pairs (rows `stride` words
 * apart) by keys_t. */
static inline void pair_scores(const uint32_t *qh, int64_t stride, int64_t half,
                               const uint32_t *keys_t, vf score[ROWS][SUB]) {
    for (int64_t i = 0; i < half; i++) {
        __m512bh kt[SUB];
        for (int s = 0; s < SUB; s++) kt[s] = (__m512bh)_mm512_loadu_si512(keys_t + i * BLOCK + s * VLEN);
        for (int t = 0; t < ROWS; t++) {
            const __m512bh qv = (__m512bh)_mm512_set1_epi32((int32_t)qh[t * stride + i]);
            for (int s = 0; s < SUB; s++) score[t][s] = (vf)_mm512_dpbf16_ps((__m512)score[t][s], qv, kt[s]);
        }
    }
}

/* Adds a tile's weighted values, vectors [c, c + SUB * VLEN) of each row, to acc. */
static inline void pair_sums(const uint16_t *wh, const uint32_t *values, int64_t count,
                             float *acc, int64_t dp, int64_t c) {
    __m512 sum[ROWS][SUB];
    for (int t = 0; t < ROWS; t++)
        for (int s = 0; s < SUB; s++) sum[t][s] = _mm512_loadu_ps(acc + t * dp + c + s * VLEN);
    for (int64_t j = 0; 2 * j < count; j++) {
        __m512bh vb[SUB];
        for (int s = 0; s < SUB; s++) vb[s] = (__m512bh)_mm512_loadu_si512(values + j * dp + c + s * VLEN);
        for (int t = 0; t < ROWS; t++) {
            uint32_t pair;
            memcpy(&pair, wh + t * BLOCK + 2 * j, sizeof pair);
            const __m512bh wv = (__m512bh)_mm512_set1_epi32((int32_t)pair);
            for (int s = 0; s < SUB; s++) sum[t][s] = _mm512_dpbf16_ps(sum[t][s], wv, vb[s]);
        }
    }
    for (int t = 0; t < ROWS; t++)
        for (int s = 0; s < SUB; s++) _mm512_storeu_ps(acc + t * dp + c + s * VLEN, sum[t][s]);
}
#endif

/* One (unit, kv head): every live query of the unit under each of the kv head's query heads,
 * against blocks of BLOCK keys, ROWS query rows at a time (they share each load of a key or a
 * value; PART vectors of the block's scores, and of the rows' sums, at a time). Head
 * dimensions are padded with zeros to a multiple of SUB * VLEN in the task's own buffers, and
 * the rows to a multiple of ROWS with dead ones, so the inner loops run on whole vectors and
 * whole tiles. Each row's arithmetic is its own, in the same order as one row
 * alone: a NaN stays in its row. */
static int run_task(const Job *job, int64_t unit, int64_t kv_head) {
    const int64_t d = job->head_dim, group = job->q_heads / job->kv_heads;
    const int64_t dp = (d + SUB * VLEN - 1) / (SUB * VLEN) * (SUB * VLEN);
    const int64_t n = job->q_len * group; /* query rows, query-major: row = j * group + gi */
    const int64_t np = (n + ROWS - 1) / ROWS * ROWS;
    const int pairs = PAIR_DOT && job->bf16 && d % (2 * VLEN) == 0;
    /* A task of one tile (a decode unit of one query) reads each value row once: float32 rows
     * that need no padding are read where they lie, not copied first (decode units 12% faster;
     * a copy pays off where several tiles re-read the block). */
    const int in_place = !job->bf16 && d == dp && np <= ROWS;
    const size_t floats = (size_t)(np * (2 * dp + VLEN + 3) + 2 * BLOCK * dp + ROWS * BLOCK * 3 / 2);
    float *buf = task_buffer(floats);
    if (!buf) return 1;
    float *keys_t = buf;                  /* [dp][BLOCK]: the block's keys, transposed */
    float *values = keys_t + BLOCK * dp;  /* [BLOCK][dp] */
    float *w = values + BLOCK * dp;       /* [ROWS][BLOCK]: a tile's weights for the block */
    float *qs = w + ROWS * BLOCK;         /* [np][dp], scaled */
    float *acc = qs + np * dp;            /* [np][dp]: the running weighted sums of values */
    vf *lanes = (vf *)(acc + np * dp);    /* [np]: pairs: the running totals, lane by lane */
    float *m = (float *)(lanes + np), *l = m + np, *live = l + np; /* running max, total */
    uint16_t *wh = (uint16_t *)(live + np); /* [ROWS][BLOCK]: pairs: the weights in bfloat16 */
    /* Zeros where a task reads before it writes: the padding past d (keys, values, queries),
     * the padding rows' queries, the sums and totals. The rest is written before it is read. */
    memset(acc, 0, (size_t)(np * (dp + VLEN) + 2 * np) * sizeof(float));
    memset(qs + n * dp, 0, (size_t)((np - n) * dp) * sizeof(float));
    if (dp > d) { /* pairs: keys_t [dp / 2][BLOCK], values [BLOCK / 2][dp], queries' words */
        const int64_t from = pairs ? d / 2 : d, to = pairs ? dp / 2 : dp, rows = pairs ? BLOCK / 2 : BLOCK;
        memset(keys_t + from * BLOCK, 0, (size_t)((to - from) * BLOCK) * sizeof(float));
        for (int64_t b = 0; b < rows; b++) memset(values + b * dp + d, 0, (dp - d) * sizeof(float));
        for (int64_t r = 0; r < n; r++)
            memset(pairs ? (void *)((uint16_t *)(qs + r * dp) + d) : (void *)(qs + r * dp + d), 0,
                   (size_t)(dp - d) * (pairs ? 2 : 4));
    }
    for (int64_t r = n; r < np; r++) live[r] = 0.0f, m[r] = -INFINITY;
    for (int64_t j = 0; j < job->q_len; j++) {
        const int64_t at = job->q_index[unit * job->q_len + j];
        const int on = job->dest[unit * job->q_len + j] >= 0;
        for (int64_t gi = 0; gi < group; gi++) {
            const int64_t r = j * group + gi, head = kv_head * group + gi;
            live[r] = (float)on;
            m[r] = -INFINITY;
            if (!on) continue;
            const int64_t q_at = head * job->q_head_stride + at * job->q_row_stride;
            if (pairs) { /* the row's bfloat16 values as they are: the scale goes on the scores */
                memcpy(qs + r * dp, (const uint16_t *)job->q + q_at, (size_t)d * 2);
                continue;
            }
            load_row(qs + r * dp, job->q, q_at, d, job->bf16);
            for (int64_t i = 0; i < d; i++) qs[r * dp + i] *= job->scale;
        }
    }
    const int64_t *slots = job->slots + unit * job->width;
    const uint8_t *hidden = job->hidden + unit * job->hidden_unit_stride;
    const int64_t cache_base = kv_head * job->cache_head_stride, elem = job->bf16 ? 2 : 4;
    for (int64_t start = 0; start < job->width; start += BLOCK) {
        const int64_t count = job->width - start < BLOCK ? job->width - start : BLOCK;
        /* The rows DISTANCE blocks ahead are fetched while this one is computed (at the
         * first block, every block up to there): the cache is usually cold here (each layer's
         * weights have just streamed through), and one block ahead is too little time for the
         * memory to deliver a block. */
        const int64_t from = start == 0 ? count : start + DISTANCE * BLOCK;
        const int64_t to = start + (DISTANCE + 1) * BLOCK < job->width ? start + (DISTANCE + 1) * BLOCK : job->width;
        for (int64_t key = from; key < to; key++) {
            const int64_t at = (cache_base + slots[key] * d) * elem;
            for (int64_t byte = 0; byte < d * elem; byte += 64) {
                __builtin_prefetch((const char *)job->k + at + byte);
                __builtin_prefetch((const char *)job->v + at + byte);
            }
        }
#if PAIR_DOT
        if (pairs)
            load_pair_block(job, slots + start, count, cache_base, (uint32_t *)keys_t,
                            (uint32_t *)values, dp);
        else
#endif
            load_block(job, slots + start, count, cache_base, keys_t, in_place ? NULL : values, dp);
        vi masked[SUB];
        int64_t mask_of = -1; /* the query whose mask `masked` holds */
        int any = 0;
        for (int64_t r0 = 0; r0 < np; r0 += ROWS) {
            int used = 0; /* rows of the tile that see a key of this block */
            vi tile_mask[ROWS][SUB];
            int sees[ROWS];
            for (int t = 0; t < ROWS; t++) {
                const int64_t r = r0 + t;
                sees[t] = 0;
                if (live[r] == 0.0f) continue;
                if (r / group != mask_of) { /* a query's heads share its mask row */
                    mask_of = r / group;
                    const uint8_t *mask = hidden + mask_of * job->hidden_query_stride + start;
                    any = block_mask(mask, count, masked);
                }
                sees[t] = any;
                used |= any;
                for (int s = 0; s < SUB; s++) tile_mask[t][s] = masked[s];
            }
            if (!used) continue; /* no row of the tile sees a key of this block */
            vf score[ROWS][SUB] = {{{0}}};
#if PAIR_DOT
            if (pairs) {
                pair_scores((const uint32_t *)(qs + r0 * dp), dp, dp / 2, (const uint32_t *)keys_t,
                            score);
                for (int t = 0; t < ROWS; t++)
                    for (int s = 0; s < SUB; s++) score[t][s] *= job->scale;
            } else
#endif
                for (int s0 = 0; s0 < SUB; s0 += PART) { /* PART vectors of keys at a time */
                    vf part[ROWS][PART] = {{{0}}};
                    for (int64_t i = 0; i < dp; i++) {
                        vf kt[PART];
                        for (int s = 0; s < PART; s++) kt[s] = *(const vf *)(keys_t + i * BLOCK + (s0 + s) * VLEN);
                        for (int t = 0; t < ROWS; t++) {
                            const float qi = qs[(r0 + t) * dp + i];
                            for (int s = 0; s < PART; s++) part[t][s] += qi * kt[s];
                        }
                    }
                    for (int t = 0; t < ROWS; t++)
                        for (int s = 0; s < PART; s++) score[t][s0 + s] = part[t][s];
                }
            for (int t = 0; t < ROWS; t++) {
                const int64_t r = r0 + t;
                vf *wt = (vf *)(w + t * BLOCK);
                if (!sees[t]) { /* weight 0 for every key: the row's sums are unchanged */
                    for (int s = 0; s < SUB; s++) wt[s] = (vf){0};
                    if (pairs) memset(wh + t * BLOCK, 0, BLOCK * sizeof *wh);
                    continue;
                }
                vf most = (vf){0} - INFINITY;
                for (int s = 0; s < SUB; s++) {
                    score[t][s] = select(tile_mask[t][s], (vf){0} - INFINITY, score[t][s]);
                    most = select(score[t][s] > most, score[t][s], most);
                }
                const float top = most_of(most, m[r]);
                if (top > m[r]) {
                    const float shrink = m[r] == -INFINITY ? 0.0f : expf(m[r] - top);
                    float *a = acc + r * dp;
                    if (pairs)
                        lanes[r] *= shrink;
                    else
                        l[r] *= shrink;
                    for (int64_t i = 0; i < dp; i++) a[i] *= shrink;
                    m[r] = top;
                }
                vf total = {0};
                for (int s = 0; s < SUB; s++) {
                    const vf e = exp_v(score[t][s] - top);
                    wt[s] = e;
                    total += e;
#if PAIR_DOT
                    if (pairs) {
                        const __m256bh h = _mm512_cvtneps_pbh((__m512)e);
                        memcpy(wh + t * BLOCK + s * VLEN, &h, sizeof h);
                    }
#endif
                }
                if (pairs) /* lane by lane, added up once at the end: no chain of 16 a block */
                    lanes[r] += total;
                else
                    for (int b = 0; b < VLEN; b++) l[r] += total[b];
            }
            /* PART vectors of each row's sum at a time, each its own chain of additions. */
            for (int64_t c = 0; c < dp; c += PART * VLEN) {
#if PAIR_DOT
                if (pairs) {
                    pair_sums(wh, (const uint32_t *)values, count, acc + r0 * dp, dp, c);
                    continue;
                }
#endif
                vf sum[ROWS][PART];
                for (int t = 0; t < ROWS; t++)
                    for (int s = 0; s < PART; s++) sum[t][s] = *(vf *)(acc + (r0 + t) * dp + c + s * VLEN);
                for (int64_t b = 0; b < count; b++) {
                    /* Vector by vector: one 128-byte copy into the stack was done in 16-byte
                     * moves, and the 32-byte reads of it then waited on store forwarding (the
                     * whole kernel ran 2x slower for it on an AVX2 EPYC). */
                    const float *row = in_place ? (const float *)job->v + cache_base + slots[start + b] * d + c
                                                : values + b * dp + c;
                    vf vb[PART];
                    for (int s = 0; s < PART; s++) vb[s] = *(const vfu *)(row + s * VLEN);
                    for (int t = 0; t < ROWS; t++) {
                        const float wb = w[t * BLOCK + b];
                        for (int s = 0; s < PART; s++) sum[t][s] += wb * vb[s];
                    }
                }
                for (int t = 0; t < ROWS; t++)
                    for (int s = 0; s < PART; s++) *(vf *)(acc + (r0 + t) * dp + c + s * VLEN) = sum[t][s];
            }
        }
    }
    if (pairs)
        for (int64_t r = 0; r < n; r++) l[r] = lane_sum(lanes[r]);
    for (int64_t j = 0; j < job->q_len; j++) {
        const int64_t at = job->dest[unit * job->q_len + j];
        if (at < 0) continue;
        for (int64_t gi = 0; gi < group; gi++) {
            const int64_t r = j * group + gi, head = kv_head * group + gi;
            const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            const int64_t o_at = head * job->out_head_stride + at * job->out_row_stride;
            if (job->bf16) {
                uint16_t *o = (uint16_t *)job->out + o_at;
                for (int64_t i = 0; i < d; i++) o[i] = bf16_round(acc[r * dp + i] * inv);
            } else {
                float *o = (float *)job->out + o_at;
                for (int64_t i = 0; i < d; i++) o[i] = acc[r * dp + i] * inv;
            }
            if (job->lse)
                job->lse[head * job->lse_head_stride + at] =
                    l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
        }
    }
    return 0;
}

/* Returns 0 on success, 1 if memory for a task's buffers could not be had, 2 for shapes the
 * kernel does not take (nothing is read or written then). */
int paged_attention(const Job *job) {
    if (job->head_dim < 1 || job->head_dim > MAX_HEAD_DIM || job->kv_heads < 1 ||
        job->q_heads % job->kv_heads != 0 || job->q_len < 0 || job->width < 0 || job->units < 0)
        return 2;
    const int64_t tasks = job->units * job->kv_heads;
    const int threads = job->threads < 1 ? 1 : job->threads;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : failed)
    for (int64_t t = 0; t < tasks; t++) failed |= run_task(job, t / job->kv_heads, t % job->kv_heads);
    return failed;
}

/* The size of Job as compiled, for the loader to check its own layout against. */
int64_t paged_attention_job_size(void) { return (int64_t)sizeof(Job); }

/* The largest head dimension the kernel takes. */
int64_t paged_attention_max_head_dim(void) { return MAX_HEAD_DIM; }
