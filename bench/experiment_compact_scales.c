/* Experiment (bench/experiment_compact_scales.py): the int4 kernel of autopatch/kernels/w4.c with Q4_K-style compact
 * scales. Per panel of 4 rows and super-block of 256 columns: float32 d[4], dmin[4], uint8 sc[8][4], m[8][4], then the
 * nibbles as in w4.c; a = d * sc, b = -dmin * m per 32 weights: 19 bytes per 32 weights against 24. */
#include <stddef.h>
#include <stdint.h>
#include <omp.h>
#include <immintrin.h>
#define GROUP 32
#define HALF 16
#define SUPER 256
#define SB_BYTES 608  /* 96 header + 512 nibbles, per panel per super-block */
#ifndef PREFETCH
#define PREFETCH 1024
#endif
static inline __m512 vtable(const float *a, const float *b) {
    return _mm512_fmadd_ps(_mm512_setr_ps(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15), _mm512_set1_ps(*a), _mm512_set1_ps(*b));
}
#define BLOCK(MB) \
static inline void blk##MB(int K, const float *x, const uint8_t *panel, float out[4][4]) { \
    __m512 acc[MB][4], acc2[MB][4]; \
    for (int r = 0; r < MB; r++) for (int c = 0; c < 4; c++) acc[r][c] = acc2[r][c] = _mm512_setzero_ps(); \
    float A[32] __attribute__((aligned(64))), B[32] __attribute__((aligned(64))); \
    for (int s = 0; s < K; s += SUPER, panel += SB_BYTES) { \
        const __m512 d = _mm512_broadcast_f32x4(_mm_loadu_ps((const float *)panel)); \
        const __m512 m = _mm512_broadcast_f32x4(_mm_loadu_ps((const float *)panel + 4)); \
        const uint8_t *sc = panel + 32, *mn = panel + 64; \
        _mm512_store_ps(A, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc))))); \
        _mm512_store_ps(A + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16)))))); \
        _mm512_store_ps(B, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(m, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)mn)))))); \
        _mm512_store_ps(B + 16, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(m, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mn + 16))))))); \
        const uint8_t *nib = panel + 96; \
        for (int g = 0; g < 8; g++, nib += 64) { \
            _mm_prefetch((const char *)nib + PREFETCH, _MM_HINT_T0); \
            __m512 t[4]; for (int c = 0; c < 4; c++) t[c] = vtable(A + g * 4 + c, B + g * 4 + c); \
            __m512 lo[4], hi[4]; \
            for (int c = 0; c < 4; c++) { \
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(nib + c * HALF))); \
                lo[c] = _mm512_permutexvar_ps(v, t[c]); hi[c] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t[c]); \
            } \
            const int k = s + g * GROUP; \
            for (int r = 0; r < MB; r++) { \
                const __m512 xl = _mm512_loadu_ps(x + (size_t)r * K + k), xh = _mm512_loadu_ps(x + (size_t)r * K + k + HALF); \
                for (int c = 0; c < 4; c++) { acc[r][c] = _mm512_fmadd_ps(xl, lo[c], acc[r][c]); acc2[r][c] = _mm512_fmadd_ps(xh, hi[c], acc2[r][c]); } \
            } \
        } \
    } \
    for (int r = 0; r < MB; r++) for (int c = 0; c < 4; c++) out[r][c] = _mm512_reduce_add_ps(acc[r][c] + acc2[r][c]); \
}
BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4)
void w4k_matmul(int M, int N, int K, const float *x, const uint8_t *packed, float *y) {
    const int panels = (N + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        const uint8_t *panel = packed + (size_t)p * (K / SUPER) * SB_BYTES;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const int mb = M - m0 < 4 ? M - m0 : 4;
            const float *xb = x + (size_t)m0 * K;
            float out[4][4];
            switch (mb) { case 4: blk4(K, xb, panel, out); break; case 3: blk3(K, xb, panel, out); break;
                          case 2: blk2(K, xb, panel, out); break; default: blk1(K, xb, panel, out); }
            for (int r = 0; r < mb; r++) for (int c = 0; c < nb; c++) y[(size_t)(m0 + r) * N + n0 + c] = out[r][c];
        }
    }
}
