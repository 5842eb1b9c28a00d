// Fused elementwise operators for the eager CPU forward: RMSNorm, RoPE (on the queries; on the keys
// together with the KV-cache write) and SwiGLU. A stories15M prefill of 128 tokens spent about two
// thirds of its time outside the matrix products, in ~3000 small aten ops (RoPE's broadcast muls alone
// ~2 ms of 13), each a separate pass over its operands plus its dispatch. Each operator here is one pass.
//
// Plain C++ built for the baseline instruction set (the compiler vectorizes the float loops with
// SSE2), so it runs on every CPU that loads the library. The two hot loops that gain from more (SiLU's
// exp, float16 conversion) have a second version in a function compiled for AVX2+FMA / F16C alone,
// chosen at run time by what the CPU and OS support; an ISA cap of `scalar` keeps the baseline loops.
// Every result is rounded to the activations' dtype at the points where the PyTorch code it replaces
// rounds (torchchat/model/transformer.py, rope.py), so bf16 and float16 models give the same values up
// to the order of a sum (RMSNorm) and the exp (SiLU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace tcc {
namespace {

// Rows per task so that each holds about this many values: the inputs are small (a 128-token
// stories15M prefill is 37k values per norm), and waking a thread costs more than ~16k values' work.
constexpr int64_t kGrainValues = 16384;
int64_t grain_rows(int64_t row_values) { return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, row_values)); }

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", s);
}

// Calls f with a value of the tensor's element type (float, c10::BFloat16 or c10::Half).
template <typename F>
void with_type(at::ScalarType s, F&& f) {
  if (s == at::kFloat) f(float{});
  else if (s == at::kBFloat16) f(c10::BFloat16{});
  else f(c10::Half{});
}

// Rounds a float to T's precision and back (the dtype conversions the PyTorch code makes).
template <typename T>
inline float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }

// ---- RMSNorm ------------------------------------------------------------------------------------
// out = (x * rsqrt(mean(x^2) + eps)), rounded to x's dtype, times weight: RMSNorm.forward, whose
// normalization runs in float32 and whose weight multiply in x's dtype.
template <typename T, typename W>
void rms_norm_rows(const T* x, const W* w, T* out, int64_t rows, int64_t D, float eps) {
  std::vector<float> xf(D);
  for (int64_t r = 0; r < rows; r++) {
    const T* xr = x + r * D;
    for (int64_t i = 0; i < D; i++) xf[i] = static_cast<float>(xr[i]);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: a reduction the compiler vectorizes
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
      for (int j = 0; j < 8; j++) acc[j] += xf[i + j] * xf[i + j];
    float ss = 0;
    for (; i < D; i++) ss += xf[i] * xf[i];
    for (int j = 0; j < 8; j++) ss += acc[j];
    const float inv = 1.0f / std::sqrt(ss / (float)D + eps);
    T* o = out + r * D;
    for (int64_t k = 0; k < D; k++) o[k] = static_cast<T>(round_to<T>(xf[k] * inv) * static_cast<float>(w[k]));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(x, "rms_norm", "x");
  check_float(weight, "rms_norm", "weight");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight ", weight.sizes(),
              " does not match x ", x.sizes());
  // (A weight of another dtype promotes the product in PyTorch: callers keep that case in PyTorch.)
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight (", weight.scalar_type(),
              ") must have x's dtype (", x.scalar_type(), ")");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t D = x.size(-1), rows = D ? xc.numel() / D : 0;
  with_type(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc.data_ptr<T>();
    const T* wp = wc.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(D), [&](int64_t b, int64_t e) {
      rms_norm_rows<T, T>(xp + b * D, wp, op + b * D, e - b, D, (float)eps);
    });
  });
  return out;
}

// ---- RoPE ---------------------------------------------------------------------------------------
// Adjacent pairs (x0, x1) of the first R values of a head rotate by the table's (cos, sin) of the
// token's position; the rest of the head is copied (partial rotary). As apply_rope: in float32, then
// rounded to x's dtype.
template <typename T>
inline void rotate_head(const T* x, const float* cs, int64_t R, int64_t D, float* out) {
  for (int64_t i = 0; i < R / 2; i++) {
    const float x0 = static_cast<float>(x[2 * i]), x1 = static_cast<float>(x[2 * i + 1]);
    const float c = cs[2 * i], s = cs[2 * i + 1];
    out[2 * i] = round_to<T>(x0 * c - x1 * s);
    out[2 * i + 1] = round_to<T>(x1 * c + x0 * s);
  }
  for (int64_t i = R; i < D; i++) out[i] = static_cast<float>(x[i]);
}

// The table rows of each (b, s): (S, R/2, 2) shared by the batch rows, or (B, S, R/2, 2) per row.
struct RopeTable {
  at::Tensor t;  // contiguous float32
  int64_t R = 0;
  bool per_row = false;
  const float* row(int64_t b, int64_t s, int64_t S) const {
    return t.data_ptr<float>() + ((per_row ? b * S : 0) + s) * R;
  }
};

RopeTable rope_table(const at::Tensor& table, int64_t rope_dim, int64_t B, int64_t S, int64_t D, const char* op) {
  RopeTable rt;
  rt.R = rope_dim;
  if (rope_dim == 0) return rt;  // a layer without RoPE (NoPE): the table is not read
  TORCH_CHECK(rope_dim > 0 && rope_dim % 2 == 0 && rope_dim <= D, op, ": rope_dim ", rope_dim,
              " must be even and at most the head dim ", D);
  TORCH_CHECK(table.device().is_cpu(), op, ": the table must be a CPU tensor");
  const bool shared = table.dim() == 3 && table.size(0) == S;
  rt.per_row = table.dim() == 4 && table.size(0) == B && table.size(1) == S;
  TORCH_CHECK((shared || rt.per_row) && table.size(-2) == rope_dim / 2 && table.size(-1) == 2, op, ": table ",
              table.sizes(), " must be (S, rope_dim/2, 2) or (B, S, rope_dim/2, 2) for S=", S, ", B=", B,
              ", rope_dim=", rope_dim);
  rt.t = table.to(at::kFloat).contiguous();
  return rt;
}

void check_heads(const at::Tensor& x, const char* op, const char* name) {
  check_float(x, op, name);
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be (B, S, H, D), got ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1, op, ": ", name, "'s head dimension must be contiguous");
}

// x (B, S, H, D), any strides with contiguous heads (the view of a stacked q|k|v projection) ->
// rotated, contiguous (B, S, H, D) in x's dtype.
at::Tensor rope(const at::Tensor& x, const at::Tensor& table, int64_t rope_dim) {
  check_heads(x, "rope", "x");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  const RopeTable rt = rope_table(table, rope_dim, B, S, D, "rope");
  at::Tensor out = at::empty({B, S, H, D}, x.options());
  with_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, B * S, grain_rows(H * D), [&](int64_t b0, int64_t e0) {
      std::vector<float> buf(D);
      for (int64_t i = b0; i < e0; i++) {
        const int64_t b = i / S, s = i % S;
        const float* cs = rope_dim ? rt.row(b, s, S) : nullptr;
        for (int64_t h = 0; h < H; h++) {
          rotate_head<T>(xp + b * x.stride(0) + s * x.stride(1) + h * x.stride(2), cs, rope_dim, D, buf.data());
          T* o = op + ((i * H) + h) * D;
          for (int64_t j = 0; j < D; j++) o[j] = static_cast<T>(buf[j]);
        }
      }
    });
  });
  return out;
}

// ---- float -> cache element conversion -----------------------------------------------------------
// Writing a float16 cache converts every key and value: c10::Half's portable conversion does not
// vectorize (~1.5 ns a value, most of a stories15M kv_update), F16C's does 8 at a time. The F16C code is
// compiled for that extension alone, in this function, and called only where the CPU (and OS) has it.
#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx,f16c"))) void floats_to_half_f16c(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  if (i < n) {  // the tail through one padded vector (no out-of-line helper compiled for F16C)
    float in[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint16_t out[8];
    std::memcpy(in, x + i, (n - i) * sizeof(float));
    _mm_storeu_si128((__m128i*)out, _mm256_cvtps_ph(_mm256_loadu_ps(in), _MM_FROUND_TO_NEAREST_INT));
    std::memcpy(y + i, out, (n - i) * sizeof(uint16_t));
  }
}
bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");  // avx: OS saves YMM
  return yes;
}
#endif

template <typename C>
void store_floats(const float* x, C* y, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (std::is_same_v<C, c10::Half>) {
    if (has_f16c() && simd_allowed()) return floats_to_half_f16c(x, reinterpret_cast<uint16_t*>(y), n);
  }
#endif
  for (int64_t j = 0; j < n; j++) y[j] = static_cast<C>(x[j]);
}

// ---- RoPE on the keys + the KV-cache write --------------------------------------------------------
// k, v (B, S, H_kv, D) for cache rows [row, row + B); pos (S,) shared or (B, S) per row. Writes
// k_cache[row + b, h, pos, :] = rope(k[b, s, h, :]) and v_cache[...] = v[b, s, h, :], each rounded
// first to k's dtype (apply_rope's type_as) and then to the cache's (KVCache.update's .to()).
template <typename T, typename C>
void write_kv(const at::Tensor& k, const at::Tensor& v, const RopeTable& rt, const int64_t* pp, bool pos_per_row,
              at::Tensor& kc, at::Tensor& vc, int64_t row) {
  const int64_t B = k.size(0), S = k.size(1), H = k.size(2), D = k.size(3), Smax = kc.size(2);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  C* kcp = kc.data_ptr<C>();
  C* vcp = vc.data_ptr<C>();
  at::parallel_for(0, B * S, grain_rows(2 * H * D), [&](int64_t b0, int64_t e0) {
    std::vector<float> buf(D);
    for (int64_t i = b0; i < e0; i++) {
      const int64_t b = i / S, s = i % S;
      const int64_t p = pp[pos_per_row ? i : s];
      const float* cs = rt.R ? rt.row(b, s, S) : nullptr;
      for (int64_t h = 0; h < H; h++) {
        const int64_t dst = (((row + b) * H + h) * Smax + p) * D;
        rotate_head<T>(kp + b * k.stride(0) + s * k.stride(1) + h * k.stride(2), cs, rt.R, D, buf.data());
        store_floats<C>(buf.data(), kcp + dst, D);
        const T* vr = vp + b * v.stride(0) + s * v.stride(1) + h * v.stride(2);
        for (int64_t j = 0; j < D; j++) buf[j] = static_cast<float>(vr[j]);
        store_floats<C>(buf.data(), vcp + dst, D);
      }
    }
  });
}

void kv_update(const at::Tensor& k, const at::Tensor& v, const at::Tensor& table, int64_t rope_dim,
               const at::Tensor& pos, at::Tensor& k_cache, at::Tensor& v_cache, int64_t row) {
  const char* op = "kv_update";
  check_heads(k, op, "k");
  check_heads(v, op, "v");
  TORCH_CHECK(k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), op, ": k ", k.sizes(), " and v ",
              v.sizes(), " must match in shape and dtype");
  check_float(k_cache, op, "k_cache");
  const int64_t B = k.size(0), S = k.size(1), H = k.size(2), D = k.size(3);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              op, ": the caches must be alike (B_max, H_kv, S_max, D)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  TORCH_CHECK(k_cache.size(1) == H && k_cache.size(3) == D && row >= 0 && row + B <= k_cache.size(0), op, ": k ",
              k.sizes(), " at row ", row, " does not fit the cache ", k_cache.sizes());
  const RopeTable rt = rope_table(table, rope_dim, B, S, D, op);
  const at::Tensor p = pos.to(at::kLong).contiguous();
  const bool per_row = p.dim() == 2;
  TORCH_CHECK((p.dim() == 1 && p.size(0) == S) || (per_row && p.size(0) == B && p.size(1) == S), op, ": pos ",
              p.sizes(), " must be (S,) or (B, S) for B=", B, ", S=", S);
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t Smax = k_cache.size(2);
  for (int64_t i = 0; i < p.numel(); i++)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < Smax, op, ": position ", pp[i], " outside the cache [0, ", Smax, ")");
  with_type(k.scalar_type(), [&](auto ktag) {
    using T = decltype(ktag);
    with_type(k_cache.scalar_type(), [&](auto ctag) {
      using C = decltype(ctag);
      write_kv<T, C>(k, v, rt, pp, per_row, k_cache, v_cache, row);
    });
  });
}

// ---- SwiGLU -------------------------------------------------------------------------------------
// exp(x) for a SiLU: Cody-Waite range reduction to r in [-ln2/2, ln2/2] and a degree-6 Taylor
// polynomial (relative error ~2e-7, a couple of float ulps), 2^n from the exponent bits. Written on
// GCC/Clang vector types: with scalar code and -O3 GCC 12 turned the clamps into branches and left the
// loop scalar (4-5 ns a value, a SwiGLU as slow as torch's two ops). VF is 4 floats (SSE2, the
// baseline) or 8 (AVX2 + FMA, in a function compiled for them alone and called where the CPU has them).
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

template <typename VF, typename VI>
__attribute__((always_inline)) inline VF expv(VF x) {
  const VF lo = VF{} - 87.0f, hi = VF{} + 88.0f;
  // Clamped by bit masks (a vector comparison gives all-ones lanes): GCC and Clang both take these,
  // while a vector ?: is newer in Clang.
  VI below = x < lo, above = x > hi;
  x = (VF)(((VI)lo & below) | ((VI)x & ~below));
  x = (VF)(((VI)hi & above) | ((VI)x & ~above));
  const VF magic = VF{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const VF t = x * 1.44269504f + magic;
  const VF n = t - magic;
  const VF r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  VF p = VF{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = ((VI)t - 0x4B400000 + 127) << 23;  // t's low bits hold n; 0x4B400000 is magic's bit pattern
  return p * (VF)bits;
}

// g[i] = silu(g[i]) = g[i] / (1 + exp(-g[i])), in place.
template <typename VF, typename VI>
__attribute__((always_inline)) inline void silu_loop(float* g, int64_t n) {
  constexpr int64_t L = sizeof(VF) / sizeof(float);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    VF x;
    std::memcpy(&x, g + i, sizeof(x));
    x = x / (1.0f + expv<VF, VI>(-x));
    std::memcpy(g + i, &x, sizeof(x));
  }
  if (i < n) {  // the tail through one padded vector
    VF x = {};
    std::memcpy(&x, g + i, (n - i) * sizeof(float));
    x = x / (1.0f + expv<VF, VI>(-x));
    std::memcpy(g + i, &x, (n - i) * sizeof(float));
  }
}

#if defined(__x86_64__) || defined(_M_X64)
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
__attribute__((target("avx2,fma"))) void silu_avx2(float* g, int64_t n) { silu_loop<v8f, v8i>(g, n); }
bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // OS YMM state checked too
  return yes;
}
#endif

void silu_inplace(float* g, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  if (has_avx2_fma() && simd_allowed()) return silu_avx2(g, n);
#endif
  silu_loop<v4f, v4i>(g, n);
}

// x (..., 2H), the stacked w1|w3 projection -> silu(x[..., :H]) * x[..., H:], (..., H), in x's dtype:
// FeedForward's `F.silu(gate) * up` (SiLU in float32 rounded to x's dtype, then the product).
at::Tensor silu_mul(const at::Tensor& x) {
  check_float(x, "silu_mul", "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_mul: the last dimension must be even (gate | up), got ",
              x.sizes());
  const at::Tensor xc = x.contiguous();
  const int64_t H = x.size(-1) / 2, rows = H ? xc.numel() / (2 * H) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = H;
  at::Tensor out = at::empty(shape, x.options());
  with_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(2 * H), [&](int64_t b, int64_t e) {
      std::vector<float> g(H);
      for (int64_t r = b; r < e; r++) {
        const T* gate = xp + r * 2 * H;
        const T* up = gate + H;
        for (int64_t i = 0; i < H; i++) g[i] = static_cast<float>(gate[i]);
        silu_inplace(g.data(), H);
        T* o = op + r * H;
        for (int64_t i = 0; i < H; i++) o[i] = static_cast<T>(round_to<T>(g[i]) * static_cast<float>(up[i]));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace tcc

TORCH_LIBRARY_FRAGMENT(torchchat_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor table, int rope_dim) -> Tensor");
  m.def("kv_update(Tensor k, Tensor v, Tensor table, int rope_dim, Tensor pos, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int row) -> ()");
  m.def("silu_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat_cpu, CPU, m) {
  m.impl("rms_norm", &tcc::rms_norm);
  m.impl("rope", &tcc::rope);
  m.impl("kv_update", &tcc::kv_update);
  m.impl("silu_mul", &tcc::silu_mul);
}
