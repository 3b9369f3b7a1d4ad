/* NF4 decode on the CPU: packed 4-bit codes -> code[q] * absmax[block], rounded once to bf16 (or kept in fp32).
 *
 * The same algorithm as the PyTorch path of sftfuse/kernels/nf4.py (a 16-entry code table, the fp32 product with
 * the block's scale, one round-to-nearest-even to bf16), in one pass over the bytes instead of a gather, a
 * multiply and a cast: 0.5 byte read and 2 written per value. Built at first use by sftfuse/kernels/_native.py
 * with this machine's compiler (-O3 -march=native), loaded with ctypes; without a compiler the PyTorch path runs.
 *
 * Layout (bitsandbytes): value 2j is the high nibble of byte j, value 2j+1 the low one; block b of `blocksize`
 * values (a power of two >= 32) has scale scales[b]. Every call starts on a block boundary.
 *
 * Threads: torch's OpenMP team (below). Threads of its own (pthreads) made it 1.2x slower on 2 cores, whose other
 * core torch's team keeps spinning on between ops.
 *
 * AVX-512F: 8 bytes -> 16 nibble indices, one per 32-bit lane in value order (a 64-bit lane holds byte b as
 * [b >> 4, b & 15]), looked up in the 16 fp32 codes by one vpermps, times the block's scale (computed once per
 * block), rounded by AVX512-BF16's vcvtneps2bf16 where the CPU has it, else by integer ops (both round to nearest even).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline uint16_t bf16_rne(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    b += 0x7FFFu + ((b >> 16) & 1u);  /* finite inputs only: NF4 values are */
    return (uint16_t)(b >> 16);
}

/* Block b's scale: scales[b], or with double quantization (scales NULL) nested_code[absmax[b]] *
 * nested_absmax[b / 256] + offset, as two fp32 operations in that order (the PyTorch path's `NF4Weight.scales`). */
static inline float block_scale(const float *scales, const uint8_t *absmax, const float *nested_code,
                                const float *nested_absmax, float offset, int64_t b) {
    if (scales)
        return scales[b];
    float s = nested_code[absmax[b]] * nested_absmax[b / 256];
    return s + offset;
}

/* Values [first, first + n) of the flat weight (first on a block boundary) into out_bf16 or out_f32 (the other
 * NULL; out[0] is value `first`). Scales: `scales` (fp32 per block), or NULL and the double quantization's
 * absmax (uint8 per block), nested_code (256 fp32), nested_absmax (fp32 per 256 blocks) and offset. */
static void decode_range(const uint8_t *packed, const float *scales, const uint8_t *absmax,
                         const float *nested_code, const float *nested_absmax, float offset, const float *code,
                         int64_t first, int64_t n, int64_t blocksize, uint16_t *out_bf16, float *out_f32) {
    packed += first / 2;
    const int64_t b0 = first / blocksize;
    int64_t e = 0;
#if defined(__AVX512F__)
    const __m512 codes = _mm512_loadu_ps(code);
    const __m512i lo4 = _mm512_set1_epi64(15);
#if !defined(__AVX512BF16__)
    const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
#endif
    for (int64_t b = 0; (b + 1) * blocksize <= n; b++) {  /* whole blocks: blocksize >= 32, a multiple of 16 */
        const __m512 scale = _mm512_set1_ps(block_scale(scales, absmax, nested_code, nested_absmax, offset, b0 + b));
        for (const int64_t end = e + blocksize; e < end; e += 16) {
            __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(packed + e / 2)));
            __m512i idx = _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(_mm512_and_si512(q, lo4), 32));
            __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, codes), scale);
            if (out_f32) {
                _mm512_storeu_ps(out_f32 + e, v);
            } else {
#if defined(__AVX512BF16__)
                _mm256_storeu_si256((__m256i *)(out_bf16 + e), (__m256i)_mm512_cvtneps_pbh(v));  /* RNE */
#else
                __m512i w = _mm512_castps_si512(v);
                w = _mm512_add_epi32(w, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(w, 16), one)));
                _mm256_storeu_si256((__m256i *)(out_bf16 + e), _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
#endif
            }
        }
    }
#endif
    for (; e < n; e++) {
        uint8_t byte = packed[e / 2];
        float v = code[(e & 1) ? (byte & 15) : (byte >> 4)] *
                  block_scale(scales, absmax, nested_code, nested_absmax, offset, b0 + e / blocksize);
        if (out_f32)
            out_f32[e] = v;
        else
            out_bf16[e] = bf16_rne(v);
    }
}

/* `decode_range` over `threads` OpenMP threads, cut at block boundaries. The library links libgomp.so.1, which in
 * a process that has loaded torch is torch's own OpenMP runtime (one soname, loaded once), so the work goes to the
 * thread team torch's ops already use (bitsandbytes' CPU library does the same). */
void nf4_decode(const uint8_t *packed, const float *scales, const uint8_t *absmax, const float *nested_code,
                const float *nested_absmax, float offset, const float *code, int64_t first, int64_t n,
                int64_t blocksize, uint16_t *out_bf16, float *out_f32, int threads) {
    const int64_t blocks = (n + blocksize - 1) / blocksize, per = 512; /* blocks per chunk: 16 K values and more */
    const int64_t chunks = (blocks + per - 1) / per;
    if (threads < 2 || chunks < 2) {
        decode_range(packed, scales, absmax, nested_code, nested_absmax, offset, code, first, n, blocksize,
                     out_bf16, out_f32);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t lo = c * per * blocksize, hi = (c + 1) * per * blocksize < n ? (c + 1) * per * blocksize : n;
        decode_range(packed, scales, absmax, nested_code, nested_absmax, offset, code, first + lo, hi - lo,
                     blocksize, out_bf16 ? out_bf16 + lo : NULL, out_f32 ? out_f32 + lo : NULL);
    }
}

/* The build's vector width in bytes (64 with AVX-512F, else 0): what `cpu_plan` prints. */
int nf4_decode_simd(void) {
#if defined(__AVX512F__)
    return 64;
#else
    return 0;
#endif
}
