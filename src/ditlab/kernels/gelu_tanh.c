/* GELU in its tanh form, forward and backward, for float32 on CPUs (ditlab.kernels).

   gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)

   is computed as x * s with s = 1 / (1 + 2^t), t = -2 log2(e) u: the same function, since
   0.5 (1 + tanh(u)) is the logistic sigmoid of 2u. 2^t is split into 2^n 2^f with n the integer
   nearest t and f in [-0.5, 0.5]; 2^f is a degree-6 polynomial (coefficients fitted to 2^f on
   Chebyshev nodes, relative error 2e-9 before float rounding) and 2^n goes into the exponent
   bits. Every step is plain arithmetic, so the compiler vectorises the loops; torch's own kernel
   calls a vectorised tanh that took 3-5x as long here (BENCHMARKS.md). NaN stays NaN. */

#include <stdint.h>
#include <string.h>

#define SQRT_2_OVER_PI 0.7978845608028654f
#define KAPPA 0.044715f
#define LOG2E 1.4426950408889634f
#define CHUNK 4096 /* elements per piece of work: 16 KB, so a piece stays in L1 */

static const float C[7] = {1.000000001e+00f, 6.931472056e-01f, 2.402264661e-01f, 5.550328998e-02f,
                           9.618519534e-03f, 1.339986036e-03f, 1.533757697e-04f};

/* 2^t for t in [-125, 125], which the caller guarantees. */
static inline float exp2_clamped(float t) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds t to an integer */
    float r = t + shifter;
    float f = t - (r - shifter);
    float p = C[6];
    p = p * f + C[5];
    p = p * f + C[4];
    p = p * f + C[3];
    p = p * f + C[2];
    p = p * f + C[1];
    p = p * f + C[0];
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

void ditlab_gelu_tanh_forward(const float *x, float *y, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += CHUNK) {
        int64_t end = start + CHUNK < n ? start + CHUNK : n;
#pragma omp simd
        for (int64_t i = start; i < end; i++) y[i] = x[i] / (1.0f + two_to_t(x[i]));
    }
}

/* d gelu / dx = s + x s (1 - s) d(2u)/dx, with 1 - s computed as p s, which does not cancel where s
   is near 1. */
void ditlab_gelu_tanh_backward(const float *grad, const float *x, float *grad_x, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += CHUNK) {
        int64_t end = start + CHUNK < n ? start + CHUNK : n;
#pragma omp simd
        for (int64_t i = start; i < end; i++) {
            float v = x[i], p = two_to_t(v), s = 1.0f / (1.0f + p);
            float one_minus_s = p * s; /* in [0, 1]: p alone can be near 2^125 */
            float du = (2.0f * SQRT_2_OVER_PI) * (1.0f + 3.0f * KAPPA * v * v);
            grad_x[i] = grad[i] * (s + v * one_minus_s * s * du);
        }
    }
}
