/* Weight-only int8 matmul for autopatch's "int8" mode: y = x W^T * scale (+ bias), x float32, W int8.
 *
 * The activations stay float32 (quantizing them cost accuracy, see docs/quantization.md); only the weights,
 * which a decode step streams from memory, are int8. A register block of 4 rows of x by 4 rows of W converts
 * each loaded weight vector once and uses it for 4 rows of x. Each y[m, n] is one dot product summed in a
 * fixed order whatever M is, so a row's output does not depend on the other rows of its batch.
 * Built once per machine by autopatch.quantize with the host's vector width (-march=native).
 */
#include <stddef.h>
#include <stdint.h>
#include <omp.h>
#include <immintrin.h>

void autopatch_set_threads(int n) { omp_set_num_threads(n); }

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vload_w(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline vf vload_x(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vload_w(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline vf vload_x(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
#else
#error "autopatch's int8 kernel needs AVX2 with FMA, or AVX-512"
#endif

/* out[r][c] = sum_k x[r, k] * w[c, k] for r < MB, c < 4 (the full-width main case). */
#define BLOCK(MB)                                                                                   \
    static inline void block##MB(int K, const float *x, const int8_t *w, float out[4][4]) {         \
        vf acc[MB][4];                                                                              \
        for (int r = 0; r < MB; r++) for (int c = 0; c < 4; c++) acc[r][c] = vzero();               \
        const int Kv = K - K % VW;                                                                  \
        for (int k = 0; k < Kv; k += VW) {                                                          \
            vf w0 = vload_w(w + k), w1 = vload_w(w + K + k), w2 = vload_w(w + 2 * (size_t)K + k),  \
               w3 = vload_w(w + 3 * (size_t)K + k);                                                 \
            _Pragma("GCC unroll 4") for (int r = 0; r < MB; r++) {                                  \
                vf xv = vload_x(x + (size_t)r * K + k);                                             \
                acc[r][0] = vfma(xv, w0, acc[r][0]); acc[r][1] = vfma(xv, w1, acc[r][1]);          \
                acc[r][2] = vfma(xv, w2, acc[r][2]); acc[r][3] = vfma(xv, w3, acc[r][3]);          \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < MB; r++)                                                                \
            for (int c = 0; c < 4; c++) {                                                           \
                float s = vsum(acc[r][c]);                                                          \
                for (int k = Kv; k < K; k++) s += x[(size_t)r * K + k] * (float)w[(size_t)c * K + k]; \
                out[r][c] = s;                                                                      \
            }                                                                                       \
    }
BLOCK(1)
BLOCK(2)
BLOCK(3)
BLOCK(4)

static float dot(int K, const float *x, const int8_t *w) {
    float s = 0.f;
    for (int k = 0; k < K; k++) s += x[k] * (float)w[k];
    return s;
}

void autopatch_w8_matmul(int M, int N, int K, const float *x, const int8_t *w, const float *scale,
                         const float *bias, float *y) {
    const int nfull = N / 4;
    #pragma omp parallel for schedule(static)
    for (int nbk = 0; nbk < nfull; nbk++) {
        const int n0 = nbk * 4;
        const int8_t *wb = w + (size_t)n0 * K;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const int mb = M - m0 < 4 ? M - m0 : 4;
            const float *xb = x + (size_t)m0 * K;
            float out[4][4];
            switch (mb) {
                case 4: block4(K, xb, wb, out); break;
                case 3: block3(K, xb, wb, out); break;
                case 2: block2(K, xb, wb, out); break;
                default: block1(K, xb, wb, out); break;
            }
            for (int r = 0; r < mb; r++)
                for (int c = 0; c < 4; c++)
                    y[(size_t)(m0 + r) * N + n0 + c] = out[r][c] * scale[n0 + c] + (bias ? bias[n0 + c] : 0.f);
        }
    }
    for (int n = nfull * 4; n < N; n++) /* the last N % 4 outputs */
        for (int m = 0; m < M; m++)
            y[(size_t)m * N + n] = dot(K, x + (size_t)m * K, w + (size_t)n * K) * scale[n] + (bias ? bias[n] : 0.f);
}
