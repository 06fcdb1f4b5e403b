/* Stores shared by w8.c and w4.c (included after each defines its vector type vf, its width VW and VSTORE):
 * VW float32 values as they are, or as bfloat16 bits rounded to nearest even, torch's float -> bfloat16
 * conversion (a NaN stays a quiet NaN), for a prefill's slices of the weight. One difference: AVX512-BF16's
 * conversion flushes a float32 subnormal (below 1.2e-38, no weight's size) to zero, where torch keeps it. */
static inline uint16_t bf16_bits(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
static inline void vstore_f32(float *p, vf v) { VSTORE(p, v); }
static inline void vstore_bf16(uint16_t *p, vf v) {
#if defined(__AVX512BF16__) && VW == 16
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); /* the same rounding, in hardware */
#else
    float t[VW];
    VSTORE(t, v);
    for (int i = 0; i < VW; i++) p[i] = bf16_bits(t[i]);
#endif
}
