/* Weight-only int4 matmul for autopatch's "int4" mode: y = x W^T (+ bias), x float32, W = a * q + b with
 * q in 0..15 and one float32 (a, b) per 32 weights of a row: the affine form of a GGUF Q4_K block, so a
 * weight dequantized from Q4_K is held again at 4 bits, exactly (to float32 rounding). (a, b) stay float32:
 * in float16 they halve the scale bytes, but converting and broadcasting them per row of each group kept the
 * shuffle port busy and the kernel compute-bound, slower than int8; read as float32 they are broadcast
 * straight from memory and the kernel runs at the memory's speed (bench/bench_kernels.py).
 * W comes packed in panels (autopatch.kernels.pack4): panel p holds rows 4p..4p+3; each group of 32 columns
 * is 64 bytes [4][16], byte j of a row holding column j in its low nibble and column j + 16 in its high one,
 * and the panel's (a, b) as [K/32][2][4] float32. As in w8.c, a thread reads its panels as sequential streams,
 * each weight vector is converted once for up to 4 rows of x, each y[m, n] is summed in a fixed order (below
 * autopatch.kernels.GEMM_ROWS rows a row's output does not depend on its batch), and a prefill multiplies
 * float32 rows from autopatch_w4_dequant in torch's GEMM.
 */
#include <stddef.h>
#include <stdint.h>
#include <omp.h>
#include <immintrin.h>

#define GROUP 32 /* columns per (a, b); K is a multiple of GROUP */
#define HALF 16  /* bytes per row of a group */
#ifndef PREFETCH
#define PREFETCH 1024
#endif

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
typedef __m512i vi;
static inline vi vload_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
/* a * q + b for the 16 levels q of a nibble, looked up by the low 4 bits of each lane (vpermps ignores the rest) */
#define TABLE 1
static inline vf vtable(float a, float b) {
    return _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(a), _mm512_set1_ps(b));
}
static inline vf vlo_t(vi v, vf t) { return _mm512_permutexvar_ps(v, t); }
static inline vf vhi_t(vi v, vf t) { return _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t); }
static inline vf vload_x(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vset(float s) { return _mm512_set1_ps(s); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline vf vnib_lo(vi v) { return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))); }
static inline vf vnib_hi(vi v) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)); }
#define VSTORE _mm512_storeu_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
typedef __m256i vi;
static inline vi vload_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vf vlo(vi v) { return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))); }
static inline vf vhi(vi v) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)); }
static inline vf vload_x(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vset(float s) { return _mm256_set1_ps(s); }
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
static inline vf vnib_lo(vi v) { return vlo(v); }
static inline vf vnib_hi(vi v) { return vhi(v); }
#define VSTORE _mm256_storeu_ps
#else
#error "autopatch's int4 kernel needs AVX2 with FMA, or AVX-512"
#endif

#ifdef TABLE
#define DEQUANT_SETUP vf t[4]; for (int c = 0; c < 4; c++) t[c] = vtable(ab[c], ab[4 + c]);
#define DEQUANT(c) lo[c] = vlo_t(v, t[c]); hi[c] = vhi_t(v, t[c]);
#else
#define DEQUANT_SETUP vf a[4], b[4]; \
    for (int c = 0; c < 4; c++) { a[c] = vset(ab[c]); b[c] = vset(ab[4 + c]); }
#define DEQUANT(c) lo[c] = vfma(vlo(v), a[c], b[c]); hi[c] = vfma(vhi(v), a[c], b[c]);
#endif

/* out[r][c] = sum_k x[r, k] * (a[c, g] * q[c, k] + b[c, g]) for r < MB, c < 4, g = k / GROUP. */
#define BLOCK4(MB)                                                                                   \
    static inline void w4block##MB(int K, const float *x, const uint8_t *panel, const float *ab,  \
                                   float out[8][4]) {                                                \
        vf acc[MB][4], acc2[MB][4]; /* two chains per output: the low and the high nibbles' products */ \
        for (int r = 0; r < MB; r++) for (int c = 0; c < 4; c++) acc[r][c] = acc2[r][c] = vzero();   \
        for (int k = 0; k < K; k += GROUP, panel += 4 * HALF, ab += 8) {                             \
            _mm_prefetch((const char *)panel + PREFETCH, _MM_HINT_T0);                               \
            DEQUANT_SETUP                                                                            \
            _Pragma("GCC unroll 2") for (int h = 0; h < HALF; h += VW) {                             \
                vf lo[4], hi[4];                                                                     \
                for (int c = 0; c < 4; c++) {                                                        \
                    vi v = vload_u8(panel + c * HALF + h);                                           \
                    DEQUANT(c)                                                                       \
                }                                                                                    \
                _Pragma("GCC unroll 4") for (int r = 0; r < MB; r++) {                               \
                    const vf xl = vload_x(x + (size_t)r * K + k + h), xh = vload_x(x + (size_t)r * K + k + HALF + h); \
                    for (int c = 0; c < 4; c++) { acc[r][c] = vfma(xl, lo[c], acc[r][c]); acc2[r][c] = vfma(xh, hi[c], acc2[r][c]); } \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int r = 0; r < MB; r++) for (int c = 0; c < 4; c++) out[r][c] = vsum(acc[r][c] + acc2[r][c]); \
    }
BLOCK4(1)
BLOCK4(2)
BLOCK4(3)
BLOCK4(4)

/* 2 to 5 rows of x against one of the panel's weight rows (column c of out), a pass per weight row: 2*MB
 * accumulators, where BLOCK4(MB) keeps 8*MB (past the 32 registers at 4 rows with AVX-512, past AVX2's 16 at
 * 2). 1.3-1.7x faster at 4 to 16 rows on the embedded models' narrow weights with AVX-512
 * (docs/bench_kernels_passes.txt); AVX2: docs/bench_kernels_avx2.txt. Each out[r][c] is the sum BLOCK4(MB)
 * makes, product for product and in the same order: the same bits. */
#ifdef TABLE
#define TALL_SETUP(c) const vf t = vtable(ab[c], ab[4 + c]);
#define TALL_DEQUANT(v) const vf lo = vlo_t(v, t), hi = vhi_t(v, t);
#else
#define TALL_SETUP(c) const vf a = vset(ab[c]), b = vset(ab[4 + c]);
#define TALL_DEQUANT(v) const vf lo = vfma(vlo(v), a, b), hi = vfma(vhi(v), a, b);
#endif
#define TALL4(MB)                                                                                    \
    static inline void w4tall##MB(int K, const float *x, const uint8_t *panel, const float *ab, int c, \
                                  float out[8][4]) {                                                 \
        vf acc[MB], acc2[MB];                                                                        \
        for (int r = 0; r < MB; r++) acc[r] = acc2[r] = vzero();                                     \
        for (int k = 0; k < K; k += GROUP, panel += 4 * HALF, ab += 8) {                             \
            _mm_prefetch((const char *)panel + PREFETCH, _MM_HINT_T0);                               \
            TALL_SETUP(c)                                                                            \
            _Pragma("GCC unroll 2") for (int h = 0; h < HALF; h += VW) {                             \
                vi v = vload_u8(panel + c * HALF + h);                                               \
                TALL_DEQUANT(v)                                                                      \
                _Pragma("GCC unroll 8") for (int r = 0; r < MB; r++) {                               \
                    const vf xl = vload_x(x + (size_t)r * K + k + h), xh = vload_x(x + (size_t)r * K + k + HALF + h); \
                    acc[r] = vfma(xl, lo, acc[r]); acc2[r] = vfma(xh, hi, acc2[r]);                  \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int r = 0; r < MB; r++) out[r][c] = vsum(acc[r] + acc2[r]);                             \
    }
TALL4(2)
TALL4(3)
TALL4(4)
TALL4(5)
/* The passes read the block's rows of x once per weight row: only while those rows stay in L1 (a row of the
 * 1.5B's down-projection, K = 8960, is 35 KB, and there BLOCK4 is faster). A last block of 5 rows is one pass. */
#if VW == 16
#define TALL_X_BYTES 32768
#else /* AVX2: BLOCK4 spills its accumulators from 2 rows on, so a pass reading x from L2 is still faster */
#define TALL_X_BYTES 262144
#endif
#define TALL_FITS(mb, K) ((mb) >= 2 && (size_t)(mb) * (K) * sizeof(float) <= TALL_X_BYTES)
#define PASS_ROWS(left, K) ((left) == 5 && TALL_FITS(5, K) ? 5 : (left) < 4 ? (left) : 4)

/* x [M, K] float32, packed [ceil(N/4), K/GROUP, 4, HALF] uint8, ab [ceil(N/4), K/GROUP, 2, 4] float32,
 * bias [N] or NULL, y [M, N]. */
void autopatch_w4_matmul(int M, int N, int K, const float *x, const uint8_t *packed, const float *ab,
                         const float *bias, float *y) {
    const int panels = (N + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        const uint8_t *panel = packed + (size_t)p * 2 * K;
        const float *pab = ab + (size_t)p * 8 * (K / GROUP);
        for (int m0 = 0; m0 < M;) {
            const int mb = PASS_ROWS(M - m0, K);
            const float *xb = x + (size_t)m0 * K;
            float out[8][4];
            if (TALL_FITS(mb, K))
                for (int c = 0; c < 4; c++)
                    switch (mb) {
                        case 5: w4tall5(K, xb, panel, pab, c, out); break;
                        case 4: w4tall4(K, xb, panel, pab, c, out); break;
                        case 3: w4tall3(K, xb, panel, pab, c, out); break;
                        default: w4tall2(K, xb, panel, pab, c, out); break;
                    }
            else
            switch (mb) {
                case 4: w4block4(K, xb, panel, pab, out); break;
                case 3: w4block3(K, xb, panel, pab, out); break;
                case 2: w4block2(K, xb, panel, pab, out); break;
                default: w4block1(K, xb, panel, pab, out); break;
            }
            for (int r = 0; r < mb; r++)
                for (int c = 0; c < nb; c++)
                    y[(size_t)(m0 + r) * N + n0 + c] = out[r][c] + (bias ? bias[n0 + c] : 0.f);
            m0 += mb;
        }
    }
}

#include "store.h"

/* out[r, k] = W[n0 + r, k] for r < rows (n0 and rows multiples of 4), as float32 (autopatch_w4_dequant) or as
 * bfloat16 bits (autopatch_w4_dequant_bf16): the rows of a slice for a prefill's GEMM. a * q + b is one fused
 * multiply-add, as in the matmul. */
#define W4_DEQUANT(NAME, T, STORE)                                                                      \
    void NAME(int K, const uint8_t *packed, const float *ab, int n0, int rows, T *out) {                \
        _Pragma("omp parallel for schedule(static)")                                                    \
        for (int p = n0 / 4; p < (n0 + rows) / 4; p++) {                                                \
            const uint8_t *panel = packed + (size_t)p * 2 * K;                                          \
            const float *pab = ab + (size_t)p * 8 * (K / GROUP);                                        \
            T *dst = out + (size_t)(p * 4 - n0) * K;                                                    \
            for (int k = 0; k < K; k += GROUP, panel += 4 * HALF, pab += 8)                             \
                for (int c = 0; c < 4; c++) {                                                           \
                    const vf a = vset(pab[c]), b = vset(pab[4 + c]);                                    \
                    for (int j = 0; j < HALF; j += VW) {                                                \
                        const vi v = vload_u8(panel + c * HALF + j);                                    \
                        STORE(dst + (size_t)c * K + k + j, vfma(vnib_lo(v), a, b));                     \
                        STORE(dst + (size_t)c * K + k + HALF + j, vfma(vnib_hi(v), a, b));              \
                    }                                                                                   \
                }                                                                                       \
        }                                                                                               \
    }
W4_DEQUANT(autopatch_w4_dequant, float, vstore_f32)
W4_DEQUANT(autopatch_w4_dequant_bf16, uint16_t, vstore_bf16)
