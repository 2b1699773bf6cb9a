/* lohakr's optional CPU kernels (see native.py): patch a weight in one pass over its memory.
 *
 * PyTorch's CPU kernels cannot multiply-add a float32 update into a half or bfloat16 weight in one
 * pass; they widen the weight to float32, multiply-add, and narrow it again: three passes. These
 * kernels read each weight element once, do the float32 math PyTorch's addcmul does,
 *     round(fma(value * a, b, float(w)))
 * (value * a rounded to float32, then one fused multiply-add), round to the weight's dtype once
 * (nearest-even, as PyTorch), and write it. native.py checks their bits against PyTorch's own path
 * before it uses them, per dtype, so a different PyTorch build only loses speed, never bits.
 *
 * x86-64 with AVX2, FMA and F16C, and OpenMP; compiled by native.py with -ffp-contract=off, so
 * the compiler fuses nothing beyond the explicit fma below. Weight dtype codes: 1 float16,
 * 2 bfloat16 (a float32 weight needs no kernel: PyTorch's multiply-add patches it in one pass).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* Every helper is inlined where the dtype is a constant, so the inner loops carry no dtype test. */
#define INLINE static inline __attribute__((always_inline))

INLINE __m256 load8(const void *base, int64_t i, int dtype) {
    __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (dtype == 1)
        return _mm256_cvtph_ps(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

INLINE uint16_t bf16_from_float(float x) {
    union { float f; uint32_t u; } bits = {x};
    if (x != x)
        return 0x7FC0;
    return (uint16_t)((bits.u + 0x7FFFu + ((bits.u >> 16) & 1u)) >> 16);
}

INLINE void store8(void *base, int64_t i, __m256 x, int dtype) {
    if (dtype == 1) {
        _mm_storeu_si128((__m128i *)((uint16_t *)base + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    } else {
        /* nearest-even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16; NaN -> 0x7FC0 (as c10::BFloat16) */
        __m256i u = _mm256_castps_si256(x);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
        /* pack the 8 low halves: within-lane pack, then put the two lanes' halves together */
        __m256i packed = _mm256_packus_epi32(rounded, rounded);
        packed = _mm256_permute4x64_epi64(packed, 0x08);
        _mm_storeu_si128((__m128i *)((uint16_t *)base + i), _mm256_castsi256_si128(packed));
    }
}

INLINE float load1(const void *base, int64_t i, int dtype) {
    uint16_t h = ((const uint16_t *)base)[i];
    if (dtype == 1)
        return _cvtsh_ss(h);
    union { uint32_t u; float f; } bits = {(uint32_t)h << 16};
    return bits.f;
}

INLINE void store1(void *base, int64_t i, float x, int dtype) {
    if (dtype == 1)
        ((uint16_t *)base)[i] = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
    else
        ((uint16_t *)base)[i] = bf16_from_float(x);
}

/* LoKr, a run of n elements: dst[i] = round(fma(a, b[i], src[i])), one w1 entry (a = value * w1)
 * against a row of w2. */
INLINE void run_scalar_a(const void *src, void *dst, int64_t offset, int64_t n, const int dtype,
                         float a, const float *b) {
    int64_t i = 0;
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        store8(dst, offset + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(b + i), load8(src, offset + i, dtype)), dtype);
    for (; i < n; i++)
        store1(dst, offset + i, fmaf(a, b[i], load1(src, offset + i, dtype)), dtype);
}

/* LoHa, a run of n elements: dst[i] = round(fma(scale * a[i], b[i], src[i])). */
INLINE void run_vector_a(const void *src, void *dst, int64_t offset, int64_t n, const int dtype,
                         float scale, const float *a, const float *b) {
    int64_t i = 0;
    __m256 vscale = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
        __m256 scaled = _mm256_mul_ps(vscale, _mm256_loadu_ps(a + i));
        store8(dst, offset + i, _mm256_fmadd_ps(scaled, _mm256_loadu_ps(b + i), load8(src, offset + i, dtype)), dtype);
    }
    for (; i < n; i++)
        store1(dst, offset + i, fmaf(scale * a[i], b[i], load1(src, offset + i, dtype)), dtype);
}

INLINE void kron_row(const void *src, void *dst, const int dtype, const float *w1v, const float *w2,
                     int64_t r, int64_t b, int64_t c, int64_t k) {
    const float *w1_row = w1v + (r / b) * c, *w2_row = w2 + (r % b) * k;
    for (int64_t j = 0; j < c; j++)
        run_scalar_a(src, dst, (r * c + j) * k, k, dtype, w1_row[j], w2_row);
}

/* LoKr, a weight viewed as (a*b, c*k): row r = i*b + p gets
 *     dst[r, j*k + q] = round(fma(w1v[i, j], w2[p, q], src[r, j*k + q]))
 * where w1v = value * w1 (float32, (a, c)) and w2 is (b, k) float32: the Kronecker product is never
 * built. src and dst may be the same memory. Rows are shared among `threads` OpenMP threads (the
 * process's OpenMP runtime: PyTorch's own, so no second pool competes with its threads). */
void lohakr_kron_add(const void *src, void *dst, int dtype, const float *w1v, const float *w2,
                     int64_t rows, int64_t b, int64_t c, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (dtype == 1)
            kron_row(src, dst, 1, w1v, w2, r, b, c, k);
        else
            kron_row(src, dst, 2, w1v, w2, r, b, c, k);
    }
}

/* LoHa, n elements: dst[e] = round(fma(value * p[e], q[e], src[e])); p and q are the two Hadamard
 * branches of those elements, float32. Spans of SPAN elements are shared among `threads` threads. */
#define SPAN 8192
void lohakr_hadamard_add(const void *src, void *dst, int dtype, const float *p, const float *q,
                         float value, int64_t n, int threads) {
    int64_t spans = (n + SPAN - 1) / SPAN;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < spans; s++) {
        int64_t start = s * SPAN, len = n - start < SPAN ? n - start : SPAN;
        if (dtype == 1)
            run_vector_a(src, dst, start, len, 1, value, p + start, q + start);
        else
            run_vector_a(src, dst, start, len, 2, value, p + start, q + start);
    }
}
