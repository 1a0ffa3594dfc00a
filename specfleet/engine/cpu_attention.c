/* Attention of a few new tokens per sequence over a long KV cache, on CPU, in float32.
 *
 * Verification and decoding read the whole cache for a handful of queries, so the cost is reading keys and
 * values, not arithmetic. BLAS matmuls with a handful of rows run far below what the memory allows on some CPUs
 * (bench/engine_kernels.md). Here each worker takes whole (sequence, key-value head) pairs: it reads each block of
 * keys once into L1 for all the query heads of its group (GQA) and all the new tokens, keeps the scores of the pair
 * in its own buffer, then reads each block of values once. Built at start by specfleet/engine/native.py with the
 * machine's own vector instructions; `cpu_attention.choose_attention_kernels` times it against PyTorch's kernels
 * and uses it only where it wins.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define KEYS_PER_BLOCK 64 /* keys (or values) read together: 16 KiB at 64 float32 per head */

typedef struct {
    int kv_heads, heads_per_kv, width, kv_len;
    const float *q; /* [rows, heads, width, head_dim], strides below, head_dim contiguous */
    int64_t q_row, q_head, q_token;
    const float *keys, *values; /* [rows, kv_heads, >= kv_len, head_dim], each head's entries contiguous */
    int64_t kv_row, kv_head;
    const float *bias; /* [rows, width, kv_len] added to the scores: 0 or -inf */
    int64_t bias_row, bias_token;
    float *out; /* like q */
    int64_t out_row, out_head, out_token;
    float scale;
    float *scores; /* this worker's [heads_per_kv * width, kv_len] */
} Work;

/* A tile of TILE queries of one (sequence, key-value head) pair against its entries start..stop: scores (each key
 * loaded once for the tile), then the weighted sum of the values (each value loaded once for the tile, and TILE
 * independent sums in vector registers, so one sum's additions need not wait on each other). HEAD_DIM is known at
 * compile time, so that a query's or a sum's floats stay in registers. */
#define DEFINE_TILE(HEAD_DIM, TILE)                                                                              \
    static void scores_##HEAD_DIM##_##TILE(const float *const *q, float scale, const float *keys, int start,     \
                                           int stop, const float *const *bias, float *const *scores) {           \
        float query[TILE][HEAD_DIM];                                                                             \
        for (int t = 0; t < TILE; t++)                                                                           \
            for (int d = 0; d < HEAD_DIM; d++) query[t][d] = q[t][d] * scale;                                    \
        for (int j = start; j < stop; j++) {                                                                     \
            const float *key = keys + (int64_t)j * HEAD_DIM;                                                     \
            for (int t = 0; t < TILE; t++) {                                                                     \
                float dot = 0.f;                                                                                 \
                for (int d = 0; d < HEAD_DIM; d++) dot += query[t][d] * key[d];                                  \
                scores[t][j] = dot + bias[t][j];                                                                 \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    static void values_##HEAD_DIM##_##TILE(const float *const *weights, const float *values, int start, int stop,\
                                           float *const *out) {                                                  \
        float sum[TILE][HEAD_DIM];                                                                               \
        for (int t = 0; t < TILE; t++)                                                                           \
            for (int d = 0; d < HEAD_DIM; d++) sum[t][d] = out[t][d];                                            \
        for (int j = start; j < stop; j++) {                                                                     \
            const float *value = values + (int64_t)j * HEAD_DIM;                                                 \
            for (int t = 0; t < TILE; t++) {                                                                     \
                const float weight = weights[t][j];                                                              \
                for (int d = 0; d < HEAD_DIM; d++) sum[t][d] += weight * value[d];                               \
            }                                                                                                    \
        }                                                                                                        \
        for (int t = 0; t < TILE; t++)                                                                           \
            for (int d = 0; d < HEAD_DIM; d++) out[t][d] = sum[t][d];                                            \
    }

#define TILE_MAX 4 /* 16 of the 32 vector registers hold the sums at heads of 64 */
#define DEFINE_TILES(HEAD_DIM) \
    DEFINE_TILE(HEAD_DIM, 1) DEFINE_TILE(HEAD_DIM, 2) DEFINE_TILE(HEAD_DIM, 3) DEFINE_TILE(HEAD_DIM, 4)

/* One (sequence, key-value head) pair: query i of its group is query head i / width of the group, new token
 * i % width. The scores of all its queries, then their softmax, then the values, each pass block by block. */
#define DEFINE_PAIR(HEAD_DIM)                                                                                    \
    DEFINE_TILES(HEAD_DIM)                                                                                       \
    static void attend_pair_##HEAD_DIM(const Work *w, int pair) {                                                \
        const int row = pair / w->kv_heads, kv_head = pair % w->kv_heads;                                        \
        const int group = w->heads_per_kv * w->width, n = w->kv_len;                                             \
        const float *keys = w->keys + row * w->kv_row + kv_head * w->kv_head;                                    \
        const float *values = w->values + row * w->kv_row + kv_head * w->kv_head;                                \
        const float *q[group], *bias[group];                                                                     \
        float *out[group], *scores[group];                                                                       \
        for (int i = 0; i < group; i++) {                                                                        \
            const int head = kv_head * w->heads_per_kv + i / w->width, token = i % w->width;                     \
            q[i] = w->q + row * w->q_row + head * w->q_head + token * w->q_token;                                \
            out[i] = w->out + row * w->out_row + head * w->out_head + token * w->out_token;                      \
            bias[i] = w->bias + row * w->bias_row + token * w->bias_token;                                       \
            scores[i] = w->scores + (int64_t)i * n;                                                              \
        }                                                                                                        \
        for (int start = 0; start < n; start += KEYS_PER_BLOCK) {                                                \
            const int stop = start + KEYS_PER_BLOCK < n ? start + KEYS_PER_BLOCK : n;                            \
            for (int i = 0; i < group; i += TILE_MAX) {                                                          \
                switch (group - i < TILE_MAX ? group - i : TILE_MAX) {                                           \
                case 1: scores_##HEAD_DIM##_1(q + i, w->scale, keys, start, stop, bias + i, scores + i); break;  \
                case 2: scores_##HEAD_DIM##_2(q + i, w->scale, keys, start, stop, bias + i, scores + i); break;  \
                case 3: scores_##HEAD_DIM##_3(q + i, w->scale, keys, start, stop, bias + i, scores + i); break;  \
                default: scores_##HEAD_DIM##_4(q + i, w->scale, keys, start, stop, bias + i, scores + i);        \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < group; i++) {                                                                        \
            float *row_scores = scores[i], top = -FLT_MAX, total = 0.f;                                          \
            for (int j = 0; j < n; j++) top = row_scores[j] > top ? row_scores[j] : top;                         \
            for (int j = 0; j < n; j++) {                                                                        \
                row_scores[j] = expf(row_scores[j] - top);                                                       \
                total += row_scores[j];                                                                          \
            }                                                                                                    \
            const float inverse = 1.f / total;                                                                   \
            for (int j = 0; j < n; j++) row_scores[j] *= inverse;                                                \
            for (int d = 0; d < HEAD_DIM; d++) out[i][d] = 0.f;                                                  \
        }                                                                                                        \
        for (int start = 0; start < n; start += KEYS_PER_BLOCK) {                                                \
            const int stop = start + KEYS_PER_BLOCK < n ? start + KEYS_PER_BLOCK : n;                            \
            for (int i = 0; i < group; i += TILE_MAX) {                                                          \
                const float *const *weights = (const float *const *)(scores + i);                                \
                switch (group - i < TILE_MAX ? group - i : TILE_MAX) {                                           \
                case 1: values_##HEAD_DIM##_1(weights, values, start, stop, out + i); break;                     \
                case 2: values_##HEAD_DIM##_2(weights, values, start, stop, out + i); break;                     \
                case 3: values_##HEAD_DIM##_3(weights, values, start, stop, out + i); break;                     \
                default: values_##HEAD_DIM##_4(weights, values, start, stop, out + i);                           \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

DEFINE_PAIR(64)
DEFINE_PAIR(128)

/* Returns 0, or -1 for a head size this file has no kernel for. ``scores`` holds ``workers`` buffers of
 * heads_per_kv * width * kv_len floats. Strides are in floats. The pairs are shared among ``workers`` threads of
 * the OpenMP runtime PyTorch itself loaded (the same libgomp, found by its name), so the threads that just ran
 * PyTorch's operators, still spinning, take them at once: threads of our own would wait for a core. */
int specfleet_attend_f32(int rows, int kv_heads, int heads_per_kv, int width, int kv_len, int head_dim,
                         const float *q, int64_t q_row, int64_t q_head, int64_t q_token,
                         const float *keys, const float *values, int64_t kv_row, int64_t kv_head,
                         const float *bias, int64_t bias_row, int64_t bias_token,
                         float *out, int64_t out_row, int64_t out_head, int64_t out_token,
                         float scale, int workers, float *scores) {
    if (head_dim != 64 && head_dim != 128) return -1;
    const int pairs = rows * kv_heads;
    if (workers > pairs) workers = pairs;
    if (workers < 1) workers = 1;
#pragma omp parallel num_threads(workers)
    {
        const int worker = omp_get_thread_num(), count = omp_get_num_threads();
        Work work = {kv_heads, heads_per_kv, width, kv_len, q, q_row, q_head, q_token, keys, values, kv_row,
                     kv_head, bias, bias_row, bias_token, out, out_row, out_head, out_token, scale,
                     scores + (int64_t)worker * heads_per_kv * width * kv_len};
        for (int pair = pairs * worker / count; pair < pairs * (worker + 1) / count; pair++) {
            if (head_dim == 64)
                attend_pair_64(&work, pair);
            else
                attend_pair_128(&work, pair);
        }
    }
    return 0;
}
