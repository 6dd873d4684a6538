/* Grouped low-rank deltas on the CPU, the counterpart of triton_bgmv.py (see cpu.py).

   For every group g, with its rows r in rows[offsets[g] .. offsets[g + 1]) and its pool slot s = slots[g]:
       out[r] += (x[r] · Aᵀ[s]) · Bᵀ[s]
   At: [P, d_in, R] and Bt: [P, R, d_out], contiguous float32 (the factor pool's storage, factor_pool.py).
   One call serves every group of a module: no padded copy of the rows, no gather of the factors. Each group's
   factors are read once for all its rows (up to MAX_ROWS at a time), so a step reads every adapter's factors
   once, as the batched matmuls do. Groups are spread over the OpenMP threads of the caller (torch's pool). */
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 16
#define MAX_RANK 256

int lowrank_max_rank(void) { return MAX_RANK; }

void lowrank_delta(const float *restrict x, int64_t x_stride, float *restrict out, int64_t out_stride,
                   const float *restrict at, const float *restrict bt, int64_t rank, int64_t d_in, int64_t d_out,
                   int64_t n_groups, const int32_t *restrict slots, const int32_t *restrict offsets,
                   const int32_t *restrict rows) {
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t g = 0; g < n_groups; g++) {
        const float *a = at + (int64_t)slots[g] * d_in * rank;
        const float *b = bt + (int64_t)slots[g] * rank * d_out;
        for (int32_t first = offsets[g]; first < offsets[g + 1]; first += MAX_ROWS) {
            int32_t m = offsets[g + 1] - first < MAX_ROWS ? offsets[g + 1] - first : MAX_ROWS;
            const int32_t *r = rows + first;
            float u[MAX_ROWS * MAX_RANK];  /* [m, rank]: x · Aᵀ of these rows */
            memset(u, 0, sizeof(float) * (size_t)(m * rank));
            for (int64_t k = 0; k < d_in; k++) {
                const float *ak = a + k * rank;
                for (int32_t i = 0; i < m; i++) {
                    float xv = x[(int64_t)r[i] * x_stride + k];
                    float *ui = u + i * rank;
                    for (int64_t j = 0; j < rank; j++) ui[j] += xv * ak[j];
                }
            }
            for (int32_t i = 0; i < m; i++) {
                float *o = out + (int64_t)r[i] * out_stride;
                const float *ui = u + i * rank;
                for (int64_t j = 0; j < rank; j++) {
                    const float *bj = b + j * d_out;
                    float s = ui[j];
                    for (int64_t d = 0; d < d_out; d++) o[d] += s * bj[d];
                }
            }
        }
    }
}
