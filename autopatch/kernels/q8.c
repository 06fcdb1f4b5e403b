/* int8 activations for a decode step (autopatch's "int4-vnni" mode): each row of x is rounded to int8 with one
 * float32 scale per group of 32 inputs (d = max|x| / 127, the Q8_0 format llama.cpp multiplies its 4-bit weights
 * by), and the products are summed exactly in int32 by AVX512-VNNI's vpdpbusd, four products per instruction
 * lane, instead of converting every weight to float32. Per group g of a weight row n:
 *   int4 (w4.c's layout, W = a q + b):  y += a[n,g] d[g] sum_k xq[k] q[n,k]  +  b[n,g] s[g]
 *   int8 (w8.c's layout, W = c w):      y += c[n,g] d[g] (sum_k xq[k] (w[n,k] + 128) - 128 sum_k xq[k])
 * where s[g] is the float32 sum of the group's inputs (so b multiplies x exactly) and vpdpbusd's unsigned operand is
 * q (0..15) or w + 128 (w XOR 0x80). Each output sums its groups in a fixed order and each row of x is rounded on
 * its own, so a row's result does not depend on its batch. Without AVX512-VNNI the functions return -1 and
 * autopatch refuses the mode.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#include <immintrin.h>

#define GROUP 32
#define HALF 16
#define CH 16
#ifndef PREFETCH
#define PREFETCH 1024
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

int autopatch_q8_available(void) { return 1; }

/* xq [M][K] int8, d, s [M][K/32] float32, qs [M][K/32] int32 (sum of the group's xq) */
static void quantize_rows(int M, int K, const float *x, int8_t *xq, float *d, float *s, int32_t *qs) {
    const int G = K / GROUP;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *xg = x + (size_t)m * K + (size_t)g * GROUP;
            const __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)(xq + (size_t)m * K + (size_t)g * GROUP), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(xq + (size_t)m * K + (size_t)g * GROUP + 16), _mm512_cvtsepi32_epi8(q1));
            d[(size_t)m * G + g] = scale;
            s[(size_t)m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
            qs[(size_t)m * G + g] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
}

static inline __m512 spread4(const float *p) { /* [p0 x4, p1 x4, p2 x4, p3 x4] */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(p)));
}

static inline void finish(int M, int N, int n0, int nb, const __m512 *acc, const __m128 *accb, const float *bias,
                          float *y) {
    for (int r = 0; r < M; r++) {
        float lanes[16], extra[4];
        _mm512_storeu_ps(lanes, acc[r]);
        _mm_storeu_ps(extra, accb[r]);
        for (int c = 0; c < nb; c++)
            y[(size_t)r * N + n0 + c] = ((lanes[4 * c] + lanes[4 * c + 1]) + (lanes[4 * c + 2] + lanes[4 * c + 3]))
                                        + extra[c] + (bias ? bias[n0 + c] : 0.f);
    }
}

#define MAXROWS 4 /* rows of x per pass over a panel: each weight vector unpacked once for up to 4 rows */

/* w4.c's packed panels and (a, b); x float32 [M, K]. Returns 0, or -1 when memory runs out. */
int autopatch_w4_matmul_q8(int M, int N, int K, const float *x, const uint8_t *packed, const float *ab,
                           const float *bias, float *y) {
    const int G = K / GROUP, panels = (N + 3) / 4;
    int8_t *xq = malloc((size_t)M * K);
    float *d = malloc(sizeof(float) * 2 * (size_t)M * G);
    int32_t *qs = malloc(sizeof(int32_t) * (size_t)M * G);
    if (!xq || !d || !qs) { free(xq); free(d); free(qs); return -1; }
    float *s = d + (size_t)M * G;
    quantize_rows(M, K, x, xq, d, s, qs);
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        for (int m0 = 0; m0 < M; m0 += MAXROWS) {
            const int mb = M - m0 < MAXROWS ? M - m0 : MAXROWS;
            const uint8_t *panel = packed + (size_t)p * 2 * K;
            const float *pab = ab + (size_t)p * 8 * G;
            __m512 acc[MAXROWS];
            __m128 accb[MAXROWS];
            for (int r = 0; r < mb; r++) { acc[r] = _mm512_setzero_ps(); accb[r] = _mm_setzero_ps(); }
            for (int g = 0; g < G; g++, panel += 4 * HALF, pab += 8) {
                _mm_prefetch((const char *)panel + PREFETCH, _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512((const void *)panel);
                const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                const __m512 a = spread4(pab);
                const __m128 b = _mm_loadu_ps(pab + 4);
                for (int r = 0; r < mb; r++) {
                    const int8_t *xg = xq + (size_t)(m0 + r) * K + (size_t)g * GROUP;
                    const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xg));
                    const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xg + HALF)));
                    const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
                    const size_t at = (size_t)(m0 + r) * G + g;
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(a, _mm512_set1_ps(d[at])), acc[r]);
                    accb[r] = _mm_fmadd_ps(b, _mm_set1_ps(s[at]), accb[r]);
                }
            }
            finish(mb, N, n0, nb, acc, accb, bias, y + (size_t)m0 * N);
        }
    }
    free(xq); free(d); free(qs);
    return 0;
}

/* w8.c's packed panels ([K/16][4][16] int8) and scales ([K/32][4]); x float32 [M, K]. */
int autopatch_w8_matmul_q8(int M, int N, int K, const float *x, const int8_t *packed, const float *scales,
                           const float *bias, float *y) {
    const int G = K / GROUP, panels = (N + 3) / 4;
    int8_t *xq = malloc((size_t)M * K);
    float *d = malloc(sizeof(float) * 2 * (size_t)M * G);
    int32_t *qs = malloc(sizeof(int32_t) * (size_t)M * G);
    if (!xq || !d || !qs) { free(xq); free(d); free(qs); return -1; }
    float *s = d + (size_t)M * G;
    quantize_rows(M, K, x, xq, d, s, qs);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        for (int m0 = 0; m0 < M; m0 += MAXROWS) {
            const int mb = M - m0 < MAXROWS ? M - m0 : MAXROWS;
            const int8_t *panel = packed + (size_t)p * 4 * K;
            const float *ps = scales + (size_t)p * 4 * G;
            __m512 acc[MAXROWS];
            __m128 accb[MAXROWS];
            for (int r = 0; r < mb; r++) { acc[r] = _mm512_setzero_ps(); accb[r] = _mm_setzero_ps(); }
            for (int g = 0; g < G; g++, panel += 8 * CH, ps += 4) {
                _mm_prefetch((const char *)panel + 2 * PREFETCH, _MM_HINT_T0);
                const __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512((const void *)panel), flip);
                const __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(panel + 4 * CH)), flip);
                const __m512 c = spread4(ps);
                const __m128 c4 = _mm_loadu_ps(ps);
                for (int r = 0; r < mb; r++) {
                    const int8_t *xg = xq + (size_t)(m0 + r) * K + (size_t)g * GROUP;
                    const __m512i x0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xg));
                    const __m512i x1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xg + CH)));
                    const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, x0), u1, x1);
                    const size_t at = (size_t)(m0 + r) * G + g;
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(c, _mm512_set1_ps(d[at])), acc[r]);
                    accb[r] = _mm_fmadd_ps(c4, _mm_set1_ps(-128.f * (float)qs[at] * d[at]), accb[r]);
                }
            }
            finish(mb, N, n0, nb, acc, accb, bias, y + (size_t)m0 * N);
        }
    }
    free(xq); free(d); free(qs);
    return 0;
}

#else

int autopatch_q8_available(void) { return 0; }
int autopatch_w4_matmul_q8(int M, int N, int K, const float *x, const uint8_t *packed, const float *ab,
                           const float *bias, float *y) {
    (void)M; (void)N; (void)K; (void)x; (void)packed; (void)ab; (void)bias; (void)y;
    return -1;
}
int autopatch_w8_matmul_q8(int M, int N, int K, const float *x, const int8_t *packed, const float *scales,
                           const float *bias, float *y) {
    (void)M; (void)N; (void)K; (void)x; (void)packed; (void)scales; (void)bias; (void)y;
    return -1;
}

#endif
