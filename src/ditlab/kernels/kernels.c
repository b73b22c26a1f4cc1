/* ditlab's CPU kernels (ditlab.kernels compiles this file on the machine that runs it).

   Each is one pass over memory where torch takes several, for float32 tensors in DiT's blocks:
   GELU in its tanh form (with the bias before it), adaLN's modulated LayerNorm, and the gated
   residual add (with the bias of the product before it). Rows are split
   over the threads with OpenMP; the inner loops are plain arithmetic the compiler vectorises.
   Last, on CPUs with AVX-512, multi-head self-attention read straight from the fused qkv
   projection's output, with matrix products of its own (at the end of this file). */

/* GELU, tanh form:

   gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)

   is computed as x * s with s = 1 / (1 + 2^t), t = -2 log2(e) u: the same function, since
   0.5 (1 + tanh(u)) is the logistic sigmoid of 2u. 2^t is split into 2^n 2^f with n the integer
   nearest t and f in [-0.5, 0.5]; 2^f is a degree-6 polynomial (coefficients fitted to 2^f on
   Chebyshev nodes, relative error 2e-9 before float rounding) and 2^n goes into the exponent
   bits. torch's own kernel calls a vectorised tanh that took 3-5x as long here (BENCHMARKS.md).
   NaN stays NaN. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define SQRT_2_OVER_PI 0.7978845608028654f
#define KAPPA 0.044715f
#define LOG2E 1.4426950408889634f
#define CHUNK 4096 /* elements per piece of work: 16 KB, so a piece stays in L1 */

static const float EXP2_POLY[7] = {1.000000001e+00f, 6.931472056e-01f, 2.402264661e-01f, 5.550328998e-02f,
                           9.618519534e-03f, 1.339986036e-03f, 1.533757697e-04f};

/* 2^t for t in [-125, 125], which the caller guarantees. */
static inline float exp2_clamped(float t) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds t to an integer */
    float r = t + shifter;
    float f = t - (r - shifter);
    float p = EXP2_POLY[6];
    p = p * f + EXP2_POLY[5];
    p = p * f + EXP2_POLY[4];
    p = p * f + EXP2_POLY[3];
    p = p * f + EXP2_POLY[2];
    p = p * f + EXP2_POLY[1];
    p = p * f + EXP2_POLY[0];
    int32_t rb, pb;
    memcpy(&rb, &r, 4);
    memcpy(&pb, &p, 4);
    pb += (rb - 0x4B400000) << 23; /* the low bits of r hold n: add it to p's exponent */
    memcpy(&p, &pb, 4);
    return p;
}

/* 2^t with t = -2 log2(e) u(x), clamped where the sigmoid is 0 or 1 to float precision. */
static inline float two_to_t(float x) {
    float t = (-2.0f * LOG2E * SQRT_2_OVER_PI) * x * (1.0f + KAPPA * x * x);
    t = t < -125.0f ? -125.0f : (t > 125.0f ? 125.0f : t);
    return exp2_clamped(t);
}

static inline float gelu(float x) { return x / (1.0f + two_to_t(x)); }

/* d gelu / dx = s + x s (1 - s) d(2u)/dx, with 1 - s computed as p s, which does not cancel where s
   is near 1. */
static inline float gelu_grad(float x) {
    float p = two_to_t(x), s = 1.0f / (1.0f + p);
    float one_minus_s = p * s; /* in [0, 1]: p alone can be near 2^125 */
    float du = (2.0f * SQRT_2_OVER_PI) * (1.0f + 3.0f * KAPPA * x * x);
    return s + x * one_minus_s * s * du;
}

/* A linear layer's bias and GELU after its product (DiT's first MLP layer): over rows of H values,
   a += bias in place (a holds the product; the sum is what the backward needs), y = gelu(a). */
void ditlab_bias_gelu_forward(float *a, const float *bias, float *y, int64_t R, int64_t H, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        float *ar = a + r * H, *yr = y + r * H;
#pragma omp simd
        for (int64_t c = 0; c < H; c++) {
            float v = ar[c] + bias[c];
            ar[c] = v;
            yr[c] = gelu(v);
        }
    }
}

/* Its backward: grad_a = grad * gelu'(a), and each thread's column sums of grad_a in its own row of
   partials ([threads, H], zeroed by the caller), which the caller adds up for the bias. */
void ditlab_bias_gelu_backward(const float *grad, const float *a, float *grad_a, float *partials, int64_t R,
                               int64_t H, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *part = partials + (int64_t)omp_get_thread_num() * H;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const float *g = grad + r * H, *ar = a + r * H;
            float *gr = grad_a + r * H;
#pragma omp simd
            for (int64_t c = 0; c < H; c++) {
                gr[c] = g[c] * gelu_grad(ar[c]);
                part[c] += gr[c];
            }
        }
    }
}

/* adaLN's modulated LayerNorm over rows of C values (DiT's norm without affine weights, then
   modulate): y = (x - mean) * rstd * (1 + scale) + shift, with rstd = 1 / sqrt(var + eps). x and y
   are [B, N, C]; shift and scale [B, C], one row per sample. mean and rstd ([B, N]) are written for
   the backward. */
void ditlab_norm_modulate_forward(const float *x, const float *shift, const float *scale, float *y, float *mean,
                                  float *rstd, int64_t B, int64_t N, int64_t C, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < B * N; r++) {
        const float *xr = x + r * C, *sh = shift + (r / N) * C, *sc = scale + (r / N) * C;
        float *yr = y + r * C;
        float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < C; c++) sum += xr[c];
        float mu = sum / (float)C;
#pragma omp simd reduction(+ : sq)
        for (int64_t c = 0; c < C; c++) sq += (xr[c] - mu) * (xr[c] - mu);
        float rs = 1.0f / sqrtf(sq / (float)C + eps);
#pragma omp simd
        for (int64_t c = 0; c < C; c++) yr[c] = (xr[c] - mu) * rs * (1.0f + sc[c]) + sh[c];
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/* Its backward. With xh = (x - mean) * rstd and gh = grad * (1 + scale):
   grad_shift = sum over N of grad, grad_scale = sum over N of grad * xh, and
   grad_x = rstd * (gh - mean_C(gh) - xh * mean_C(gh * xh)). Samples are split over the threads, so
   each sums its own rows of grad_shift and grad_scale. */
void ditlab_norm_modulate_backward(const float *grad, const float *x, const float *scale, const float *mean,
                                   const float *rstd, float *grad_x, float *grad_shift, float *grad_scale,
                                   int64_t B, int64_t N, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *sc = scale + b * C;
        float *gsh = grad_shift + b * C, *gsc = grad_scale + b * C;
        for (int64_t c = 0; c < C; c++) gsh[c] = gsc[c] = 0.0f;
        for (int64_t r = b * N; r < (b + 1) * N; r++) {
            const float *g = grad + r * C, *xr = x + r * C;
            float *gx = grad_x + r * C;
            float mu = mean[r], rs = rstd[r], sum_gh = 0.0f, sum_ghxh = 0.0f;
#pragma omp simd reduction(+ : sum_gh, sum_ghxh)
            for (int64_t c = 0; c < C; c++) {
                float xh = (xr[c] - mu) * rs, gh = g[c] * (1.0f + sc[c]);
                sum_gh += gh;
                sum_ghxh += gh * xh;
                gsh[c] += g[c];
                gsc[c] += g[c] * xh;
            }
            float a = sum_gh / (float)C, d = sum_ghxh / (float)C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float xh = (xr[c] - mu) * rs;
                gx[c] = rs * (g[c] * (1.0f + sc[c]) - a - xh * d);
            }
        }
    }
}

/* The gated residual add of adaLN-Zero, with the bias of the sub-layer's last linear layer:
   y = x + gate * (h + bias), with x, h and y [B, N, C], gate [B, C] and bias [C]. */
void ditlab_gated_add_forward(const float *x, const float *gate, const float *h, const float *bias, float *y,
                              int64_t B, int64_t N, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < B * N; r++) {
        const float *xr = x + r * C, *hr = h + r * C, *gr = gate + (r / N) * C;
        float *yr = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) yr[c] = xr[c] + gr[c] * (hr[c] + bias[c]);
    }
}

/* Its backward for h, gate and bias (x's gradient is grad itself): grad_h = grad * gate,
   grad_gate = sum over N of grad * (h + bias), and the bias's gradient, the sum of grad_h over all
   rows, as each thread's sums in its own row of partials ([threads, C], zeroed by the caller).
   Samples are split over the threads. */
void ditlab_gated_add_backward(const float *grad, const float *gate, const float *h, const float *bias,
                               float *grad_h, float *grad_gate, float *partials, int64_t B, int64_t N, int64_t C,
                               int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *part = partials + (int64_t)omp_get_thread_num() * C;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const float *gr = gate + b * C;
            float *gg = grad_gate + b * C;
            for (int64_t c = 0; c < C; c++) gg[c] = 0.0f;
            for (int64_t r = b * N; r < (b + 1) * N; r++) {
                const float *g = grad + r * C, *hr = h + r * C;
                float *gh = grad_h + r * C;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    gh[c] = g[c] * gr[c];
                    gg[c] += g[c] * (hr[c] + bias[c]);
                    part[c] += gh[c];
                }
            }
        }
    }
}


/* Multi-head self-attention, softmax(Q K^T / sqrt(d)) V per sample and head, for the token counts
   of DiT's blocks (N a multiple of 16, small enough that one head's N x N scores stay in cache).
   q, k and v are read where the fused qkv projection wrote them ([B, N, 3C], heads of d channels
   side by side), the output is written as [B, N, C], the layout the output projection takes, and
   the backward writes the gradient of qkv as one [B, N, 3C] tensor. torch's CPU flash-attention
   kernel takes q, k and v as [B, H, N, d] views, its backward returns three gradients that autograd
   then concatenates, and at these sizes its block products run well below the machine's peak
   (BENCHMARKS.md, "Attention of our own"). Sample-heads are split over the threads; each head's
   products are the register-tiled AVX-512 kernel below. */
#if defined(__AVX512F__)
#include <immintrin.h>
#include <stdlib.h>

int ditlab_attention_available(void) { return 1; }

/* n floats of scratch, 64-byte aligned (aligned_alloc wants a size that is a multiple of 64). */
static float *scratch(int64_t n) { return aligned_alloc(64, (sizeof(float) * n + 63) / 64 * 64); }

/* One tile of a matrix product: C[r, 0:16V] = alpha * sum_k A(r, k) B[k, 0:16V] for r < 8, with V = 1
   or 2 vectors of 16 floats, A(r, k) = A[r rsa + k csa] (so A can be read transposed), and B
   row-major with row stride ldb. The 8 x 16V sums stay in registers over k. */
static inline __attribute__((always_inline)) void tile(const int V, const float *A, int64_t rsa, int64_t csa,
                                                       const float *B, int64_t ldb, int64_t K, float *C,
                                                       int64_t ldc, float alpha) {
    __m512 c[8][2];
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const float *ak = A + k * csa, *bk = B + k * ldb;
        __m512 b0 = _mm512_loadu_ps(bk), b1 = V == 2 ? _mm512_loadu_ps(bk + 16) : b0;
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            __m512 a = _mm512_set1_ps(ak[r * rsa]);
            c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
            if (V == 2) c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
        }
    }
    __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_ps(C + r * ldc, _mm512_mul_ps(va, c[r][0]));
        if (V == 2) _mm512_storeu_ps(C + r * ldc + 16, _mm512_mul_ps(va, c[r][1]));
    }
}

/* C = alpha * A B for an M x K matrix A (M a multiple of 8, read as in `tile`) and a K x Nc matrix B
   (Nc a multiple of 16). */
static void gemm(const float *A, int64_t rsa, int64_t csa, const float *B, int64_t ldb, int64_t K, float *C,
                 int64_t ldc, int64_t M, int64_t Nc, float alpha) {
    for (int64_t i = 0; i < M; i += 8) {
        int64_t j = 0;
        for (; j + 32 <= Nc; j += 32) tile(2, A + i * rsa, rsa, csa, B + j, ldb, K, C + i * ldc + j, ldc, alpha);
        if (j < Nc) tile(1, A + i * rsa, rsa, csa, B + j, ldb, K, C + i * ldc + j, ldc, alpha);
    }
}

/* dst[c ldd + j] = src[j lds + c] for j < n (a multiple of 16) and c < d, in blocks of 16 rows so
   that the lines read and written stay in L1. */
static void transpose(const float *src, int64_t lds, float *dst, int64_t ldd, int64_t n, int64_t d) {
    for (int64_t j0 = 0; j0 < n; j0 += 16)
        for (int64_t c = 0; c < d; c++)
#pragma omp simd
            for (int64_t j = j0; j < j0 + 16; j++) dst[c * ldd + j] = src[j * lds + c];
}

/* 2^t for 16 values t <= 0, as exp2_clamped computes it (underflowing to 2^-125 rather than 0, which
   no sum of probabilities can tell); NaN stays NaN. */
static inline __m512 exp2_vec(__m512 t) {
    const __m512 shifter = _mm512_set1_ps(12582912.0f);
    const __mmask16 nan = _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q);
    const __m512 u = _mm512_max_ps(t, _mm512_set1_ps(-125.0f)); /* NaN becomes -125 here: put back below */
    __m512 r = _mm512_add_ps(u, shifter), f = _mm512_sub_ps(u, _mm512_sub_ps(r, shifter));
    __m512 p = _mm512_set1_ps(EXP2_POLY[6]);
    for (int i = 5; i >= 0; i--) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
    __m512i n = _mm512_slli_epi32(_mm512_sub_epi32(_mm512_castps_si512(r), _mm512_set1_epi32(0x4B400000)), 23);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), n)), nan, t);
}

/* One row of N scores (log2 units) to probabilities, in place: p_j = 2^(s_j - m) / sum, m the row's
   largest score. m and 1 / sum go to stats[0] and stats[1], from which the backward recomputes the
   same p_j bit for bit. A NaN anywhere in the row makes the whole row NaN. */
static inline void softmax_row(float *row, int64_t N, float *stats) {
    __m512 top = _mm512_loadu_ps(row), sum = _mm512_setzero_ps();
    for (int64_t j = 16; j < N; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + j));
    const float m = _mm512_reduce_max_ps(top);
    for (int64_t j = 0; j < N; j += 16) {
        __m512 e = exp2_vec(_mm512_sub_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(m)));
        _mm512_storeu_ps(row + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sum);
    for (int64_t j = 0; j < N; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(inv)));
    stats[0] = m;
    stats[1] = inv;
}

/* Forward: out [B, N, C] from qkv [B, N, 3C], and stats [B, H, N, 2], each row's largest score and
   the reciprocal of its softmax's sum (scores are taken in log2 units, so that the softmax's
   exponential is 2^t). */
void ditlab_attention_forward(const float *qkv, float *out, float *stats, int64_t B, int64_t N, int64_t H,
                              int64_t d, int threads) {
    const int64_t C = H * d, ld = 3 * C, lt = N + 16; /* lt: K^T's row stride, off the powers of two */
    const float alpha = LOG2E / sqrtf((float)d);
#pragma omp parallel num_threads(threads)
    {
        float *kt = scratch(d * lt + N * N), *s = kt + d * lt;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            const float *q = qkv + b * N * ld + h * d, *k = q + C, *v = q + 2 * C;
            transpose(k, ld, kt, lt, N, d);
            gemm(q, ld, 1, kt, lt, d, s, N, N, N, alpha); /* s = log2(e) Q K^T / sqrt(d) */
            for (int64_t i = 0; i < N; i++) softmax_row(s + i * N, N, stats + (bh * N + i) * 2);
            gemm(s, N, 1, v, ld, N, out + b * N * C + h * d, C, N, d, 1.0f); /* out = P V */
        }
        free(kt);
    }
}

/* Backward: grad_qkv [B, N, 3C] from grad_out [B, N, C], with qkv, out and stats as the forward left
   them. P is recomputed from the scores and stats; with D_i = sum_c dO_ic O_ic,
   dV = P^T dO, dS = P * (dO V^T - D), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d). */
void ditlab_attention_backward(const float *grad_out, const float *qkv, const float *out, const float *stats,
                               float *grad_qkv, int64_t B, int64_t N, int64_t H, int64_t d, int threads) {
    const int64_t C = H * d, ld = 3 * C, lt = N + 16;
    const float scale = 1.0f / sqrtf((float)d), alpha = LOG2E * scale;
#pragma omp parallel num_threads(threads)
    {
        float *kt = scratch(2 * d * lt + 2 * N * N + N);
        float *vt = kt + d * lt, *p = vt + d * lt, *ds = p + N * N, *D = ds + N * N;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            const float *q = qkv + b * N * ld + h * d, *k = q + C, *v = q + 2 * C;
            const float *go = grad_out + b * N * C + h * d, *o = out + b * N * C + h * d, *st = stats + bh * N * 2;
            float *gq = grad_qkv + b * N * ld + h * d, *gk = gq + C, *gv = gq + 2 * C;
            transpose(k, ld, kt, lt, N, d);
            transpose(v, ld, vt, lt, N, d);
            for (int64_t i = 0; i < N; i++) {
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t c = 0; c < d; c++) acc += go[i * C + c] * o[i * C + c];
                D[i] = acc;
            }
            gemm(q, ld, 1, kt, lt, d, p, N, N, N, alpha); /* the forward's scores, bit for bit */
            gemm(go, C, 1, vt, lt, d, ds, N, N, N, 1.0f); /* dP = dO V^T */
            for (int64_t i = 0; i < N; i++) {
                float *pr = p + i * N, *dr = ds + i * N;
                const __m512 m = _mm512_set1_ps(st[2 * i]), inv = _mm512_set1_ps(st[2 * i + 1]);
                const __m512 Di = _mm512_set1_ps(D[i]);
                for (int64_t j = 0; j < N; j += 16) {
                    __m512 pj = _mm512_mul_ps(exp2_vec(_mm512_sub_ps(_mm512_loadu_ps(pr + j), m)), inv);
                    _mm512_storeu_ps(pr + j, pj);
                    _mm512_storeu_ps(dr + j, _mm512_mul_ps(pj, _mm512_sub_ps(_mm512_loadu_ps(dr + j), Di)));
                }
            }
            gemm(p, 1, N, go, C, N, gv, ld, N, d, 1.0f);   /* dV = P^T dO */
            gemm(ds, N, 1, k, ld, N, gq, ld, N, d, scale); /* dQ = dS K / sqrt(d) */
            gemm(ds, 1, N, q, ld, N, gk, ld, N, d, scale); /* dK = dS^T Q / sqrt(d) */
        }
        free(kt);
    }
}
#else
int ditlab_attention_available(void) { return 0; }
#endif
