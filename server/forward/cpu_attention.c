/* Decode attention on the CPU in float32: the two products of step.py's explicit attention, as passes over the
   KV cache (see cpu_attention.py).

   A decode step attends one new token per sequence s, with G query heads per KV head h, to the first len[s]
   keys of its cache slot (the last `window` of them when window > 0). For each (s, h) the scores pass reads
   the slot's keys once for all G heads, and the values pass reads its values once; torch's softmax runs in
   between. torch's batched matmuls at these shapes (G x d by d x L, 192 of them a layer) read the cache at
   about 10 GB/s. Each (s, h) is computed alone, in a fixed order, so a sequence's result does not depend on
   the rest of the batch. Where d is a multiple of 16, a dot product is summed in a vector of 16 partial sums
   (GCC's vector extension) and reduced once: a reduction per element cost a third of the pass.

   q:      [n, KV, G, d] contiguous
   k, v:   slot s, head h, key j at k + s * slot_stride + h * head_stride + j * d (the cache's layout)
   scores, probs: [n, KV, G, L] contiguous; o: [n, KV, G, d] contiguous */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(16 * sizeof(float))));
static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

static inline int64_t first_key(int64_t len, int64_t window) { return window > 0 && len > window ? len - window : 0; }

/* scores[s, h, g, j] = scale * q[s, h, g] . k[s, h, j] for the visible j < L, -inf for the others */
void decode_scores(const float *restrict q, const float *restrict k, int64_t slot_stride, int64_t head_stride,
                   const int32_t *restrict lens, int64_t n, int64_t kv_heads, int64_t groups, int64_t d, int64_t L,
                   int64_t window, float scale, float *restrict scores) {
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n * kv_heads; p++) {
        int64_t s = p / kv_heads, h = p % kv_heads;
        int64_t len = lens[s], lo = first_key(len, window);
        const float *keys = k + s * slot_stride + h * head_stride;
        const float *qp = q + p * groups * d;
        float *sp = scores + p * groups * L;
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t j = 0; j < lo; j++) sp[g * L + j] = -INFINITY;
            for (int64_t j = len; j < L; j++) sp[g * L + j] = -INFINITY;
        }
        if (d % 16 == 0) {
            for (int64_t j = lo; j < len; j++) {
                const float *kj = keys + j * d;
                for (int64_t g = 0; g < groups; g++) {
                    const float *qg = qp + g * d;
                    v16 acc = load16(qg) * load16(kj);
                    for (int64_t e = 16; e < d; e += 16) acc += load16(qg + e) * load16(kj + e);
                    float sum = 0.f;
                    for (int e = 0; e < 16; e++) sum += acc[e];
                    sp[g * L + j] = sum * scale;
                }
            }
            continue;
        }
        for (int64_t j = lo; j < len; j++) {
            const float *kj = keys + j * d;
            for (int64_t g = 0; g < groups; g++) {
                const float *qg = qp + g * d;
                float acc = 0.f;
                #pragma omp simd reduction(+:acc)
                for (int64_t e = 0; e < d; e++) acc += qg[e] * kj[e];
                sp[g * L + j] = acc * scale;
            }
        }
    }
}

/* o[s, h, g] = sum over the visible j of probs[s, h, g, j] * v[s, h, j] */
void decode_values(const float *restrict probs, const float *restrict v, int64_t slot_stride, int64_t head_stride,
                   const int32_t *restrict lens, int64_t n, int64_t kv_heads, int64_t groups, int64_t d, int64_t L,
                   int64_t window, float *restrict o) {
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n * kv_heads; p++) {
        int64_t s = p / kv_heads, h = p % kv_heads;
        int64_t len = lens[s], lo = first_key(len, window);
        const float *values = v + s * slot_stride + h * head_stride;
        const float *pp = probs + p * groups * L;
        float *op = o + p * groups * d;
        for (int64_t e = 0; e < groups * d; e++) op[e] = 0.f;
        for (int64_t j = lo; j < len; j++) {
            const float *vj = values + j * d;
            for (int64_t g = 0; g < groups; g++) {
                float pj = pp[g * L + j];
                float *og = op + g * d;
                for (int64_t e = 0; e < d; e++) og[e] += pj * vj[e];
            }
        }
    }
}
