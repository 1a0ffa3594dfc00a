/* Attention of a few new tokens per sequence over a long KV cache, on CPU, in float32 or bfloat16.
 *
 * Decoding and verification read the whole cache for a handful of queries per sequence: the cost is reading the
 * keys and values and, once a few tokens per sequence are new, the arithmetic on them. Each worker takes whole
 * (sequence, key-value head) pairs and reads the pair's keys and values once, a block at a time, for all the
 * queries of its group (the query heads sharing the key-value head, times the new tokens), keeping a running maximum
 * and sum per query (flash attention), so that no scores over the whole cache are written out and read back.
 *
 * A group of more than a few queries computes its scores sixteen keys at a time per query, each key's products in
 * a vector of its own, folded into one vector of sixteen sums by shuffles rather than a horizontal sum per key; a
 * smaller group (one new token per sequence over three query heads per key-value head) spends less per key with a
 * sum per query and key (bench/engine_kernels.md). The softmax runs along the keys and the weighted sum of the values
 * along the head's dimensions, a few queries at once, so every vector lane is in use whatever the group's size.
 * In bfloat16 the cache is read as it is stored, half the bytes of float32, and widened to float32 in registers;
 * the arithmetic is float32's, and each output is rounded to bfloat16 once.
 *
 * Built at start by specfleet/engine/native.py with the machine's own vector instructions;
 * `cpu_attention.choose_attention_kernels` times it against PyTorch's kernels and uses it only where it wins.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KEYS_PER_BLOCK 512 /* keys (and values) read together: 128 KiB of each at heads of 64, held in L2 */
#define LANES 16
#define SUMS_MAX_GROUP 4   /* groups of up to this many queries take a sum per query and key */

/* The folds need __builtin_shufflevector (GCC 12 and later, Clang); without it every group takes the sums. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FOLDS 1
#endif
#endif
#ifdef FOLDS
#define FOLDS_BUILT 1
#define SIXTEEN_SCORES(T, HEAD_DIM, ...) sixteen_scores_##T##_##HEAD_DIM(__VA_ARGS__)
#else
#define FOLDS_BUILT 0
#define SIXTEEN_SCORES(T, HEAD_DIM, ...)
#endif

/* Sixteen floats, loaded from and stored to any float's address. */
typedef float floats __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef uint16_t bf16; /* a bfloat16's bits: a float32's upper half */
typedef bf16 bf16s __attribute__((vector_size(LANES * sizeof(bf16)), aligned(2)));
typedef uint32_t words __attribute__((vector_size(LANES * sizeof(uint32_t))));

/* Sixteen consecutive elements as floats, and one element as a float, from either element type. */
static inline floats load_float(const float *p) { return *(const floats *)p; }
static inline floats load_bf16(const bf16 *p) { return (floats)(__builtin_convertvector(*(const bf16s *)p, words) << 16); }
static inline float float_of_float(float x) { return x; }
static inline float float_of_bf16(bf16 x) {
    const uint32_t bits = (uint32_t)x << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* n elements (a multiple of LANES) as floats: a bfloat16 block read by a large group is widened once, not once per
 * query. WIDENS(T, group): whether a group's blocks are widened first (and its scratch holds a widened block of
 * keys and one of values). */
#define WIDENS_float 0
#define WIDENS_bf16 1
#define WIDENS(T, group) (WIDENS_##T && (group) > SUMS_MAX_GROUP)
static inline void widen_float(const float *from, int n, float *to) { memcpy(to, from, sizeof(float) * n); }
static inline void widen_bf16(const bf16 *from, int n, float *to) {
    for (int i = 0; i < n; i += LANES) *(floats *)(to + i) = load_bf16(from + i);
}

/* A float32 stored as either element type: bfloat16 rounds to nearest, ties to even, as PyTorch does. */
static inline float float_from_float(float x) { return x; }
static inline bf16 bf16_from_float(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bf16)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

typedef struct {
    int kv_heads, heads_per_kv, width, kv_len;
    const void *q; /* [rows, heads, width, head_dim] of the element type, strides below, head_dim contiguous */
    int64_t q_row, q_head, q_token;
    const void *keys, *values; /* [rows, kv_heads, >= kv_len, head_dim], each head's entries contiguous */
    int64_t kv_row, kv_head;
    const float *bias; /* [rows, width, kv_len], float32 whatever the element type: 0 or -inf */
    int64_t bias_row, bias_token;
    void *out; /* like q */
    int64_t out_row, out_head, out_token;
    float scale;
} Work;

/* A worker's scratch for one pair, in float32: the group's queries (scaled), one block's scores (then weights) and
 * the weighted sums of values so far, per query; the running maximum and sum of weights per query, and the factor
 * the last block scaled the sums so far by. */
typedef struct {
    float *queries, *scores, *sums, *top, *sum, *rescale;
    float *keys, *values; /* one block of each, widened to float32 (bfloat16 caches, large groups; else NULL) */
} Scratch;

#ifdef FOLDS
/* The sums of sixteen vectors' lanes, one per lane, without a horizontal sum each: four levels of shuffles, each
 * adding the two halves of a pair of vectors, fold sixteen vectors into one. The sum of vector i ends in lane
 * BIT_REVERSED[i] (and BIT_REVERSED is its own inverse). */
static const int BIT_REVERSED[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline floats fold_halves(floats a, floats b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline floats fold_quarters(floats a, floats b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
static inline floats fold_pairs(floats a, floats b) {
    return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
static inline floats fold_lanes(floats a, floats b) {
    return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

static inline floats fold(const floats products[16]) {
    floats halves[8], quarters[4];
    for (int i = 0; i < 8; i++) halves[i] = fold_halves(products[2 * i], products[2 * i + 1]);
    for (int i = 0; i < 4; i++) quarters[i] = fold_quarters(halves[2 * i], halves[2 * i + 1]);
    return fold_lanes(fold_pairs(quarters[0], quarters[1]), fold_pairs(quarters[2], quarters[3]));
}

/* One query's scores against sixteen consecutive keys of element type T, plus the mask. */
#define DEFINE_SIXTEEN_SCORES(T, HEAD_DIM)                                                                       \
    static inline void sixteen_scores_##T##_##HEAD_DIM(const float *query, const T *keys, const float *bias,    \
                                                       float *scores) {                                          \
        floats q[HEAD_DIM / LANES], products[16];                                                                \
        for (int c = 0; c < HEAD_DIM / LANES; c++) q[c] = load_float(query + c * LANES);                         \
        _Pragma("GCC unroll 16") for (int k = 0; k < 16; k++) {                                                  \
            const T *key = keys + k * HEAD_DIM;                                                                  \
            floats sum = q[0] * load_##T(key);                                                                   \
            for (int c = 1; c < HEAD_DIM / LANES; c++) sum += q[c] * load_##T(key + c * LANES);                  \
            products[BIT_REVERSED[k]] = sum;                                                                     \
        }                                                                                                        \
        *(floats *)scores = fold(products) + load_float(bias);                                                   \
    }
#else
#define DEFINE_SIXTEEN_SCORES(T, HEAD_DIM)
#endif

/* One block's scores, plus the mask, for every query of the group: scores[i][k] for query i and key k. */
#define DEFINE_BLOCK_SCORES(T, HEAD_DIM)                                                                         \
    DEFINE_SIXTEEN_SCORES(T, HEAD_DIM)                                                                           \
    static void block_scores_##T##_##HEAD_DIM(const float *queries, int group, const T *keys, int count,        \
                                              const float *const *bias, float *scores) {                         \
        int k = 0;                                                                                               \
        if (FOLDS_BUILT && group > SUMS_MAX_GROUP)                                                               \
            for (; k + 16 <= count; k += 16)                                                                     \
                for (int i = 0; i < group; i++)                                                                  \
                    SIXTEEN_SCORES(T, HEAD_DIM, queries + i * HEAD_DIM, keys + k * HEAD_DIM, bias[i] + k,        \
                                   scores + i * KEYS_PER_BLOCK + k);                                             \
        for (; k < count; k++)                                                                                   \
            for (int i = 0; i < group; i++) {                                                                    \
                const float *query = queries + i * HEAD_DIM;                                                     \
                float dot = 0.f;                                                                                 \
                for (int d = 0; d < HEAD_DIM; d++) dot += query[d] * float_of_##T(keys[k * HEAD_DIM + d]);       \
                scores[i * KEYS_PER_BLOCK + k] = dot + bias[i][k];                                               \
            }                                                                                                    \
    }

/* sums[i] += the block's weights[i][k] times value k, for TILE queries at once: each value vector loaded once for
 * all of them, TILE x HEAD_DIM / LANES independent sums in registers. */
#define DEFINE_VALUES(T, HEAD_DIM, TILE)                                                                         \
    static inline void values_##T##_##HEAD_DIM##_##TILE(const float *weights, const T *values, int count,       \
                                                        float *sums) {                                           \
        floats total[TILE][HEAD_DIM / LANES];                                                                    \
        for (int i = 0; i < TILE; i++)                                                                           \
            for (int c = 0; c < HEAD_DIM / LANES; c++) total[i][c] = load_float(sums + i * HEAD_DIM + c * LANES); \
        for (int k = 0; k < count; k++) {                                                                        \
            floats value[HEAD_DIM / LANES];                                                                      \
            for (int c = 0; c < HEAD_DIM / LANES; c++) value[c] = load_##T(values + k * HEAD_DIM + c * LANES);  \
            for (int i = 0; i < TILE; i++) {                                                                     \
                const float weight = weights[i * KEYS_PER_BLOCK + k];                                            \
                for (int c = 0; c < HEAD_DIM / LANES; c++) total[i][c] += weight * value[c];                     \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < TILE; i++)                                                                           \
            for (int c = 0; c < HEAD_DIM / LANES; c++) *(floats *)(sums + i * HEAD_DIM + c * LANES) = total[i][c]; \
    }

/* The weighted sums of one block's values for every query of the group, TILE_MAX queries at a time. */
#define DEFINE_BLOCK_VALUES(T, HEAD_DIM, TILE_MAX)                                                               \
    DEFINE_VALUES(T, HEAD_DIM, 1) DEFINE_VALUES(T, HEAD_DIM, 2) DEFINE_VALUES(T, HEAD_DIM, 3)                    \
    DEFINE_VALUES(T, HEAD_DIM, 4) DEFINE_VALUES(T, HEAD_DIM, 5) DEFINE_VALUES(T, HEAD_DIM, 6)                    \
    static void block_values_##T##_##HEAD_DIM(const float *weights, int group, const T *values, int count,      \
                                              float *sums) {                                                     \
        for (int i = 0; i < group; i += TILE_MAX) {                                                              \
            const float *mine = weights + i * KEYS_PER_BLOCK;                                                    \
            switch (group - i < TILE_MAX ? group - i : TILE_MAX) {                                               \
            case 1: values_##T##_##HEAD_DIM##_1(mine, values, count, sums + i * HEAD_DIM); break;                \
            case 2: values_##T##_##HEAD_DIM##_2(mine, values, count, sums + i * HEAD_DIM); break;                \
            case 3: values_##T##_##HEAD_DIM##_3(mine, values, count, sums + i * HEAD_DIM); break;                \
            case 4: values_##T##_##HEAD_DIM##_4(mine, values, count, sums + i * HEAD_DIM); break;                \
            case 5: values_##T##_##HEAD_DIM##_5(mine, values, count, sums + i * HEAD_DIM); break;                \
            default: values_##T##_##HEAD_DIM##_6(mine, values, count, sums + i * HEAD_DIM);                     \
            }                                                                                                    \
        }                                                                                                        \
    }

/* Folds one query's block of scores into its running softmax: the new maximum, the factor by which the sums so far
 * shrink, and the block's weights relative to the new maximum in place of its scores. */
static inline void softmax_block(float *scores, int count, float *top, float *sum, float *rescale) {
    float fresh = *top;
    for (int k = 0; k < count; k++) fresh = scores[k] > fresh ? scores[k] : fresh;
    float total = 0.f;
    for (int k = 0; k < count; k++) {
        scores[k] = expf(scores[k] - fresh);
        total += scores[k];
    }
    *rescale = expf(*top - fresh);
    *sum = *sum * *rescale + total;
    *top = fresh;
}

/* Every query's block of scores into its running softmax, and the sums of values so far rescaled to match. */
static void softmax_group(const Scratch *s, int group, int count, int head_dim) {
    for (int i = 0; i < group; i++) {
        softmax_block(s->scores + i * KEYS_PER_BLOCK, count, s->top + i, s->sum + i, s->rescale + i);
        if (s->rescale[i] != 1.f)
            for (int d = 0; d < head_dim; d++) s->sums[i * head_dim + d] *= s->rescale[i];
    }
}

/* One (sequence, key-value head) pair whose queries, keys, values and output are of element type T. Query i of its
 * group is query head i / width of the group, new token i % width. */
#define DEFINE_PAIR(T, HEAD_DIM)                                                                                 \
    static void attend_pair_##T##_##HEAD_DIM(const Work *w, const Scratch *s, int pair) {                        \
        const int row = pair / w->kv_heads, kv_head = pair % w->kv_heads, group = w->heads_per_kv * w->width;   \
        const T *keys = (const T *)w->keys + row * w->kv_row + kv_head * w->kv_head;                             \
        const T *values = (const T *)w->values + row * w->kv_row + kv_head * w->kv_head;                         \
        const int widens = WIDENS(T, group);                                                                     \
        const float *bias[group], *block_bias[group];                                                            \
        T *out[group];                                                                                           \
        for (int i = 0; i < group; i++) {                                                                        \
            const int head = kv_head * w->heads_per_kv + i / w->width, token = i % w->width;                     \
            const T *query = (const T *)w->q + row * w->q_row + head * w->q_head + token * w->q_token;           \
            for (int d = 0; d < HEAD_DIM; d++) s->queries[i * HEAD_DIM + d] = float_of_##T(query[d]) * w->scale; \
            bias[i] = w->bias + row * w->bias_row + token * w->bias_token;                                       \
            out[i] = (T *)w->out + row * w->out_row + head * w->out_head + token * w->out_token;                 \
            s->top[i] = -FLT_MAX, s->sum[i] = 0.f;                                                               \
        }                                                                                                        \
        memset(s->sums, 0, sizeof(float) * group * HEAD_DIM);                                                    \
        for (int start = 0; start < w->kv_len; start += KEYS_PER_BLOCK) {                                        \
            const int count = start + KEYS_PER_BLOCK < w->kv_len ? KEYS_PER_BLOCK : w->kv_len - start;          \
            const T *block_keys = keys + (int64_t)start * HEAD_DIM, *block_values = values + (int64_t)start * HEAD_DIM; \
            for (int i = 0; i < group; i++) block_bias[i] = bias[i] + start;                                     \
            if (widens) {                                                                                        \
                widen_##T(block_keys, count * HEAD_DIM, s->keys);                                                \
                widen_##T(block_values, count * HEAD_DIM, s->values);                                            \
                block_scores_float_##HEAD_DIM(s->queries, group, s->keys, count, block_bias, s->scores);         \
                softmax_group(s, group, count, HEAD_DIM);                                                        \
                block_values_float_##HEAD_DIM(s->scores, group, s->values, count, s->sums);                      \
            } else {                                                                                             \
                block_scores_##T##_##HEAD_DIM(s->queries, group, block_keys, count, block_bias, s->scores);      \
                softmax_group(s, group, count, HEAD_DIM);                                                        \
                block_values_##T##_##HEAD_DIM(s->scores, group, block_values, count, s->sums);                   \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < group; i++) {                                                                        \
            const float inverse = 1.f / s->sum[i];                                                               \
            for (int d = 0; d < HEAD_DIM; d++) out[i][d] = T##_from_float(s->sums[i * HEAD_DIM + d] * inverse);  \
        }                                                                                                        \
    }

/* Heads of 64 take six queries at a time for the values (24 sums in registers), heads of 128 two (16). */
#define DEFINE_KERNELS(T)                                                                                        \
    DEFINE_BLOCK_SCORES(T, 64) DEFINE_BLOCK_VALUES(T, 64, 6) DEFINE_PAIR(T, 64)                                  \
    DEFINE_BLOCK_SCORES(T, 128) DEFINE_BLOCK_VALUES(T, 128, 2) DEFINE_PAIR(T, 128)

DEFINE_KERNELS(float)
DEFINE_KERNELS(bf16)

typedef void (*PairKernel)(const Work *, const Scratch *, int);

/* Shares the pairs among `workers` threads of the OpenMP runtime PyTorch itself loaded (the same libgomp, found by
 * its name), so the threads that just ran PyTorch's operators, still spinning, take them at once: threads of our
 * own would wait for a core. */
static int attend(const Work *work, int rows, int head_dim, int workers, PairKernel kernel, int widens) {
    const int pairs = rows * work->kv_heads, group = work->heads_per_kv * work->width;
    if (workers > pairs) workers = pairs;
    if (workers < 1) workers = 1;
    const size_t per_group = (size_t)group * (2 * head_dim + KEYS_PER_BLOCK + 3);
    const size_t per_worker = per_group + (widens ? 2 * (size_t)KEYS_PER_BLOCK * head_dim : 0);
    float *scratch = malloc(sizeof(float) * per_worker * workers);
    if (scratch == NULL) return -2;
#pragma omp parallel num_threads(workers)
    {
        const int worker = omp_get_thread_num(), count = omp_get_num_threads();
        float *mine = scratch + per_worker * worker;
        const Scratch s = {mine, mine + group * head_dim, mine + group * (head_dim + KEYS_PER_BLOCK),
                           mine + group * (2 * head_dim + KEYS_PER_BLOCK),
                           mine + group * (2 * head_dim + KEYS_PER_BLOCK + 1),
                           mine + group * (2 * head_dim + KEYS_PER_BLOCK + 2), widens ? mine + per_group : NULL,
                           widens ? mine + per_group + KEYS_PER_BLOCK * head_dim : NULL};
        for (int pair = pairs * worker / count; pair < pairs * (worker + 1) / count; pair++) kernel(work, &s, pair);
    }
    free(scratch);
    return 0;
}

/* Both return 0, -1 for a head size this file has no kernel for, -2 when out of memory. Strides are in elements. */
#define DEFINE_ENTRY(T, NAME)                                                                                    \
    int specfleet_attend_##NAME(int rows, int kv_heads, int heads_per_kv, int width, int kv_len, int head_dim,  \
                                const T *q, int64_t q_row, int64_t q_head, int64_t q_token, const T *keys,       \
                                const T *values, int64_t kv_row, int64_t kv_head, const float *bias,             \
                                int64_t bias_row, int64_t bias_token, T *out, int64_t out_row, int64_t out_head, \
                                int64_t out_token, float scale, int workers) {                                   \
        const Work work = {kv_heads, heads_per_kv, width, kv_len, q, q_row, q_head, q_token, keys, values,       \
                           kv_row, kv_head, bias, bias_row, bias_token, out, out_row, out_head, out_token, scale};\
        const int widens = WIDENS(T, heads_per_kv * width);                                                      \
        if (head_dim == 64) return attend(&work, rows, head_dim, workers, attend_pair_##T##_64, widens);         \
        if (head_dim == 128) return attend(&work, rows, head_dim, workers, attend_pair_##T##_128, widens);       \
        return -1;                                                                                               \
    }

DEFINE_ENTRY(float, f32)
DEFINE_ENTRY(bf16, bf16)
