/* Row-invariant float32 linear layer for decoding on CPU: y[j, o] = sum_i x[j, i] * w[o, i] (+ b[o]).
 *
 * Every output element is computed by the same C expression whatever the number of rows k, the
 * thread that runs it or the other rows: four 16-lane partial sums over the input in steps of
 * 64, a sequential tail, and a fixed summation tree. The file is compiled without floating-point
 * contraction or reassociation (-ffp-contract=off, no -ffast-math) and the multiply-adds are
 * explicit fmaf calls, so the compiler must keep exactly that order; vectorising across the 16
 * lanes does not change it. So a row's result is
 * bit-identical in a 1-row step and in a verification of any size: the guarantee speculative
 * decoding needs for its output not to depend on gamma.
 *
 * Speed: each weight row is read from memory once and used for all k input rows (which stay in
 * the L1/L2 cache), so a k-row product costs about what a 1-row product costs while memory-bound.
 * Threads split the output features (OpenMP, the runtime torch already loaded).
 */
#include <stddef.h>
#include <stdint.h>

#define LANES 16
#define CHAINS 4
#define STEP (CHAINS * LANES)

/* The dot products of one weight row with C input rows (C = 1, 2 or 4: inlined with a constant).
 * For every input row the arithmetic is the same whatever C is: CHAINS x LANES partial sums
 * a[q][l] = fma(w[i + q*LANES + l], x[i + q*LANES + l], a[q][l]) over i in steps of STEP (fmaf is
 * one rounding by definition, so the compiler may not split or merge it), then a sequential tail
 * and a fixed tree. Processing C rows together only shares the loads of w. */
static inline __attribute__((always_inline)) void dots(const float *restrict w, const float *const *xs, int C,
                                                       int64_t n, float *res) {
    float a[4][CHAINS][LANES];
    for (int c = 0; c < C; ++c)
        for (int q = 0; q < CHAINS; ++q)
            for (int l = 0; l < LANES; ++l) a[c][q][l] = 0.0f;
    int64_t i = 0;
    for (; i + STEP <= n; i += STEP)
        for (int c = 0; c < C; ++c)
            for (int q = 0; q < CHAINS; ++q)
                for (int l = 0; l < LANES; ++l)
                    a[c][q][l] = __builtin_fmaf(w[i + q * LANES + l], xs[c][i + q * LANES + l], a[c][q][l]);
    for (int c = 0; c < C; ++c) {
        float tail = 0.0f;
        for (int64_t t = i; t < n; ++t) tail = __builtin_fmaf(w[t], xs[c][t], tail);
        float s[LANES];
        for (int l = 0; l < LANES; ++l) s[l] = (a[c][0][l] + a[c][1][l]) + (a[c][2][l] + a[c][3][l]);
        for (int h = LANES / 2; h > 0; h /= 2)
            for (int l = 0; l < h; ++l) s[l] += s[l + h];
        res[c] = s[0] + tail;
    }
}

/* x: [k, n] row-major; w: [out, n] row-major; b: [out] or NULL; y: [k, out] row-major. */
void speckv_rowdot_linear(const float *x, int64_t k, int64_t n, const float *w, int64_t out, const float *b,
                          float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
        const float *wr = w + o * n;
        float res[4];
        int64_t j = 0;
        for (; j + 4 <= k; j += 4) {
            const float *xs[4] = {x + j * n, x + (j + 1) * n, x + (j + 2) * n, x + (j + 3) * n};
            dots(wr, xs, 4, n, res);
            for (int c = 0; c < 4; ++c) y[(j + c) * out + o] = b ? res[c] + b[o] : res[c];
        }
        for (; j + 2 <= k; j += 2) {
            const float *xs[2] = {x + j * n, x + (j + 1) * n};
            dots(wr, xs, 2, n, res);
            for (int c = 0; c < 2; ++c) y[(j + c) * out + o] = b ? res[c] + b[o] : res[c];
        }
        for (; j < k; ++j) {
            const float *xs[1] = {x + j * n};
            dots(wr, xs, 1, n, res);
            y[j * out + o] = b ? res[0] + b[o] : res[0];
        }
    }
}

int speckv_rowdot_version(void) { return 1; }
