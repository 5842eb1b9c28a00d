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
enum QType : int { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

// Activations are quantized once per call to int8 in blocks of 32 values (round to nearest,
// scale = max|x| / 127, so codes are in [-127, 127]). Per row of K values:
//   q[K] int8 codes, d[K/32] float scales, s[K/16] int16 sums of the codes of each 16 values.
// The 16-value sums serve the offset terms of types whose codes are unsigned (Q4_0's "-8",
// Q4_1/Q4_K/Q5_K's min, Q6_K's "-32" with its two scales per 32 values).
struct ActQ {
  const int8_t* q;   // (M, K)
  const float* d;    // (M, K/32)
  const int16_t* s;  // (M, K/16)
  int64_t K;
};

// Quantize one row of K floats (K a multiple of 32) into q, d, s as above.
typedef void (*quantize_row_fn)(const float* x, int64_t K, int8_t* q, float* d, int16_t* s);

// y[m * ldy + r] = dot(activation row m, weight row r) for r in [0, n_rows), m in [0, M).
// w points at weight row 0; rows are row_bytes apart, each holding K/QK GGUF blocks.
typedef void (*gemm_fn)(const uint8_t* w, int64_t row_bytes, int64_t n_rows, const ActQ& a,
                        int64_t M, float* y, int64_t ldy);

// Rows [0, n_rows) dequantized to out (n_rows, K) as bfloat16 bits (round to nearest even):
// the prefill path that hands the matrix product to a dense bf16 GEMM.
typedef void (*dequant_bf16_fn)(int qtype, const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t K,
                                uint16_t* out);

struct KernelTable {
  const char* name;
  quantize_row_fn quantize_row;
  gemm_fn q4_0, q4_1, q8_0, q4_k, q5_k, q6_k;
  dequant_bf16_fn dequant_bf16;
};

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
