// Portable reference kernels: the same integer formulation as the SIMD paths (int8 activations in
// blocks of 32, integer dot per block, fp32 accumulation of scaled block dots), written plainly.
// Used where no SIMD path runs and as the reference the SIMD paths are tested against.
#include <vector>

#include "common.h"

namespace tcc {
namespace {

// One 32-value sub-block of a weight row, decoded: w_i = ws * sub[i/16] * code_i, plus offsets
// off0 (values 0..15) and off1 (16..31) that multiply the activations' 16-value sums.
struct Sub {
  int code[32];
  int sub[2];
  float ws, off0, off1;
};

void decode_sub(int qtype, const uint8_t* row, int64_t g, Sub& o) {
  o.sub[0] = o.sub[1] = 1;
  o.ws = o.off0 = o.off1 = 0.f;
  switch (qtype) {
    case kQ4_0: {
      const uint8_t* b = row + g * 18;
      float d = half_to_float(read_u16(b));
      for (int i = 0; i < 16; i++) { o.code[i] = b[2 + i] & 0xF; o.code[i + 16] = b[2 + i] >> 4; }
      o.ws = d; o.off0 = o.off1 = -8.f * d;
      break;
    }
    case kQ4_1: {
      const uint8_t* b = row + g * 20;
      float d = half_to_float(read_u16(b)), m = half_to_float(read_u16(b + 2));
      for (int i = 0; i < 16; i++) { o.code[i] = b[4 + i] & 0xF; o.code[i + 16] = b[4 + i] >> 4; }
      o.ws = d; o.off0 = o.off1 = m;
      break;
    }
    case kQ5_0:
    case kQ5_1: {
      const bool one = qtype == kQ5_1;
      const uint8_t* b = row + g * (one ? 24 : 22);
      const float d = half_to_float(read_u16(b));
      const uint8_t* qh = b + (one ? 4 : 2);
      const uint32_t h = (uint32_t)qh[0] | ((uint32_t)qh[1] << 8) | ((uint32_t)qh[2] << 16) | ((uint32_t)qh[3] << 24);
      const uint8_t* qs = qh + 4;
      for (int i = 0; i < 16; i++) {
        o.code[i] = (qs[i] & 0xF) | (((h >> i) & 1) << 4);
        o.code[i + 16] = (qs[i] >> 4) | (((h >> (i + 16)) & 1) << 4);
      }
      o.ws = d;
      o.off0 = o.off1 = one ? half_to_float(read_u16(b + 2)) : -16.f * d;
      break;
    }
    case kQ8_0: {
      const uint8_t* b = row + g * 34;
      for (int i = 0; i < 32; i++) o.code[i] = (int8_t)b[2 + i];
      o.ws = half_to_float(read_u16(b)); o.off0 = o.off1 = 0.f;
      break;
    }
    case kQ4_K:
    case kQ5_K: {
      const int bb = qtype == kQ4_K ? 144 : 176;
      const uint8_t* b = row + (g / 8) * bb;
      const int t = (int)(g % 8);
      float d = half_to_float(read_u16(b)), dmin = half_to_float(read_u16(b + 2));
      int sc, mn;
      k_scale_min(t, b + 4, &sc, &mn);
      const uint8_t* qs = b + (qtype == kQ4_K ? 16 : 48) + 32 * (t / 2);
      for (int i = 0; i < 32; i++) o.code[i] = (t & 1) ? (qs[i] >> 4) : (qs[i] & 0xF);
      if (qtype == kQ5_K) {
        const uint8_t* qh = b + 16;
        for (int i = 0; i < 32; i++) o.code[i] += ((qh[i] >> t) & 1) << 4;
      }
      o.ws = d * sc; o.off0 = o.off1 = -dmin * mn;
      break;
    }
    case kQ6_K: {
      const uint8_t* b = row + (g / 8) * 210;
      const int t = (int)(g % 8), h = t / 4, i4 = t % 4;
      const uint8_t* ql = b + 64 * h + (i4 & 1) * 32;
      const uint8_t* qh = b + 128 + 32 * h;
      const int8_t* sc = (const int8_t*)(b + 192);
      float d = half_to_float(read_u16(b + 208));
      for (int i = 0; i < 32; i++) {
        int lo = (i4 < 2) ? (ql[i] & 0xF) : (ql[i] >> 4);
        o.code[i] = lo | (((qh[i] >> (2 * i4)) & 3) << 4);
      }
      o.sub[0] = sc[2 * t]; o.sub[1] = sc[2 * t + 1];
      o.ws = d; o.off0 = -32.f * d * o.sub[0]; o.off1 = -32.f * d * o.sub[1];
      break;
    }
  }
}

void quantize_row_scalar(const float* x, int64_t K, int blk, int8_t* q, float* d, int16_t* s) {
  for (int64_t b = 0; b < K / blk; b++) {
    const float* xb = x + blk * b;
    float amax = 0.f;
    for (int i = 0; i < blk; i++) { float v = xb[i] < 0 ? -xb[i] : xb[i]; amax = v > amax ? v : amax; }
    float db = amax / 127.f, id = amax > 0 ? 127.f / amax : 0.f;
    d[b] = db;
    for (int j = 0; j < blk / 16; j++) {
      int sum = 0;
      for (int i = 16 * j; i < 16 * j + 16; i++) {
        float v = xb[i] * id;
        int c = (int)(v < 0 ? v - 0.5f : v + 0.5f);
        c = c > 127 ? 127 : (c < -127 ? -127 : c);
        q[blk * b + i] = (int8_t)c;
        sum += c;
      }
      s[blk / 16 * b + j] = (int16_t)sum;
    }
  }
}

template <int QT>
void gemm_scalar(const uint8_t* w, int64_t row_bytes, int64_t n_rows, const ActQ& a, int64_t M, float* y,
                 int64_t ldy) {
  const int64_t K = a.K, nb = K / 32;
  Sub sub;
  for (int64_t r = 0; r < n_rows; r++) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t m = 0; m < M; m++) y[m * ldy + r] = 0.f;
    for (int64_t g = 0; g < nb; g++) {
      decode_sub(QT, row, g, sub);
      for (int64_t m = 0; m < M; m++) {
        const int8_t* aq = a.q + m * K + 32 * g;
        int d0 = 0, d1 = 0;
        for (int i = 0; i < 16; i++) d0 += sub.code[i] * aq[i];
        for (int i = 16; i < 32; i++) d1 += sub.code[i] * aq[i];
        const float da = a.d[m * nb + g];
        const int16_t* as = a.s + m * 2 * nb + 2 * g;
        y[m * ldy + r] += da * (sub.ws * (float)(d0 * sub.sub[0] + d1 * sub.sub[1]) + sub.off0 * as[0] +
                                sub.off1 * as[1]);
      }
    }
  }
}

}  // namespace

void dequantize_row(int qtype, const uint8_t* row, int64_t K, float* out) {
  Sub sub;
  for (int64_t g = 0; g < K / 32; g++) {
    decode_sub(qtype, row, g, sub);
    for (int i = 0; i < 32; i++)
      out[32 * g + i] = sub.ws * sub.sub[i / 16] * sub.code[i] + (i < 16 ? sub.off0 : sub.off1);
  }
}

namespace {
void dequant_bf16_scalar(int qtype, const uint8_t* w, int64_t rb, int64_t n_rows, int64_t K, uint16_t* out) {
  float buf[256];
  for (int64_t r = 0; r < n_rows; r++) {
    Sub sub;
    for (int64_t g = 0; g < K / 32; g++) {
      decode_sub(qtype, w + r * rb, g, sub);
      for (int i = 0; i < 32; i++)
        buf[i] = sub.ws * sub.sub[i / 16] * sub.code[i] + (i < 16 ? sub.off0 : sub.off1);
      for (int i = 0; i < 32; i++) out[r * K + 32 * g + i] = float_to_bf16(buf[i]);
    }
  }
}

// Interleaved groups: each group's 16 rows are restored to the file's layout and run as above, which
// keeps this path the plain reference the SIMD ones are checked against.
template <int QT>
void gemm_scalar_x16(const uint8_t* w, int64_t row_bytes, int64_t n_rows, const ActQ& a, int64_t M, float* y,
                     int64_t ldy) {
  const int64_t nb = a.K / block_elems(QT), rb = nb * block_bytes(QT);
  std::vector<uint8_t> rows(16 * rb);
  for (int64_t g = 0; g < n_rows / 16; g++) {
    const uint8_t* group = w + g * 16 * row_bytes;
    for (int r = 0; r < 16; r++) unpack_x16_row(QT, group, nb, r, rows.data() + r * rb);
    gemm_scalar<QT>(rows.data(), rb, 16, a, M, y + 16 * g, ldy);
  }
}
inline float cache_value(const void* p, int kind, int64_t i) {
  if (kind == kCacheF32) return ((const float*)p)[i];
  if (kind == kCacheF16) return half_to_float(((const uint16_t*)p)[i]);
  union { uint32_t u; float f; } v;
  v.u = (uint32_t)((const uint16_t*)p)[i] << 16;
  return v.f;
}

void attend_scalar(const float* q, const void* k, const void* v, int kind, int64_t D, int64_t t0, int64_t t1,
                   float scale, float* scores, float* out, const void* /*k_next*/) {
  float mx = -3.0e38f;
  for (int64_t t = t0; t <= t1; t++) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; d++) dot += q[d] * cache_value(k, kind, t * D + d);
    scores[t - t0] = dot * scale;
    if (scores[t - t0] > mx) mx = scores[t - t0];
  }
  float sum = 0.f;
  for (int64_t t = t0; t <= t1; t++) sum += (scores[t - t0] = __builtin_expf(scores[t - t0] - mx));
  for (int64_t d = 0; d < D; d++) out[d] = 0.f;
  for (int64_t t = t0; t <= t1; t++) {
    const float p = scores[t - t0] / sum;
    for (int64_t d = 0; d < D; d++) out[d] += p * cache_value(v, kind, t * D + d);
  }
}
}  // namespace

const KernelTable scalar_table = {
    "scalar", quantize_row_scalar, gemm_scalar<kQ4_0>, gemm_scalar<kQ4_1>, gemm_scalar<kQ8_0>,
    gemm_scalar<kQ4_K>, gemm_scalar<kQ5_K>, gemm_scalar<kQ6_K>, dequant_bf16_scalar,
    gemm_scalar_x16<kQ4_0>, gemm_scalar_x16<kQ4_1>, gemm_scalar_x16<kQ8_0>, gemm_scalar_x16<kQ4_K>,
    gemm_scalar_x16<kQ5_K>, gemm_scalar_x16<kQ6_K>,
    attend_scalar,
    gemm_scalar<kQ5_0>, gemm_scalar<kQ5_1>, gemm_scalar_x16<kQ5_0>, gemm_scalar_x16<kQ5_1>,
    false,
};

}  // namespace tcc
