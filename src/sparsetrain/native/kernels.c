/* sparsetrain's native CPU kernels: fused optimizer steps and CSR products.
 *
 * Plain C, no Python or torch headers: sparsetrain.native compiles this file once per machine
 * (cc -O3 -march=native -fopenmp-simd) and calls it through ctypes, which releases the GIL, so
 * callers can split row ranges over threads. Every function works on contiguous float32 buffers.
 *
 * The elementwise formulas are those of the torch ops of the reference path (clamps keep NaN as
 * torch.clamp does), so both paths agree to rounding.
 */
#include <math.h>
#include <stdint.h>

/* self + weight (end - self), one rounding (torch.lerp uses this form for weight < 0.5 and
 * end - (1 - weight)(end - self) above; the two differ by rounding only, and a per-element choice
 * stops the compiler from vectorising the loops below). */
static inline float lerp1(float self, float end, float weight) { return fmaf(weight, end - self, self); }

/* max(x, 0) that keeps NaN (as torch.clamp_min does) */
static inline float relu_nan(float x) { return (x > 0.0f || x != x) ? x : 0.0f; }

/* ---------------------------------------------------------------- xRDA (SPEC §3)
 * Pass 1, per entry, with w the current weight w_{k-1}:
 *   v <- lerp(v, g, 1-beta) + (1-beta) wd w
 *   z <- w - s v                                   (alpha == 0)
 *   z <- lerp(z, w, 1-alpha) - s v                 (0 < alpha < 1)
 *   z <- z - s v                                   (alpha == 1)
 *   a <- lerp(a, |w|, 1-gamma)                     (reweighted only; a may be NULL)
 * Returns max(a) (0 when a is NULL). One specialised loop per case keeps every loop branch-free
 * (the compiler vectorises each; a loop with the branches inside ran at half the speed). */
#define XRDA_LOOP(PRAGMA, Z_UPDATE, TAIL)                        \
    _Pragma(PRAGMA)                                              \
    for (int64_t i = 0; i < n; i++) {                            \
        const float wi = w[i];                                   \
        const float vi = lerp1(v[i], g[i], beta1) + wdc * wi;    \
        v[i] = vi;                                               \
        const float zi = (Z_UPDATE) + (-s) * vi;                 \
        z[i] = zi;                                               \
        TAIL                                                     \
    }

/* the v and z updates of pass 1, then TAIL (which may use wi, zi), in one loop per alpha case */
#define XRDA_CASES(PRAGMA, TAIL)                                         \
    if (alpha == 0.0f) {                                                 \
        XRDA_LOOP(PRAGMA, wi, TAIL)                                      \
    } else if (alpha == 1.0f) {                                          \
        XRDA_LOOP(PRAGMA, z[i], TAIL)                                    \
    } else {                                                             \
        XRDA_LOOP(PRAGMA, lerp1(z[i], wi, alpha1), TAIL)                 \
    }

#define XRDA_A_UPDATE                                            \
    const float ai = lerp1(a[i], fabsf(wi), gamma1);             \
    a[i] = ai;                                                   \
    amax = ai > amax ? ai : amax;

float st_xrda_pass1(int64_t n, const float *restrict w, const float *restrict g, float *restrict v,
                    float *restrict z, float *restrict a, float beta1, float wdc, float s, float alpha,
                    float gamma1) {
    float amax = 0.0f;
    const float alpha1 = 1.0f - alpha;
    if (a) {
        XRDA_CASES("omp simd reduction(max : amax)", XRDA_A_UPDATE)
    } else {
        XRDA_CASES("omp simd", )
    }
    return amax;
}

/* Pass 2 (reweighted): T <- alpha T + coef * eps / (a + eps);  w <- sign(z) relu(|z| - lam T).
 * coef = s c_G M. */
void st_xrda_pass2(int64_t n, float *restrict w, const float *restrict z, const float *restrict a,
                   float *restrict T, float alpha, float coef,
                   float eps, float lam) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float Ti = (alpha != 1.0f ? T[i] * alpha : T[i]) + coef * (eps / (a[i] + eps));
        T[i] = Ti;
        float zi = z[i];
        w[i] = copysignf(relu_nan(fabsf(zi) + (-lam) * Ti), zi);
    }
}

/* One pass instead of two, when max(a_k) -- hence eps -- is known before the step: the previous
 * step predicted it (*pred of that call) for this step's gamma. Per entry: pass 1, then pass 2 with
 * the given eps, then the prediction for the next step, max_i lerp(a_i, |w_i|, 1 - gamma_next),
 * written to *pred. Returns the true max(a_k): the caller checks it against the eps it passed
 * (a parameter changed behind the optimizer's back breaks the prediction) and repairs with
 * st_xrda_repair if they differ. Bit-identical to the two passes when the prediction holds. */
#define XRDA_FUSED_TAIL                                                     \
    XRDA_A_UPDATE                                                           \
    const float Ti = (alpha != 1.0f ? T[i] * alpha : T[i]) + coef * (eps / (ai + eps)); \
    T[i] = Ti;                                                              \
    const float wn = copysignf(relu_nan(fabsf(zi) + (-lam) * Ti), zi);      \
    w[i] = wn;                                                              \
    const float pn = lerp1(ai, fabsf(wn), gamma1_next);                     \
    pmax = pn > pmax ? pn : pmax;

float st_xrda_fused(int64_t n, float *restrict w, const float *restrict g, float *restrict v, float *restrict z,
                    float *restrict a, float *restrict T, float beta1, float wdc, float s, float alpha, float gamma1,
                    float coef, float eps, float lam, float gamma1_next, float *pred) {
    float amax = 0.0f, pmax = 0.0f;
    const float alpha1 = 1.0f - alpha;
    XRDA_CASES("omp simd reduction(max : amax, pmax)", XRDA_FUSED_TAIL)
    *pred = pmax;
    return amax;
}

/* st_xrda_fused over `count` tensors in one call (the per-call overhead of ctypes dominates for
 * small networks): tensor t has n[t] entries, the predicted eps[t]; its true max(a) and next
 * prediction go to amax[t] and pred[t]. */
void st_xrda_fused_multi(int64_t count, const int64_t *n, float *const *w, const float *const *g, float *const *v,
                         float *const *z, float *const *a, float *const *T, const float *eps, float beta1, float wdc,
                         float s, float alpha, float gamma1, float coef, float lam, float gamma1_next, float *amax,
                         float *pred) {
    for (int64_t t = 0; t < count; t++)
        amax[t] = st_xrda_fused(n[t], w[t], g[t], v[t], z[t], a[t], T[t], beta1, wdc, s, alpha, gamma1, coef, eps[t],
                                lam, gamma1_next, pred + t);
}

/* After st_xrda_fused ran with eps_used but max(a) gave eps: T <- T - coef eps_used/(a + eps_used)
 * + coef eps/(a + eps), w <- S_{lam T}(z), and a new prediction (returned). */
float st_xrda_repair(int64_t n, float *restrict w, const float *restrict z, const float *restrict a,
                     float *restrict T, float coef, float eps_used, float eps, float lam, float gamma1_next) {
    float pmax = 0.0f;
#pragma omp simd reduction(max : pmax)
    for (int64_t i = 0; i < n; i++) {
        const float ai = a[i];
        const float Ti = T[i] - coef * (eps_used / (ai + eps_used)) + coef * (eps / (ai + eps));
        T[i] = Ti;
        const float zi = z[i];
        const float wn = copysignf(relu_nan(fabsf(zi) + (-lam) * Ti), zi);
        w[i] = wn;
        const float pn = lerp1(ai, fabsf(wn), gamma1_next);
        pmax = pn > pmax ? pn : pmax;
    }
    return pmax;
}

/* The prediction alone (after the two-pass step): max_i lerp(a_i, |w_i|, 1 - gamma_next). */
float st_xrda_predict(int64_t n, const float *restrict w, const float *restrict a, float gamma1_next) {
    float pmax = 0.0f;
#pragma omp simd reduction(max : pmax)
    for (int64_t i = 0; i < n; i++) {
        const float pn = lerp1(a[i], fabsf(w[i]), gamma1_next);
        pmax = pn > pmax ? pn : pmax;
    }
    return pmax;
}

/* Structured modes: the entries form `groups` contiguous groups of `gsize` (a conv weight's
 * kernels w[o, i] or filters w[o]); a and T hold one value per group. Pass 1 updates v and z per
 * entry as above and a_j <- lerp(a_j, mean_group |w|, 1-gamma); returns max(a). */
float st_xrda_group_pass1(int64_t groups, int64_t gsize, const float *restrict w, const float *restrict g,
                          float *restrict v, float *restrict z, float *restrict a, float beta1, float wdc,
                          float s, float alpha, float gamma1) {
    float amax = 0.0f;
    const float alpha1 = 1.0f - alpha, inv = 1.0f / (float)gsize;
    for (int64_t j = 0; j < groups; j++) {
        const int64_t o = j * gsize;
        float sum = 0.0f;
        for (int64_t i = o; i < o + gsize; i++) {
            const float wi = w[i];
            const float vi = lerp1(v[i], g[i], beta1) + wdc * wi;
            v[i] = vi;
            const float zb = alpha == 0.0f ? wi : (alpha == 1.0f ? z[i] : lerp1(z[i], wi, alpha1));
            z[i] = zb + (-s) * vi;
            sum += fabsf(wi);
        }
        const float aj = lerp1(a[j], sum * inv, gamma1);
        a[j] = aj;
        amax = aj > amax ? aj : amax;
    }
    return amax;
}

/* Pass 2 of the structured modes: T_j <- alpha T_j + coef eps / (a_j + eps), then every entry of
 * group j: w <- sign(z) relu(|z| - lam T_j). coef = s c_G M. */
void st_xrda_group_pass2(int64_t groups, int64_t gsize, float *restrict w, const float *restrict z,
                         const float *restrict a, float *restrict T, float alpha, float coef, float eps, float lam) {
    for (int64_t j = 0; j < groups; j++) {
        const float Tj = (alpha != 1.0f ? T[j] * alpha : T[j]) + coef * (eps / (a[j] + eps));
        T[j] = Tj;
        const float thr = lam * Tj;
        const int64_t o = j * gsize;
        for (int64_t i = o; i < o + gsize; i++) {
            const float zi = z[i];
            w[i] = copysignf(relu_nan(fabsf(zi) - thr), zi);
        }
    }
}

/* Plain l1 (b = c_G, a uniform threshold thr = lam T) in one pass: pass 1 without a, then
 * w <- S_thr(z) as torch.nn.functional.softshrink. */
#define SOFTSHRINK(zi, thr) ((zi) > (thr) ? (zi) - (thr) : ((zi) < -(thr) ? (zi) + (thr) : ((zi) != (zi) ? (zi) : 0.0f)))
void st_xrda_plain(int64_t n, float *restrict w, const float *restrict g, float *restrict v, float *restrict z,
                   float beta1, float wdc, float s, float alpha, float thr) {
    const float alpha1 = 1.0f - alpha;
    XRDA_CASES("omp simd", w[i] = SOFTSHRINK(zi, thr);)
}

/* ---------------------------------------------------------------- CSR products
 * W is (rows, cols) in CSR with int32 row pointers / column indices. Only rows [r0, r1) are
 * computed, so callers can split the rows over threads. */

/* y[r] = sum_k W[r, col_k] x[col_k] (+ bias[r]); AVX-512 / AVX2 gathers where the CPU has them */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float row_dot(const int32_t *col, const float *val, int32_t k, int32_t e, const float *x) {
    float acc = 0.0f;
#if defined(__AVX512F__)
    __m512 v = _mm512_setzero_ps();
    for (; k + 16 <= e; k += 16) {
        __m512i idx = _mm512_loadu_si512((const void *)(col + k));
        v = _mm512_fmadd_ps(_mm512_loadu_ps(val + k), _mm512_i32gather_ps(idx, x, 4), v);
    }
    if (k < e) { /* the last < 16 nonzeros: masked loads and gather */
        __mmask16 m = (__mmask16)((1u << (e - k)) - 1u);
        __m512i idx = _mm512_maskz_loadu_epi32(m, (const void *)(col + k));
        __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, x, 4);
        v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, val + k), xv, v);
        k = e;
    }
    acc = _mm512_reduce_add_ps(v);
#elif defined(__AVX2__)
    __m256 v = _mm256_setzero_ps();
    for (; k + 8 <= e; k += 8) {
        __m256i idx = _mm256_loadu_si256((const __m256i *)(col + k));
        v = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), _mm256_i32gather_ps(x, idx, 4), v);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    acc = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; k < e; k++) acc += val[k] * x[col[k]];
    return acc;
}

void st_csr_mv(int64_t r0, int64_t r1, const int32_t *crow, const int32_t *col, const float *val,
               const float *x, const float *bias, float *y) {
    for (int64_t r = r0; r < r1; r++) {
        float acc = row_dot(col, val, crow[r], crow[r + 1], x);
        y[r] = bias ? acc + bias[r] : acc;
    }
}

/* Y[r, :] = sum_k W[r, col_k] XT[col_k, :] (+ bias[r]) with XT (cols, N) and Y (rows, N) row-major.
 * The N columns go in blocks of 64 (four 16-float vectors held in registers across the row's
 * nonzeros, so each nonzero costs one broadcast and four fused multiply-adds), then 16, then 1. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

void st_csr_mm(int64_t r0, int64_t r1, int64_t N, const int32_t *crow, const int32_t *col, const float *val,
               const float *XT, const float *bias, float *Y) {
    for (int64_t r = r0; r < r1; r++) {
        const int32_t k0 = crow[r], k1 = crow[r + 1];
        const float b = bias ? bias[r] : 0.0f;
        float *yr = Y + r * N;
        int64_t c = 0;
        for (; c + 64 <= N; c += 64) {
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int32_t k = k0; k < k1; k++) {
                const v16 *xr = (const v16 *)(XT + (int64_t)col[k] * N + c);
                const float vk = val[k];
                a0 += vk * xr[0];
                a1 += vk * xr[1];
                a2 += vk * xr[2];
                a3 += vk * xr[3];
            }
            v16 *out = (v16 *)(yr + c);
            out[0] = a0 + b;
            out[1] = a1 + b;
            out[2] = a2 + b;
            out[3] = a3 + b;
        }
        for (; c + 16 <= N; c += 16) {
            v16 a0 = {0};
            for (int32_t k = k0; k < k1; k++) a0 += val[k] * *(const v16 *)(XT + (int64_t)col[k] * N + c);
            *(v16 *)(yr + c) = a0 + b;
        }
        for (; c < N; c++) {
            float acc = 0.0f;
            for (int32_t k = k0; k < k1; k++) acc += val[k] * XT[(int64_t)col[k] * N + c];
            yr[c] = acc + b;
        }
    }
}
