/* GGUF block dequantization for the embedded models' first load (autopatch.gguf_read.dequantize): Q4_K, Q5_K,
 * Q6_K, Q4_0, Q5_0 and Q8_0 blocks to float32, bit-identical to the `gguf` package's NumPy formulas (the same
 * float32 products in the same order, never fused: fp-contract is off below), in one pass over the blocks on
 * every OpenMP thread. NumPy's version makes a dozen passes with temporaries and took 54 s of the 1.5B's first
 * load. A half is widened exactly (every float16, NaNs included, is a float32).
 */
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <omp.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

static inline float half(const uint8_t *p) {
    const uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, sig = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (sig << 13); /* infinity, NaN (payload kept, as NumPy keeps it) */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (sig << 13);
    } else if (sig == 0) {
        bits = sign;
    } else { /* subnormal half: sig * 2^-24, a normal float32 */
        int shift = 0;
        uint32_t s = sig;
        while (!(s & 0x400u)) { s <<= 1; shift++; }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((s & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* the 6-bit scales and mins of a K-quant's 8 sub-blocks (gguf's Q4_K.get_scale_min) */
static inline void scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[4 + j] & 63;
        sc[4 + j] = (s[8 + j] & 15) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
}

static void q4_k(const uint8_t *b, float *out) { /* 144 bytes: d, dmin, scales[12], qs[128] -> 256 */
    const float d = half(b), dmin = half(b + 2);
    uint8_t sc[8], mn[8];
    scale_min(b + 4, sc, mn);
    for (int s = 0; s < 8; s++) {
        const float a = d * (float)sc[s], m = dmin * (float)mn[s];
        const uint8_t *q = b + 16 + (s / 2) * 32;
        const int shift = (s & 1) * 4;
        for (int i = 0; i < 32; i++) out[s * 32 + i] = a * (float)((q[i] >> shift) & 15) - m;
    }
}

static void q5_k(const uint8_t *b, float *out) { /* 176 bytes: d, dmin, scales[12], qh[32], qs[128] -> 256 */
    const float d = half(b), dmin = half(b + 2);
    uint8_t sc[8], mn[8];
    scale_min(b + 4, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int s = 0; s < 8; s++) {
        const float a = d * (float)sc[s], m = dmin * (float)mn[s];
        const uint8_t *q = qs + (s / 2) * 32;
        const int shift = (s & 1) * 4;
        for (int i = 0; i < 32; i++) {
            const int v = ((q[i] >> shift) & 15) | (((qh[i] >> s) & 1) << 4);
            out[s * 32 + i] = a * (float)v - m;
        }
    }
}

static void q6_k(const uint8_t *b, float *out) { /* 210 bytes: ql[128], qh[64], scales[16] (int8), d -> 256 */
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = half(b + 208);
    for (int h = 0; h < 2; h++) /* value h * 128 + t * 32 + j: ql's nibble t / 2 of byte (t % 2) * 32 + j, qh's bits 2t */
        for (int t = 0; t < 4; t++) {
            const uint8_t *ql = b + h * 64 + (t % 2) * 32, *qh = b + 128 + h * 32;
            for (int half16 = 0; half16 < 2; half16++) {
                const float scale = d * (float)scales[h * 8 + t * 2 + half16];
                float *o = out + h * 128 + t * 32 + half16 * 16;
                for (int j = half16 * 16; j < half16 * 16 + 16; j++) {
                    const int lo = (ql[j] >> (4 * (t / 2))) & 15, hi = (qh[j] >> (2 * t)) & 3;
                    o[j - half16 * 16] = scale * (float)((lo | (hi << 4)) - 32);
                }
            }
        }
}

static void q4_0(const uint8_t *b, float *out) { /* 18 bytes: d, qs[16] -> 32 */
    const float d = half(b);
    for (int i = 0; i < 32; i++) out[i] = d * (float)((i < 16 ? b[2 + i] & 15 : b[2 + i - 16] >> 4) - 8);
}

static void q5_0(const uint8_t *b, float *out) { /* 22 bytes: d, qh (uint32, little-endian), qs[16] -> 32 */
    const float d = half(b);
    const uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
    for (int i = 0; i < 32; i++) {
        const int lo = i < 16 ? b[6 + i] & 15 : b[6 + i - 16] >> 4;
        out[i] = d * (float)((lo | (int)(((qh >> i) & 1u) << 4)) - 16);
    }
}

static void q8_0(const uint8_t *b, float *out) { /* 34 bytes: d, qs[32] (int8) -> 32 */
    const float d = half(b);
    for (int i = 0; i < 32; i++) out[i] = (float)((const int8_t *)(b + 2))[i] * d;
}

/* kind: 0 Q4_K, 1 Q5_K, 2 Q6_K, 3 Q4_0, 4 Q5_0, 5 Q8_0; returns -1 for an unknown kind */
int autopatch_gguf_dequant(int kind, const uint8_t *blocks, int64_t n_blocks, float *out) {
    static const int bytes[] = {144, 176, 210, 18, 22, 34}, values[] = {256, 256, 256, 32, 32, 32};
    static void (*const fns[])(const uint8_t *, float *) = {q4_k, q5_k, q6_k, q4_0, q5_0, q8_0};
    if (kind < 0 || kind > 5) return -1;
    const int size = bytes[kind], count = values[kind];
    void (*const fn)(const uint8_t *, float *) = fns[kind];
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n_blocks; i++) fn(blocks + (size_t)i * size, out + (size_t)i * count);
    return 0;
}

/* autopatch.kernels.quantize_affine4, bit-identical to its torch operations (the same float32 operations on each
 * group of 32, never fused; rintf rounds half to even as torch.round does), one pass per group: w [groups][32]
 * -> q [groups][32] in 0..15, a and b [groups]. Groups on a 4-bit grid (a weight dequantized from Q4_K) get
 * the finest step (max - min) / s, s = 15..1, on which every weight lies within 1e-3 of a level. */
void autopatch_affine4(const float *w, int64_t groups, uint8_t *q, float *a, float *b) {
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const float *x = w + (size_t)g * 32;
        float low = x[0], high = x[0], offset[32];
        for (int i = 1; i < 32; i++) {
            low = x[i] < low ? x[i] : low;
            high = x[i] > high ? x[i] : high;
        }
        float span = high - low;
        span = span < 1e-30f ? 1e-30f : span;
        for (int i = 0; i < 32; i++) offset[i] = x[i] - low;
        float levels = 15.0f;
        for (int steps = 15; steps > 0; steps--) {
            const float scale = (float)steps / span;
            float worst = 0.0f;
            for (int i = 0; i < 32; i++) {
                const float pos = offset[i] * scale, miss = fabsf(pos - rintf(pos));
                worst = miss > worst ? miss : worst;
            }
            if (worst < 1e-3f) {
                levels = (float)steps;
                break;
            }
        }
        const float step = span / levels;
        for (int i = 0; i < 32; i++) {
            const float level = rintf(offset[i] / step);
            q[(size_t)g * 32 + i] = (uint8_t)(level < 0.0f ? 0.0f : level > 15.0f ? 15.0f : level);
        }
        a[g] = step;
        b[g] = low;
    }
}

/* autopatch.kernels.quantize_groups, bit-identical to its torch operations: per group of 32, scale =
 * max(absmax, 1e-12) / 127 and q = round-half-even(w / scale) clamped to -127..127. */
void autopatch_groups8(const float *w, int64_t groups, int8_t *q, float *scales) {
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const float *x = w + (size_t)g * 32;
        float top = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float v = fabsf(x[i]);
            top = v > top ? v : top;
        }
        const float scale = (top < 1e-12f ? 1e-12f : top) / 127.0f;
        for (int i = 0; i < 32; i++) {
            const float level = rintf(x[i] / scale);
            q[(size_t)g * 32 + i] = (int8_t)(level < -127.0f ? -127.0f : level > 127.0f ? 127.0f : level);
        }
        scales[g] = scale;
    }
}
