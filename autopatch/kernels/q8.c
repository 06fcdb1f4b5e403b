/* int8 activations for autopatch's "-q8" modes: each row of x is rounded to int8 with one float32 scale per group
 * of 32 inputs (d = max|x| / 127: the Q8_0 format llama.cpp multiplies its quantized weights by), and the products
 * with the packed int4 or int8 weights are summed exactly in int32 (AVX2's vpmaddubsw and vpmaddwd, or AVX512-VNNI's
 * vpdpbusd), instead of converting every weight to float32 for every row. Per group g of weight row n:
 *   int4 (w4.c's layout, W = a q + b):  y += a[n,g] d[g] sum_k xq[k] q[n,k]  +  b[n,g] s[g]
 *   int8 (w8.c's layout, W = c w):      y += c[n,g] d[g] sum_k xq[k] w[n,k]
 * where s[g] = d[g] sum_k xq[k], the rounded group's sum: both modes multiply the weight as it is by x as rounded,
 * so the rounding error is sum_k W[n,k] e[k]. (Taking b times the exact sum instead leaves a sum_k q e[k], whose q
 * in 0..15 is centred far from the weight's zero: 2-3x the error on the 1.5B's layers, docs/quantization.md.)
 * vpmaddubsw and vpdpbusd multiply an unsigned byte by a signed one: q (0..15) as it is; an int8 weight as |w|
 * against xq carrying w's sign, whose pair sums (at most 2 * 128 * 127) fit vpmaddubsw's int16. Each row of x is
 * rounded on its own and each output sums its groups in a fixed order, so a row's result does not depend on its
 * batch, at any row count.
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
#ifndef Q8_ROWS
#define Q8_ROWS 3 /* rows of x per pass over a panel: 2 accumulators each, with the panel's 4 unpacked vectors */
#endif

#if defined(__AVX2__) && defined(__FMA__)

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* xq [M][K] int8 = round-to-nearest-even(x * (127 / max|x|)) per group, d = max|x| / 127, s = d * sum(xq) (the
 * integer sum, exact, times d); tests/test_kernels.py's reference_q8 is the rule in torch. */
void autopatch_q8_quantize(int M, int K, const float *x, int8_t *xq, float *d, float *s) {
    const int G = K / GROUP;
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *xg = x + (size_t)m * K + (size_t)g * GROUP;
            const __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8), v2 = _mm256_loadu_ps(xg + 16),
                         v3 = _mm256_loadu_ps(xg + 24);
            const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
            const float top = hmax8(amax);
            const __m256 inv = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
            const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv)),
                          q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            _mm256_storeu_si256((__m256i *)(xq + (size_t)m * K + (size_t)g * GROUP),
                                _mm256_permutevar8x32_epi32(bytes, order));
            const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
            const float dg = top / 127.f;
            d[(size_t)m * G + g] = dg;
            s[(size_t)m * G + g] = dg * hsum8(_mm256_cvtepi32_ps(sum)); /* |sum| <= 32 * 127: exact */
        }
}

static int quantized(int M, int K, const float *x, int8_t **xq, float **d, float **s) {
    const size_t G = (size_t)K / GROUP;
    *xq = malloc((size_t)M * K);
    *d = malloc(sizeof(float) * 2 * (size_t)M * G);
    if (!*xq || !*d) { free(*xq); free(*d); return -1; }
    *s = *d + (size_t)M * G;
    autopatch_q8_quantize(M, K, x, *xq, *d, *s);
    return 0;
}

/* lanes 0-3 of acc01 are weight row 0's partial sums, 4-7 row 1's (acc23: rows 2, 3) */
static inline void finish(int mb, int N, int n0, int nb, const __m256 *acc01, const __m256 *acc23,
                          const __m128 *accb, const float *bias, float *y) {
    for (int r = 0; r < mb; r++) {
        float lanes[16], extra[4];
        _mm256_storeu_ps(lanes, acc01[r]);
        _mm256_storeu_ps(lanes + 8, acc23[r]);
        _mm_storeu_ps(extra, accb[r]);
        for (int c = 0; c < nb; c++)
            y[(size_t)r * N + n0 + c] = ((lanes[4 * c] + lanes[4 * c + 1]) + (lanes[4 * c + 2] + lanes[4 * c + 3]))
                                        + extra[c] + (bias ? bias[n0 + c] : 0.f);
    }
}

static inline __m256 spread2(const float *p, int c) { /* [p[c] x4, p[c+1] x4] */
    return _mm256_setr_m128(_mm_set1_ps(p[c]), _mm_set1_ps(p[c + 1]));
}

/* AVX512-VNNI: a panel's 4 weight rows in one 512-bit register, and vpdpbusd summing each 4 byte products
 * straight into int32. Every lane holds the integer sum the AVX2 path's vpmaddubsw + vpmaddwd gives it (lanes
 * 4c..4c+3: weight row c) and goes through the same float steps, so the two paths give the same bits
 * (tests/test_kernels.py builds both). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VNNI512 1
#define W_ROWS 6 /* rows of x per pass over a panel: one accumulator each */
#define SPREAD4 _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3) /* [p[0] x4, ..., p[3] x4] */
static inline void halves(int mb, const __m512 *acc, __m256 *acc01, __m256 *acc23) { /* finish's layout */
    for (int r = 0; r < mb; r++) {
        acc01[r] = _mm512_castps512_ps256(acc[r]);
        acc23[r] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1));
    }
}
#else
#define VNNI512 0
#define W_ROWS Q8_ROWS
#endif

#if VNNI512
/* One group g of a panel: its 64 bytes of levels times each of rows m0..m0+mb-1, with the group's a (per lane) and
 * b (per weight row) already formed, added to acc / accb (bench/experiment_q4k_q8.py forms a, b another way). */
static inline void w4_q8_group(int mb, int G, int K, int g, const uint8_t *levels, __m512 a, __m128 b,
                               const int8_t *xq, const float *d, const float *s, int m0, __m512 *acc, __m128 *accb) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i v = _mm512_loadu_si512((const void *)levels);
    const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
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

static inline void w4_q8_block(int mb, int G, int K, const uint8_t *panel, const float *pab, const int8_t *xq,
                               const float *d, const float *s, int m0, __m256 *acc01, __m256 *acc23, __m128 *accb) {
    __m512 acc[W_ROWS];
    for (int r = 0; r < mb; r++) { acc[r] = _mm512_setzero_ps(); accb[r] = _mm_setzero_ps(); }
    for (int g = 0; g < G; g++, panel += 4 * HALF, pab += 8) {
        _mm_prefetch((const char *)panel + PREFETCH, _MM_HINT_T0);
        const __m512 a = _mm512_permutexvar_ps(SPREAD4, _mm512_castps128_ps512(_mm_loadu_ps(pab)));
        w4_q8_group(mb, G, K, g, panel, a, _mm_loadu_ps(pab + 4), xq, d, s, m0, acc, accb);
    }
    halves(mb, acc, acc01, acc23);
}
#else
static inline void w4_q8_block(int mb, int G, int K, const uint8_t *panel, const float *pab, const int8_t *xq,
                               const float *d, const float *s, int m0, __m256 *acc01, __m256 *acc23, __m128 *accb) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < mb; r++) { acc01[r] = acc23[r] = _mm256_setzero_ps(); accb[r] = _mm_setzero_ps(); }
    for (int g = 0; g < G; g++, panel += 4 * HALF, pab += 8) {
        _mm_prefetch((const char *)panel + PREFETCH, _MM_HINT_T0);
        const __m256i v01 = _mm256_loadu_si256((const __m256i *)panel);
        const __m256i v23 = _mm256_loadu_si256((const __m256i *)(panel + 2 * HALF));
        const __m256i lo01 = _mm256_and_si256(v01, low4), hi01 = _mm256_and_si256(_mm256_srli_epi16(v01, 4), low4);
        const __m256i lo23 = _mm256_and_si256(v23, low4), hi23 = _mm256_and_si256(_mm256_srli_epi16(v23, 4), low4);
        const __m256 a01 = spread2(pab, 0), a23 = spread2(pab, 2);
        const __m128 b = _mm_loadu_ps(pab + 4);
        for (int r = 0; r < mb; r++) {
            const int8_t *xg = xq + (size_t)(m0 + r) * K + (size_t)g * GROUP;
            const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xg));
            const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xg + HALF)));
            /* at most 2 * 2 * 15 * 127 per int16 lane */
            const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(lo01, xl), _mm256_maddubs_epi16(hi01, xh));
            const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(lo23, xl), _mm256_maddubs_epi16(hi23, xh));
            const size_t at = (size_t)(m0 + r) * G + g;
            const __m256 dv = _mm256_set1_ps(d[at]);
            acc01[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p01, ones)), _mm256_mul_ps(a01, dv), acc01[r]);
            acc23[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p23, ones)), _mm256_mul_ps(a23, dv), acc23[r]);
            accb[r] = _mm_fmadd_ps(b, _mm_set1_ps(s[at]), accb[r]);
        }
    }
}
#endif

/* w4.c's packed panels and (a, b); x float32 [M, K]. Returns 0, or -1 when memory runs out. */
int autopatch_w4_matmul_q8(int M, int N, int K, const float *x, const uint8_t *packed, const float *ab,
                           const float *bias, float *y) {
    const int G = K / GROUP, panels = (N + 3) / 4;
    int8_t *xq; float *d, *s;
    if (quantized(M, K, x, &xq, &d, &s)) return -1;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        for (int m0 = 0; m0 < M; m0 += W_ROWS) {
            const int mb = M - m0 < W_ROWS ? M - m0 : W_ROWS;
            __m256 acc01[W_ROWS], acc23[W_ROWS];
            __m128 accb[W_ROWS];
            w4_q8_block(mb, G, K, packed + (size_t)p * 2 * K, ab + (size_t)p * 8 * G, xq, d, s, m0, acc01, acc23, accb);
            finish(mb, N, n0, nb, acc01, acc23, accb, bias, y + (size_t)m0 * N);
        }
    }
    free(xq); free(d);
    return 0;
}

#if VNNI512
static inline void w8_q8_block(int mb, int G, int K, const int8_t *panel, const float *ps, const int8_t *xq,
                               const float *d, int m0, __m256 *acc01, __m256 *acc23) {
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[W_ROWS];
    for (int r = 0; r < mb; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++, panel += 8 * CH, ps += 4) {
        _mm_prefetch((const char *)panel + 2 * PREFETCH, _MM_HINT_T0); /* a group is two cache lines */
        _mm_prefetch((const char *)panel + 2 * PREFETCH + 64, _MM_HINT_T0);
        const __m512i wl = _mm512_loadu_si512((const void *)panel), wh = _mm512_loadu_si512((const void *)(panel + 4 * CH));
        const __mmask64 nl = _mm512_movepi8_mask(wl), nh = _mm512_movepi8_mask(wh); /* the negative weights */
        const __m512i ul = _mm512_abs_epi8(wl), uh = _mm512_abs_epi8(wh);
        const __m512 c = _mm512_permutexvar_ps(SPREAD4, _mm512_castps128_ps512(_mm_loadu_ps(ps)));
        for (int r = 0; r < mb; r++) {
            const int8_t *xg = xq + (size_t)(m0 + r) * K + (size_t)g * GROUP;
            const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xg));
            const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xg + CH)));
            /* |w| times x carrying w's sign (xq is never -128, so negating it is exact) */
            const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ul, _mm512_mask_sub_epi8(xl, nl, zero, xl)),
                                                    uh, _mm512_mask_sub_epi8(xh, nh, zero, xh));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(c, _mm512_set1_ps(d[(size_t)(m0 + r) * G + g])), acc[r]);
        }
    }
    halves(mb, acc, acc01, acc23);
}
#else
static inline void w8_q8_block(int mb, int G, int K, const int8_t *panel, const float *ps, const int8_t *xq,
                               const float *d, int m0, __m256 *acc01, __m256 *acc23) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < mb; r++) acc01[r] = acc23[r] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++, panel += 8 * CH, ps += 4) {
        _mm_prefetch((const char *)panel + 2 * PREFETCH, _MM_HINT_T0); /* a group is two cache lines */
        _mm_prefetch((const char *)panel + 2 * PREFETCH + 64, _MM_HINT_T0);
        /* columns 0-15 then 16-31 of the group, rows (0, 1) and (2, 3) in each 256-bit load */
        const __m256i w01l = _mm256_loadu_si256((const __m256i *)panel);
        const __m256i w23l = _mm256_loadu_si256((const __m256i *)(panel + 2 * CH));
        const __m256i w01h = _mm256_loadu_si256((const __m256i *)(panel + 4 * CH));
        const __m256i w23h = _mm256_loadu_si256((const __m256i *)(panel + 6 * CH));
        const __m256i u01l = _mm256_abs_epi8(w01l), u23l = _mm256_abs_epi8(w23l);
        const __m256i u01h = _mm256_abs_epi8(w01h), u23h = _mm256_abs_epi8(w23h);
        const __m256 c01 = spread2(ps, 0), c23 = spread2(ps, 2);
        for (int r = 0; r < mb; r++) {
            const int8_t *xg = xq + (size_t)(m0 + r) * K + (size_t)g * GROUP;
            const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xg));
            const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xg + CH)));
            /* each int16 pair sum at most 2 * 128 * 127: widened to int32 before adding the halves */
            const __m256i s01 = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(u01l, _mm256_sign_epi8(xl, w01l)), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(u01h, _mm256_sign_epi8(xh, w01h)), ones));
            const __m256i s23 = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(u23l, _mm256_sign_epi8(xl, w23l)), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(u23h, _mm256_sign_epi8(xh, w23h)), ones));
            const __m256 dv = _mm256_set1_ps(d[(size_t)(m0 + r) * G + g]);
            acc01[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s01), _mm256_mul_ps(c01, dv), acc01[r]);
            acc23[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s23), _mm256_mul_ps(c23, dv), acc23[r]);
        }
    }
}
#endif

/* w8.c's packed panels ([K/16][4][16] int8) and scales ([K/32][4]); x float32 [M, K]. */
int autopatch_w8_matmul_q8(int M, int N, int K, const float *x, const int8_t *packed, const float *scales,
                           const float *bias, float *y) {
    const int G = K / GROUP, panels = (N + 3) / 4;
    int8_t *xq; float *d, *s;
    if (quantized(M, K, x, &xq, &d, &s)) return -1;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        for (int m0 = 0; m0 < M; m0 += W_ROWS) {
            const int mb = M - m0 < W_ROWS ? M - m0 : W_ROWS;
            __m256 acc01[W_ROWS], acc23[W_ROWS];
            __m128 accb[W_ROWS];
            for (int r = 0; r < mb; r++) accb[r] = _mm_setzero_ps();
            w8_q8_block(mb, G, K, packed + (size_t)p * 4 * K, scales + (size_t)p * 4 * G, xq, d, m0, acc01, acc23);
            finish(mb, N, n0, nb, acc01, acc23, accb, bias, y + (size_t)m0 * N);
        }
    }
    free(xq); free(d);
    return 0;
}

#else
#error "autopatch's int8-activation kernel needs AVX2 with FMA"
#endif
