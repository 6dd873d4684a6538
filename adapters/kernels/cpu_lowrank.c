/* Grouped low-rank deltas on the CPU, the counterpart of triton_bgmv.py (see cpu.py).

   For every group g, with its rows r in rows[offsets[g] .. offsets[g + 1]) and its pool slot s = slots[g]:
       out[r] += (x[r] · Aᵀ[s]) · Bᵀ[s]
   At: [P, d_in, R] and Bt: [P, R, d_out], contiguous float32 (the factor pool's storage, factor_pool.py).
   One call serves every group of a module: no padded copy of the rows, no gather of the factors. Groups are
   spread over the OpenMP threads of the caller (torch's pool).

   In a multi-adapter decode step a group has a few rows, and the cost is reading its factors from memory
   (32 rank-16 adapters on a 135M model: 625 MB a step). So the rows of a group go through in tiles of up to
   MAX_TILE, each tile reading the factors once with its partial sums in registers: x · Aᵀ a RANK_CHUNK of the
   rank at a time, then u · Bᵀ an OUT_CHUNK of the outputs at a time, each output written once. A row's
   arithmetic is the same in every tile size, so its result does not depend on the rest of the batch.
   x · Aᵀ keeps its partial sums in vectors of GCC's vector extension (Clang has it too): written as arrays,
   they were kept on the stack, a load and a store around every multiply-add, and that half ran 1.4-1.8x
   slower (BENCHMARKS.md). */
#include <stdint.h>
#include <string.h>

#define MAX_RANK 256
#define MAX_TILE 4
#define RANK_CHUNK 16
#define OUT_CHUNK 32

int lowrank_max_rank(void) { return MAX_RANK; }

typedef float v16 __attribute__((vector_size(RANK_CHUNK * sizeof(float))));
static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

/* out[r[i]] += (x[r[i]] · A) · B for the T rows r[0 .. T) of one group; A: [d_in, rank], B: [rank, d_out].
   Inlined with T constant, so the tile's partial sums live in registers. */
static inline __attribute__((always_inline)) void
tile(const int T, const float *restrict x, int64_t x_stride, float *restrict out, int64_t out_stride,
     const int32_t *restrict r, const float *restrict a, const float *restrict b, int64_t rank, int64_t d_in,
     int64_t d_out) {
    float u[MAX_TILE][MAX_RANK];  /* [T, rank]: x · A */
    const float *xr[MAX_TILE];
    for (int i = 0; i < T; i++) xr[i] = x + (int64_t)r[i] * x_stride;
    for (int64_t c = 0; c < rank; c += RANK_CHUNK) {
        int64_t w = rank - c < RANK_CHUNK ? rank - c : RANK_CHUNK;
        if (w == RANK_CHUNK) {  /* one vector of RANK_CHUNK partial sums per row, kept in a register */
            v16 acc[MAX_TILE];
            for (int i = 0; i < T; i++) acc[i] = (v16){0};
            for (int64_t k = 0; k < d_in; k++) {
                v16 ak = load16(a + k * rank + c);
                for (int i = 0; i < T; i++) acc[i] += xr[i][k] * ak;
            }
            for (int i = 0; i < T; i++) memcpy(&u[i][c], &acc[i], sizeof acc[i]);
            continue;
        }
        float acc[MAX_TILE][RANK_CHUNK];  /* [T, w]: u[:, c .. c + w) */
        memset(acc, 0, sizeof acc);
        for (int64_t k = 0; k < d_in; k++)
            for (int i = 0; i < T; i++)
                for (int j = 0; j < w; j++) acc[i][j] += xr[i][k] * a[k * rank + c + j];
        for (int i = 0; i < T; i++) memcpy(&u[i][c], acc[i], sizeof(float) * (size_t)w);
    }
    int64_t d = 0;
    for (; d + OUT_CHUNK <= d_out; d += OUT_CHUNK) {
        float acc[MAX_TILE][OUT_CHUNK];  /* [T, OUT_CHUNK]: (u · B)[:, d .. d + OUT_CHUNK) */
        memset(acc, 0, sizeof acc);
        for (int64_t j = 0; j < rank; j++) {
            const float *bj = b + j * d_out + d;
            for (int i = 0; i < T; i++) {
                float s = u[i][j];
                for (int e = 0; e < OUT_CHUNK; e++) acc[i][e] += s * bj[e];
            }
        }
        for (int i = 0; i < T; i++) {
            float *o = out + (int64_t)r[i] * out_stride + d;
            for (int e = 0; e < OUT_CHUNK; e++) o[e] += acc[i][e];
        }
    }
    for (; d < d_out; d++)  /* the last d_out % OUT_CHUNK outputs */
        for (int i = 0; i < T; i++) {
            float s = 0;
            for (int64_t j = 0; j < rank; j++) s += u[i][j] * b[j * d_out + d];
            out[(int64_t)r[i] * out_stride + d] += s;
        }
}

void lowrank_delta(const float *restrict x, int64_t x_stride, float *restrict out, int64_t out_stride,
                   const float *restrict at, const float *restrict bt, int64_t rank, int64_t d_in, int64_t d_out,
                   int64_t n_groups, const int32_t *restrict slots, const int32_t *restrict offsets,
                   const int32_t *restrict rows) {
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t g = 0; g < n_groups; g++) {
        const float *a = at + (int64_t)slots[g] * d_in * rank;
        const float *b = bt + (int64_t)slots[g] * rank * d_out;
        for (int32_t i = offsets[g]; i < offsets[g + 1];) {
            int32_t left = offsets[g + 1] - i;
            if (left >= 4) {
                tile(4, x, x_stride, out, out_stride, rows + i, a, b, rank, d_in, d_out);
                i += 4;
            } else if (left >= 2) {
                tile(2, x, x_stride, out, out_stride, rows + i, a, b, rank, d_in, d_out);
                i += 2;
            } else {
                tile(1, x, x_stride, out, out_stride, rows + i, a, b, rank, d_in, d_out);
                i += 1;
            }
        }
    }
}
