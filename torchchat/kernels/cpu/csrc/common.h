// Shared declarations of torchchat's CPU kernels for GGUF block-quantized weights.
//
// This header is included by every kernel translation unit, including the ones compiled for a
// specific instruction set (kern_avx2.cpp, ...). It must stay free of C++ standard library and torch
// headers: an inline function from such a header, compiled once with AVX2 enabled and once without,
// is a weak symbol the linker may pick from the AVX2 object, and would then SIGILL on an older CPU.
#pragma once
#include <stdint.h>

namespace tcc {

// ggml's type ids, as stored in the .gguf file.
enum QType : int { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

// Activations are quantized once per call to int8 in blocks of `blk` values (round to nearest,
// scale = max|x| / 127, so codes are in [-127, 127]). Per row of K values:
//   q[K] int8 codes, d[K/blk] float scales, s[K/16] int16 sums of the codes of each 16 values.
// The 16-value sums serve the offset terms of types whose codes are unsigned (Q4_0's "-8",
// Q4_1/Q4_K/Q5_K's min, Q6_K's "-32" with its two scales per 32 values).
// blk is 32, except where the SIMD tables' interleaved K-quant kernels (KernelTable::k256) run a prefill
// (kBufferedRows rows or more), which takes one scale per 256-value super-block, as llama.cpp's Q8_K
// does: a super-block's sub-block dots and integer scales then add up in int32, with one float
// multiply per super-block instead of one per sub-block (Q6_K has 16 of them).
struct ActQ {
  const int8_t* q;   // (M, K)
  const float* d;    // (M, K/blk)
  const int16_t* s;  // (M, K/16)
  int64_t K;
  int blk;           // 32 or 256
};

// From this many activation rows on, the interleaved kernels of types whose codes take work to assemble
// build them once per 16-row group (prefill); the K-quants then take activations with blk 256.
constexpr int64_t kBufferedRows = 8;

// Quantize one row of K floats (K a multiple of blk) into q, d, s as above.
typedef void (*quantize_row_fn)(const float* x, int64_t K, int blk, int8_t* q, float* d, int16_t* s);

// y[m * ldy + r] = dot(activation row m, weight row r) for r in [0, n_rows), m in [0, M).
// w points at weight row 0; rows are row_bytes apart, each holding K/QK GGUF blocks.
typedef void (*gemm_fn)(const uint8_t* w, int64_t row_bytes, int64_t n_rows, const ActQ& a,
                        int64_t M, float* y, int64_t ldy);

// Rows [0, n_rows) dequantized to out (n_rows, K) as bfloat16 bits (round to nearest even):
// the prefill path that hands the matrix product to a dense bf16 GEMM.
typedef void (*dequant_bf16_fn)(int qtype, const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t K,
                                uint16_t* out);

// Row-interleaved layouts ("x16", type id | kX16): 16 consecutive output rows stored together, block by
// block, so that one 512-bit register (or two 256-bit ones) holds the same 4 bytes of 16 rows and the
// kernels' integer dots land one row per lane: no horizontal sums, one sequential stream per 16 rows,
// and the 16 rows' scales in one load. Made once at load time (repack_x16) from rows in the file's
// layout, which unpack_x16_row restores byte for byte. Per block of 16 rows (offsets in bytes; r the
// row 0..15, i the byte 0..3 of a 4-byte chunk):
//   Q4_0 (288 = 16 x 18):  d[r] f16 @0 | qs chunk c=0..3 @32 + 64c + 4r + i = qs_r[4c + i]
//   Q4_1 (320 = 16 x 20):  d[r] f16 @0 | m[r] f16 @32 | qs chunk c=0..3 @64 + 64c + 4r + i = qs_r[4c + i]
//   Q5_0 (352 = 16 x 22):  d[r] f16 @0 | qh_r (4 bytes) @32 + 4r | qs chunk c=0..3 @96 + 64c + 4r + i
//   Q5_1 (384 = 16 x 24):  d[r] @0 | m[r] @32 | qh_r @64 + 4r | qs chunk c=0..3 @128 + 64c + 4r + i
//   Q8_0 (544 = 16 x 34):  d[r] f16 @0 | qs chunk c=0..7 @32 + 64c + 4r + i = qs_r[4c + i]
//   Q4_K (2368 = 16 x 148, 1.03x the file's 144): d[r] @0 | dmin[r] @32 | scale j=0..7 @64 + 16j + r,
//        min j @192 + 16j + r (the 6-bit values, one byte each) | qs @320 + 512p + 64c + 4r + i =
//        qs_r[32p + 4c + i], p=0..3, c=0..7
//   Q5_K (2880 = 16 x 180, 1.02x the file's 176): Q4_K's layout (its qs from the file's @48), then
//        qh @2368 + 64c + 4r + i = qh_r[4c + i], c=0..7
//   Q6_K (3360 = 16 x 210): d[r] @0 | scales s=0..15 @32 + 16s + r | ql @288 + 1024h + 64c + 4r + i =
//        ql_r[64h + 4c + i], c=0..15 | qh @2336 + 512h + 64c + 4r + i = qh_r[32h + 4c + i], c=0..7
constexpr int kX16 = 256;
static inline int base_type(int qtype) { return qtype & 0xFF; }
static inline bool is_x16(int qtype) { return (qtype & kX16) != 0; }
// Bytes per block and row of the interleaved layout (0: the type has none).
static inline int x16_block_bytes(int base) {
  switch (base) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ8_0: return 34;
    case kQ4_K: return 148;
    case kQ5_K: return 180;
    case kQ6_K: return 210;
    default: return 0;
  }
}
// 16 rows of nb blocks each (file layout, rows rb bytes apart) -> one interleaved group at out.
void repack_x16(int base, const uint8_t* rows, int64_t rb, int64_t nb, uint8_t* out);
// Row r (0..15) of an interleaved group of nb blocks -> the file's layout at out.
void unpack_x16_row(int base, const uint8_t* group, int64_t nb, int r, uint8_t* out);

// One query head of decode attention: out[D] = softmax(scale * q . k_t for t in [t0, t1]) . v_t, with
// the cached keys/values k, v (rows of D values of the element kind below) and a scratch of t1 - t0 + 1 floats.
// k_next: the keys the next call will read (same rows, another head), prefetched meanwhile; or nullptr.
enum CacheKind { kCacheF32 = 0, kCacheBF16 = 1, kCacheF16 = 2 };
typedef void (*attend_fn)(const float* q, const void* k, const void* v, int kind, int64_t D, int64_t t0, int64_t t1,
                          float scale, float* scores, float* out, const void* k_next);

struct KernelTable {
  const char* name;
  quantize_row_fn quantize_row;
  gemm_fn q4_0, q4_1, q8_0, q4_k, q5_k, q6_k;
  dequant_bf16_fn dequant_bf16;  // the SIMD tables: every type but Q5_0 / Q5_1 (the scalar one: all)
  // The interleaved layouts: w is a group, row_bytes its bytes / 16, n_rows a multiple of 16.
  gemm_fn q4_0x, q4_1x, q8_0x, q4_kx, q5_kx, q6_kx;
  attend_fn attend;
  // Q5_0 / Q5_1: the file's row layout runs only in the scalar table (nullptr in the SIMD ones: rows
  // are interleaved before the first step wherever they are a multiple of 16).
  gemm_fn q5_0, q5_1, q5_0x, q5_1x;
  bool k256;  // q4_kx / q5_kx / q6_kx take activations with blk 256 from kBufferedRows rows on (ActQ)
};

// Whether the path in use (TORCHCHAT_CPU_ISA, torchchat.kernels.cpu.set_isa) is above the scalar one.
// The fused elementwise ops (prefill_ops.cpp) take their AVX2+FMA / F16C loops only then (and where the
// CPU has them), so a scalar cap also tests their baseline loops.
bool simd_allowed();

extern const KernelTable scalar_table;
#if defined(__x86_64__) || defined(_M_X64)
extern const KernelTable avx2_table;
extern const KernelTable avx512_table;
extern const KernelTable avx512vnni_table;
#endif

// IEEE half -> float without F16C (scalar path and dequantization).
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: renormalize
      int e = -1;
      do { e++; man <<= 1; } while ((man & 0x400) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  union { uint32_t u; float f; } v;
  v.u = bits;
  return v.f;
}

static inline uint16_t read_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
static inline void k_scale_min(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Block geometry (values per block, bytes per block).
static inline int block_elems(int qtype) { return (qtype == kQ4_K || qtype == kQ5_K || qtype == kQ6_K) ? 256 : 32; }
static inline int block_bytes(int qtype) {
  switch (qtype) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ8_0: return 34;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    case kQ6_K: return 210;
    default: return 0;
  }
}

// Byte offsets inside the blocks (ggml-common.h layouts).
//   Q4_0: d f16 | qs[16]            value j: lo nibble of qs[j] (j<16), hi nibble of qs[j-16]; w = d*(q-8)
//   Q4_1: d f16 | m f16 | qs[16]    same nibbles; w = d*q + m
//   Q5_0: d f16 | qh[4] | qs[16]    value j: nibble as Q4_0 | bit j of qh (LE uint32) << 4; w = d*(q-16)
//   Q5_1: d f16 | m f16 | qh[4] | qs[16]                      as Q5_0; w = d*q + m
//   Q8_0: d f16 | qs[32] int8       w = d*q
//   Q4_K: d f16 | dmin f16 | scales[12] | qs[128]             w = d*sc_j*q - dmin*m_j
//   Q5_K: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]    q += 16 * high bit
//   Q6_K: ql[128] | qh[64] | scales[16] int8 | d f16          w = d*sc_16*(q-32)

// Dequantize one row of K values (scalar; embedding lookups and tests).
void dequantize_row(int qtype, const uint8_t* row, int64_t K, float* out);

static inline uint16_t float_to_bf16(float f) {
  union { float f; uint32_t u; } v;
  v.f = f;
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

}  // namespace tcc
