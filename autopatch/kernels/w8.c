/* Weight-only int8 matmul for autopatch's "int8" mode: y = x W^T * scale (+ bias), x float32, W int8.
 *
 * The activations stay float32 (quantizing them cost accuracy, see docs/quantization.md); only the weights,
 * which a decode step streams from memory, are int8, with one float32 scale per 32 weights of a row (a
 * group: the GGUF Q4_K block the embedded weights came from has the same width, so little is lost). W comes
 * packed in panels (autopatch.kernels.pack): panel p holds rows 4p..4p+3, as chunks of 16 columns
 * [K/16][4][16], and its scales as [K/32][4], so a thread reads its panels as sequential streams (the
 * hardware prefetcher follows them) and each loaded weight vector, converted and scaled once, serves up to
 * 4 rows of x. Each y[m, n] is one dot product summed in a fixed order, so below
 * autopatch.kernels.GEMM_ROWS rows a row's output does not depend on the other rows of its batch; above it
 * (a prefill), autopatch_w8_dequant feeds torch's float GEMM instead.
 * Built once per machine by autopatch.kernels with the host's vector width (-march=native).
 */
#include <stddef.h>
#include <stdint.h>
#include <omp.h>
#include <immintrin.h>

#define CH 16 /* columns per chunk of a panel row */
#define GROUP 32 /* columns per scale; K is a multiple of GROUP */
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead in the panel stream: DRAM latency outlasts the hardware prefetcher's lead */
#endif

void autopatch_set_threads(int n) { omp_set_num_threads(n); }

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vload_w(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline vf vload_x(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vset(float s) { return _mm512_set1_ps(s); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#define VSTORE _mm512_storeu_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vload_w(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline vf vload_x(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vset(float s) { return _mm256_set1_ps(s); }
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
#define VSTORE _mm256_storeu_ps
#else
#error "autopatch's int8 kernel needs AVX2 with FMA, or AVX-512"
#endif

/* out[r][c] = sum_k x[r, k] * panel[c, k] * scale[c, k / GROUP] for r < MB, c < 4. */
#define BLOCK(MB)                                                                                   \
    static inline void block##MB(int K, const float *x, const int8_t *panel, const float *scales,   \
                                 float out[8][4]) {                                                 \
        vf acc[MB][4];                                                                              \
        for (int r = 0; r < MB; r++) for (int c = 0; c < 4; c++) acc[r][c] = vzero();               \
        for (int k = 0; k < K; k += CH, panel += 4 * CH) {                                          \
            _mm_prefetch((const char *)panel + PREFETCH, _MM_HINT_T0);                              \
            const float *sg = scales + (k / GROUP) * 4;                                             \
            const vf s0 = vset(sg[0]), s1 = vset(sg[1]), s2 = vset(sg[2]), s3 = vset(sg[3]);        \
            _Pragma("GCC unroll 2") for (int h = 0; h < CH; h += VW) {                              \
                vf w0 = vmul(vload_w(panel + h), s0), w1 = vmul(vload_w(panel + CH + h), s1),       \
                   w2 = vmul(vload_w(panel + 2 * CH + h), s2), w3 = vmul(vload_w(panel + 3 * CH + h), s3); \
                _Pragma("GCC unroll 4") for (int r = 0; r < MB; r++) {                              \
                    vf xv = vload_x(x + (size_t)r * K + k + h);                                     \
                    acc[r][0] = vfma(xv, w0, acc[r][0]); acc[r][1] = vfma(xv, w1, acc[r][1]);      \
                    acc[r][2] = vfma(xv, w2, acc[r][2]); acc[r][3] = vfma(xv, w3, acc[r][3]);      \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < MB; r++) for (int c = 0; c < 4; c++) out[r][c] = vsum(acc[r][c]);      \
    }
BLOCK(1)
BLOCK(2)
BLOCK(3)
BLOCK(4)

/* 5 to 8 rows of x in one pass over a pair of the panel's weight rows (columns c0, c0 + 1 of out): each weight
 * vector is converted and scaled once for up to 8 rows instead of once per block of 4, with 16 accumulators.
 * Each out[r][c] is the sum BLOCK(MB) makes, product for product and in the same order: the same bits.
 * Gemma's LM head at 5 to 8 rows: 8-17% faster (docs/bench_kernels_passes.txt). */
#define TALL(MB)                                                                                    \
    static inline void tall##MB(int K, const float *x, const int8_t *panel, const float *scales, int c0, \
                                float out[8][4]) {                                                  \
        vf acc[MB][2];                                                                              \
        for (int r = 0; r < MB; r++) acc[r][0] = acc[r][1] = vzero();                               \
        for (int k = 0; k < K; k += CH, panel += 4 * CH) {                                          \
            _mm_prefetch((const char *)panel + PREFETCH, _MM_HINT_T0);                              \
            const float *sg = scales + (k / GROUP) * 4;                                             \
            const vf s0 = vset(sg[c0]), s1 = vset(sg[c0 + 1]);                                      \
            _Pragma("GCC unroll 2") for (int h = 0; h < CH; h += VW) {                              \
                vf w0 = vmul(vload_w(panel + c0 * CH + h), s0), w1 = vmul(vload_w(panel + (c0 + 1) * CH + h), s1); \
                _Pragma("GCC unroll 8") for (int r = 0; r < MB; r++) {                              \
                    vf xv = vload_x(x + (size_t)r * K + k + h);                                     \
                    acc[r][0] = vfma(xv, w0, acc[r][0]); acc[r][1] = vfma(xv, w1, acc[r][1]);      \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < MB; r++) { out[r][c0] = vsum(acc[r][0]); out[r][c0 + 1] = vsum(acc[r][1]); } \
    }
TALL(2)
TALL(3)
TALL(4)
TALL(5)
TALL(6)
TALL(7)
TALL(8)
#if VW == 16
#define ROWS_PER_PASS 8
#define TALL_FROM 5
#else /* AVX2's 16 registers: BLOCK(2) and up spill, a pass over a pair of weight rows keeps 2*MB + 5 */
#ifndef ROWS_PER_PASS
#define ROWS_PER_PASS 5
#endif
#ifndef TALL_FROM
#define TALL_FROM 3
#endif
#endif

/* x [M, K] float32, packed [ceil(N/4), K/CH, 4, CH] int8, scales [ceil(N/4), K/GROUP, 4] float32,
 * bias [N] or NULL, y [M, N]. */
void autopatch_w8_matmul(int M, int N, int K, const float *x, const int8_t *packed, const float *scales,
                         const float *bias, float *y) {
    const int panels = (N + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        const int8_t *panel = packed + (size_t)p * 4 * K;
        const float *ps = scales + (size_t)p * 4 * (K / GROUP);
        for (int m0 = 0; m0 < M;) {
            const int mb = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
            const float *xb = x + (size_t)m0 * K;
            float out[8][4];
            if (mb >= TALL_FROM)
                for (int c0 = 0; c0 < 4; c0 += 2)
                    switch (mb) {
                        case 8: tall8(K, xb, panel, ps, c0, out); break;
                        case 7: tall7(K, xb, panel, ps, c0, out); break;
                        case 6: tall6(K, xb, panel, ps, c0, out); break;
                        case 5: tall5(K, xb, panel, ps, c0, out); break;
                        case 4: tall4(K, xb, panel, ps, c0, out); break;
                        case 3: tall3(K, xb, panel, ps, c0, out); break;
                        default: tall2(K, xb, panel, ps, c0, out); break;
                    }
            else switch (mb) {
                case 4: block4(K, xb, panel, ps, out); break;
                case 3: block3(K, xb, panel, ps, out); break;
                case 2: block2(K, xb, panel, ps, out); break;
                default: block1(K, xb, panel, ps, out); break;
            }
            for (int r = 0; r < mb; r++)
                for (int c = 0; c < nb; c++)
                    y[(size_t)(m0 + r) * N + n0 + c] = out[r][c] + (bias ? bias[n0 + c] : 0.f);
            m0 += mb;
        }
    }
}

#include "store.h"

/* out[r, k] = W[n0 + r, k] for r < rows (n0 and rows multiples of 4), as float32 (autopatch_w8_dequant) or as
 * bfloat16 bits (autopatch_w8_dequant_bf16): the rows of a slice for a prefill's GEMM. */
#define W8_DEQUANT(NAME, T, STORE)                                                                      \
    void NAME(int K, const int8_t *packed, const float *scales, int n0, int rows, T *out) {             \
        _Pragma("omp parallel for schedule(static)")                                                    \
        for (int p = n0 / 4; p < (n0 + rows) / 4; p++) {                                                \
            const int8_t *panel = packed + (size_t)p * 4 * K;                                           \
            const float *ps = scales + (size_t)p * 4 * (K / GROUP);                                     \
            T *dst = out + (size_t)(p * 4 - n0) * K;                                                    \
            for (int k = 0; k < K; k += CH, panel += 4 * CH)                                            \
                for (int c = 0; c < 4; c++) {                                                           \
                    const vf s = vset(ps[(k / GROUP) * 4 + c]);                                         \
                    for (int j = 0; j < CH; j += VW) STORE(dst + (size_t)c * K + k + j, vmul(vload_w(panel + c * CH + j), s)); \
                }                                                                                       \
        }                                                                                               \
    }
W8_DEQUANT(autopatch_w8_dequant, float, vstore_f32)
W8_DEQUANT(autopatch_w8_dequant_bf16, uint16_t, vstore_bf16)
