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
 * 2 bfloat16 (a float32 weight needs no kernel: PyTorch's multiply-add patches it in one pass);
 * lohakr_loha_add also takes 0, float32, which native.py's self-check uses to compare its GEMM
 * sums with torch.bmm's bit for bit.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* Every helper is inlined where the dtype is a constant, so the inner loops carry no dtype test. */
#define INLINE static inline __attribute__((always_inline))

INLINE __m256 load8(const void *base, int64_t i, int dtype) {
    if (dtype == 0)
        return _mm256_loadu_ps((const float *)base + i);
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
    if (dtype == 0) {
        _mm256_storeu_ps((float *)base + i, x);
    } else if (dtype == 1) {
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
    if (dtype == 0)
        return ((const float *)base)[i];
    uint16_t h = ((const uint16_t *)base)[i];
    if (dtype == 1)
        return _cvtsh_ss(h);
    union { uint32_t u; float f; } bits = {(uint32_t)h << 16};
    return bits.f;
}

INLINE void store1(void *base, int64_t i, float x, int dtype) {
    if (dtype == 0)
        ((float *)base)[i] = x;
    else if (dtype == 1)
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

/* The same row kernels on 16 lanes (AVX-512 F) where the CPU has them and PyTorch uses them
 * (native.py sets `wide` through lohakr_vector_bits): the same float32 operations per element,
 * so the same bits, checked the same way; tails shorter than 16 go through the 8-lane code. The
 * library still runs on AVX2-only CPUs: only these functions use AVX-512 instructions, and only
 * when `wide` is set. They are called per run of rows (not inlined into the OpenMP regions,
 * which are compiled for AVX2). */
#define WIDE __attribute__((target("avx512f")))
#define INLINE_WIDE static inline __attribute__((always_inline, target("avx512f")))
static int wide = 0;

INLINE_WIDE __m512 load16(const void *base, int64_t i, int dtype) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    if (dtype == 1)
        return _mm512_cvtph_ps(raw);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

INLINE_WIDE void store16(void *base, int64_t i, __m512 x, int dtype) {
    __m256i *at = (__m256i *)((uint16_t *)base + i);
    if (dtype == 1) {
        _mm256_storeu_si256(at, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        return;
    }
    /* bfloat16 as store8: nearest-even in integers, NaN -> 0x7FC0, then the 16 low halves */
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(at, _mm512_cvtepi32_epi16(rounded));
}

INLINE_WIDE void run_scalar_a_wide(const void *src, void *dst, int64_t offset, int64_t n, const int dtype,
                                   float a, const float *b) {
    int64_t i = 0;
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16)
        store16(dst, offset + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(b + i), load16(src, offset + i, dtype)), dtype);
    run_scalar_a(src, dst, offset + i, n - i, dtype, a, b + i);
}

INLINE_WIDE void run_vector_a_wide(const void *src, void *dst, int64_t offset, int64_t n, const int dtype,
                                   float scale, const float *a, const float *b) {
    int64_t i = 0;
    __m512 vscale = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
        __m512 scaled = _mm512_mul_ps(vscale, _mm512_loadu_ps(a + i));
        store16(dst, offset + i, _mm512_fmadd_ps(scaled, _mm512_loadu_ps(b + i), load16(src, offset + i, dtype)),
                dtype);
    }
    run_vector_a(src, dst, offset + i, n - i, dtype, scale, a + i, b + i);
}

INLINE_WIDE void kron_row_wide(const void *src, void *dst, const int dtype, const float *w1v, const float *w2,
                               int64_t r, int64_t b, int64_t c, int64_t k) {
    const float *w1_row = w1v + (r / b) * c, *w2_row = w2 + (r % b) * k;
    for (int64_t j = 0; j < c; j++)
        run_scalar_a_wide(src, dst, (r * c + j) * k, k, dtype, w1_row[j], w2_row);
}

static WIDE __attribute__((noinline)) void kron_rows_wide(const void *src, void *dst, int dtype, const float *w1v,
                                                          const float *w2, int64_t r0, int64_t r1, int64_t b,
                                                          int64_t c, int64_t k) {
    for (int64_t r = r0; r < r1; r++) {
        if (dtype == 1)
            kron_row_wide(src, dst, 1, w1v, w2, r, b, c, k);
        else
            kron_row_wide(src, dst, 2, w1v, w2, r, b, c, k);
    }
}

static WIDE __attribute__((noinline)) void hadamard_run_wide(const void *src, void *dst, int dtype, int64_t offset,
                                                             int64_t n, float value, const float *p, const float *q) {
    if (dtype == 1)
        run_vector_a_wide(src, dst, offset, n, 1, value, p, q);
    else
        run_vector_a_wide(src, dst, offset, n, 2, value, p, q);
}

/* Rows r0 .. r1-1 of lohakr_kron_add, on 16 lanes or 8. */
INLINE void kron_rows(const void *src, void *dst, int dtype, const float *w1v, const float *w2, int64_t r0,
                      int64_t r1, int64_t b, int64_t c, int64_t k) {
    if (wide) {
        kron_rows_wide(src, dst, dtype, w1v, w2, r0, r1, b, c, k);
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        if (dtype == 1)
            kron_row(src, dst, 1, w1v, w2, r, b, c, k);
        else
            kron_row(src, dst, 2, w1v, w2, r, b, c, k);
    }
}

/* Use the 16-lane kernels when `bits` is 512 and this CPU (and its OS) has AVX-512 F; else 8
 * lanes. Returns the width now used. */
int lohakr_vector_bits(int bits) {
    wide = bits >= 512 && __builtin_cpu_supports("avx512f");
    return wide ? 512 : 256;
}

/* LoKr, a weight viewed as (a*b, c*k): row r = i*b + p gets
 *     dst[r, j*k + q] = round(fma(w1v[i, j], w2[p, q], src[r, j*k + q]))
 * where w1v = value * w1 (float32, (a, c)) and w2 is (b, k) float32: the Kronecker product is never
 * built. src and dst may be the same memory. Rows are shared among `threads` OpenMP threads (the
 * process's OpenMP runtime: PyTorch's own, so no second pool competes with its threads). */
void lohakr_kron_add(const void *src, void *dst, int dtype, const float *w1v, const float *w2,
                     int64_t rows, int64_t b, int64_t c, int64_t k, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        kron_rows(src, dst, dtype, w1v, w2, rows * me / team, rows * (me + 1) / team, b, c, k);
    }
}

/* Exactly `n` bytes of file `fd` at `offset` into `into`: 0, or -errno, or SHORT_FILE when
 * the file ends first. */
#define SHORT_FILE (-100000)
#define NOT_RESTORED (-200000)
static int64_t read_exactly(int fd, char *into, int64_t n, int64_t offset) {
    while (n > 0) {
        ssize_t got = pread(fd, into, n > 0x7FFFF000 ? 0x7FFFF000 : (size_t)n, (off_t)offset);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            return SHORT_FILE;
        into += got, n -= got, offset += got;
    }
    return 0;
}

/* lohakr_kron_add in place on a weight whose original is the file's bytes at `offset`, read in the
 * same pass (pread from the page cache: no page-table entries for a mapping of the file), a block
 * of rows at a time, patched while it is still in cache:
 * - `check` (the first write): each block is read into this thread's part of `buffer`
 *   (`buffer_bytes` each, at least one row) and compared with the weight before it is patched. One
 *   pass instead of a compare pass and a patch pass.
 *   Returns 0: every row equalled the file and is patched. 1: a row differs (the weight was cast,
 *   edited or moved since it was loaded): the weight is left exactly as it was, the rows already
 *   patched read back from the file, which they equalled.
 * - not `check` (a later write, over patched values): each block is read from the file into the
 *   weight itself, the original back, then patched. Returns 0.
 * Below 0: a read failed (-errno, or SHORT_FILE when the file ends first); with `check` the
 * weight is left as it was, unless putting patched rows back failed too (NOT_RESTORED); without
 * it, rows up to the failure hold the new values and the rest the old ones. */
int lohakr_kron_add_from_file(void *weight, int dtype, const float *w1v, const float *w2, int64_t rows,
                              int64_t b, int64_t c, int64_t k, int fd, int64_t offset, int check,
                              char *buffer, int64_t buffer_bytes, int threads) {
    const int64_t row_bytes = c * k * 2;
    int64_t block_rows = buffer_bytes / row_bytes;
    if (block_rows < 1)
        return -EINVAL;
    int64_t first[threads], patched_to[threads];
    for (int t = 0; t < threads; t++)
        first[t] = patched_to[t] = 0;
    int status = 0;
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t start = rows * me / team, stop = rows * (me + 1) / team, r = start;
        char *base = (char *)weight, *into = check ? buffer + me * buffer_bytes : NULL;
        first[me] = patched_to[me] = start;
        while (r < stop) {
            int seen;
#pragma omp atomic read
            seen = status;
            if (seen != 0)
                break;
            int64_t n = stop - r < block_rows ? stop - r : block_rows, bytes = n * row_bytes;
            int64_t failed = read_exactly(fd, check ? into : base + r * row_bytes, bytes, offset + r * row_bytes);
            int verdict = failed ? (int)failed : check && memcmp(base + r * row_bytes, into, (size_t)bytes) != 0;
            if (verdict != 0) {
#pragma omp atomic write
                status = verdict;
                break;
            }
            kron_rows(weight, weight, dtype, w1v, w2, r, r + n, b, c, k);
            r += n;
            patched_to[me] = r;
        }
    }
    if (status != 0 && check)
        for (int t = 0; t < threads; t++)
            if (patched_to[t] > first[t] &&
                read_exactly(fd, (char *)weight + first[t] * row_bytes, (patched_to[t] - first[t]) * row_bytes,
                             offset + first[t] * row_bytes) != 0)
                return NOT_RESTORED;
    return status;
}

/* File bytes and memory, `size` bytes at file offset `offset` and at `memory`, split in blocks of
 * `block_bytes` among `threads` threads (PyTorch's own OpenMP team: no second pool spinning against
 * it between kernels). With a `buffer` (`block_bytes` per thread) each block is read into this
 * thread's part of it and compared with `memory`: 0 equal, 1 a byte differs (the first difference
 * stops every thread). Without one (NULL) each block is read straight into `memory`: 0. Below 0 when
 * a read fails (-errno, or SHORT_FILE). */
int lohakr_file_blocks(int fd, int64_t offset, char *memory, int64_t size, char *buffer, int64_t block_bytes,
                       int threads) {
    int64_t blocks = (size + block_bytes - 1) / block_bytes;
    int status = 0;
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        char *mine = buffer ? buffer + me * block_bytes : NULL;
        for (int64_t block = blocks * me / team; block < blocks * (me + 1) / team; block++) {
            int seen;
#pragma omp atomic read
            seen = status;
            if (seen != 0)
                break;
            int64_t at = block * block_bytes, n = size - at < block_bytes ? size - at : block_bytes;
            int64_t failed = read_exactly(fd, mine ? mine : memory + at, n, offset + at);
            int verdict = failed ? (int)failed : mine && memcmp(memory + at, mine, (size_t)n) != 0;
            if (verdict != 0) {
#pragma omp atomic write
                status = verdict;
                break;
            }
        }
    }
    return status;
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
        if (wide)
            hadamard_run_wide(src, dst, dtype, start, len, value, p + start, q + start);
        else if (dtype == 1)
            run_vector_a(src, dst, start, len, 1, value, p + start, q + start);
        else
            run_vector_a(src, dst, start, len, 2, value, p + start, q + start);
    }
}

/* LoHa in one pass, GEMMs included: for a weight viewed as (rows, width),
 *     dst[i, j] = round(fma(value * P[i, j], Q[i, j], src[i, j])),
 *     P = A1 · B1,  Q = A2 · B2  (A: (rows, rank) at any strides, B: (rank, width), float32),
 * where each P[i, j] (and Q) is summed as PyTorch's CPU GEMM sums a rank-r product here,
 *     acc = 0;  for k in 0..r-1: acc = fma(A[i, k], B[k, j], acc)
 * so the branches never reach memory: a tile of 3 rows x 16 columns of both is kept in 12 AVX2
 * registers, multiplied, added to the weight and rounded. native.py checks these bits against
 * torch.bmm + addcmul before use (per dtype and rank), since another BLAS may order its sums
 * differently.
 *
 * B is first packed into `packed` (2 * rank * ceil(width / 16) * 16 floats, from the caller):
 * strip s, step k holds B1[k, 16s : 16s+16] then B2[k, 16s : 16s+16], zero past the width, so
 * the inner loop reads 128 contiguous bytes per step. Columns are walked in blocks whose packed
 * panel stays in the L2 cache; rows are shared among `threads` OpenMP threads. */
#define STRIP 16
#define TILE_ROWS 3
#define PANEL_BYTES (256 * 1024)

typedef struct {
    const float *a1, *a2;
    int64_t a_row_stride, a_k_stride, rank;
    const float *packed;
} LohaFactors;

INLINE void loha_store_row(const void *src, void *dst, const int dtype, __m256 vvalue, float value,
                           int64_t at, int64_t cols, __m256 p0, __m256 p1, __m256 q0, __m256 q1) {
    if (cols == STRIP) {
        store8(dst, at, _mm256_fmadd_ps(_mm256_mul_ps(vvalue, p0), q0, load8(src, at, dtype)), dtype);
        store8(dst, at + 8, _mm256_fmadd_ps(_mm256_mul_ps(vvalue, p1), q1, load8(src, at + 8, dtype)), dtype);
        return;
    }
    float p[STRIP], q[STRIP];
    _mm256_storeu_ps(p, p0);
    _mm256_storeu_ps(p + 8, p1);
    _mm256_storeu_ps(q, q0);
    _mm256_storeu_ps(q + 8, q1);
    for (int64_t c = 0; c < cols; c++)
        store1(dst, at + c, fmaf(value * p[c], q[c], load1(src, at + c, dtype)), dtype);
}

/* One rank step of one branch's 3x16 tile: row m's two accumulators += A[row m, k] * the 16 values
 * of B[k] at b (A's rows at a, a + r1, a + r2). A macro over named accumulators: arrays of
 * __m256 made GCC keep them on the stack. */
#define TILE_STEP(a, r1, r2, b, c00, c01, c10, c11, c20, c21)             \
    do {                                                                  \
        __m256 b0_ = _mm256_loadu_ps(b), b1_ = _mm256_loadu_ps((b) + 8);  \
        __m256 x_ = _mm256_broadcast_ss(a);                               \
        c00 = _mm256_fmadd_ps(x_, b0_, c00);                              \
        c01 = _mm256_fmadd_ps(x_, b1_, c01);                              \
        x_ = _mm256_broadcast_ss((a) + r1);                               \
        c10 = _mm256_fmadd_ps(x_, b0_, c10);                              \
        c11 = _mm256_fmadd_ps(x_, b1_, c11);                              \
        x_ = _mm256_broadcast_ss((a) + r2);                               \
        c20 = _mm256_fmadd_ps(x_, b0_, c20);                              \
        c21 = _mm256_fmadd_ps(x_, b1_, c21);                              \
    } while (0)

/* Rows i0 .. i0+2, strip s: both branches' 3x16 tiles in 12 registers (the last tile of a weight
 * whose row count is not a multiple of 3 repeats its last row and stores only `mr` rows), then
 * the weight update for the first `cols` (<= 16) columns from column j0. */
INLINE void loha_tile(const void *src, void *dst, const int dtype, const LohaFactors *f, float value,
                      int64_t width, int64_t i0, int64_t mr, int64_t s, int64_t j0, int64_t cols) {
    const int64_t rank = f->rank, ks = f->a_k_stride, rs = f->a_row_stride;
    const int64_t r1 = mr > 1 ? rs : 0, r2 = mr > 2 ? 2 * rs : r1;
    const float *restrict x1 = f->a1 + i0 * rs, *restrict x2 = f->a2 + i0 * rs;
    const float *restrict panel = f->packed + s * rank * 2 * STRIP;
    __m256 p00 = _mm256_setzero_ps(), p01 = p00, p10 = p00, p11 = p00, p20 = p00, p21 = p00;
    __m256 q00 = p00, q01 = p00, q10 = p00, q11 = p00, q20 = p00, q21 = p00;
    for (int64_t k = 0; k < rank; k++, panel += 2 * STRIP, x1 += ks, x2 += ks) {
        TILE_STEP(x1, r1, r2, panel, p00, p01, p10, p11, p20, p21);
        TILE_STEP(x2, r1, r2, panel + STRIP, q00, q01, q10, q11, q20, q21);
    }
    __m256 vvalue = _mm256_set1_ps(value);
    int64_t at = i0 * width + j0;
    loha_store_row(src, dst, dtype, vvalue, value, at, cols, p00, p01, q00, q01);
    if (mr > 1)
        loha_store_row(src, dst, dtype, vvalue, value, at + width, cols, p10, p11, q10, q11);
    if (mr > 2)
        loha_store_row(src, dst, dtype, vvalue, value, at + 2 * width, cols, p20, p21, q20, q21);
}

INLINE void loha_rows(const void *src, void *dst, const int dtype, const LohaFactors *f, float value,
                      int64_t width, int64_t row_start, int64_t row_stop, int64_t strip_start,
                      int64_t strip_stop) {
    for (int64_t i = row_start; i < row_stop; i += TILE_ROWS) {
        int64_t mr = row_stop - i < TILE_ROWS ? row_stop - i : TILE_ROWS;
        for (int64_t s = strip_start; s < strip_stop; s++) {
            int64_t j0 = s * STRIP, cols = width - j0 < STRIP ? width - j0 : STRIP;
            loha_tile(src, dst, dtype, f, value, width, i, mr, s, j0, cols);
        }
    }
}

void lohakr_loha_add(const void *src, void *dst, int dtype, const float *a1, const float *a2,
                     int64_t a_row_stride, int64_t a_k_stride, const float *b1, const float *b2,
                     float value, int64_t rows, int64_t width, int64_t rank, float *packed, int threads) {
    int64_t strips = (width + STRIP - 1) / STRIP;
    int64_t panel_strips = PANEL_BYTES / (rank * 2 * STRIP * (int64_t)sizeof(float));
    if (panel_strips < 1)
        panel_strips = 1;
    LohaFactors f = {a1, a2, a_row_stride, a_k_stride, rank, packed};
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t s = 0; s < strips; s++) {
            float *panel = packed + s * rank * 2 * STRIP;
            int64_t j0 = s * STRIP, cols = width - j0 < STRIP ? width - j0 : STRIP;
            for (int64_t k = 0; k < rank; k++, panel += 2 * STRIP)
                for (int64_t c = 0; c < STRIP; c++) {
                    panel[c] = c < cols ? b1[k * width + j0 + c] : 0.0f;
                    panel[STRIP + c] = c < cols ? b2[k * width + j0 + c] : 0.0f;
                }
        } /* implicit barrier: the whole panel is packed before any tile reads it */
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
        int64_t row_start = (tiles * me / team) * TILE_ROWS, row_stop = (tiles * (me + 1) / team) * TILE_ROWS;
        if (row_stop > rows)
            row_stop = rows;
        for (int64_t s0 = 0; s0 < strips; s0 += panel_strips) {
            int64_t s1 = s0 + panel_strips < strips ? s0 + panel_strips : strips;
            if (dtype == 1)
                loha_rows(src, dst, 1, &f, value, width, row_start, row_stop, s0, s1);
            else if (dtype == 2)
                loha_rows(src, dst, 2, &f, value, width, row_start, row_stop, s0, s1);
            else
                loha_rows(src, dst, 0, &f, value, width, row_start, row_stop, s0, s1);
        }
    }
}
