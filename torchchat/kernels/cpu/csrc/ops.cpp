// torch operators over the kernels: registered with TORCH_LIBRARY so that eager PyTorch,
// torch.compile's generated C++ and AOT Inductor packages all reach them through the dispatcher.
// Fake (meta) implementations live in Python (torchchat/kernels/cpu/__init__.py): they must handle
// symbolic sizes, which torch.library.register_fake does for free.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace tcc {
namespace {

// ---- instruction set selection -------------------------------------------------------------

#if defined(__x86_64__) || defined(_M_X64)
// The CPU may have an extension the OS does not save on context switches (XCR0): then using it
// faults. AVX needs XCR0 bits 1-2 (SSE, YMM); AVX-512 bits 5-7 too (opmask, ZMM upper halves, ZMM16-31).
uint64_t xcr0() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // OSXSAVE
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}
bool has_avx2() {
  __builtin_cpu_init();
  return (xcr0() & 0x6) == 0x6 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && (xcr0() & 0xe6) == 0xe6 && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
bool has_avx512vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
bool has_avx512bf16() {
  unsigned a, b, c, d;
  return has_avx512() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
}
#else
bool has_avx512bf16() { return false; }
#endif

// Paths from lowest to highest; a path is usable when this CPU (and OS) supports it.
struct Path { const char* name; const KernelTable* table; bool (*supported)(); };
bool always() { return true; }
const Path kPaths[] = {
    {"scalar", &scalar_table, always},
#if defined(__x86_64__) || defined(_M_X64)
    {"avx2", &avx2_table, has_avx2},
    {"avx512", &avx512_table, has_avx512},
    {"avx512vnni", &avx512vnni_table, has_avx512vnni},
#endif
};
constexpr int kNumPaths = sizeof(kPaths) / sizeof(kPaths[0]);

std::atomic<const KernelTable*> g_table{nullptr};
std::mutex g_mu;

// The best supported path not above `wanted` (empty: no limit).
const KernelTable* choose(const std::string& wanted) {
  const KernelTable* best = &scalar_table;
  for (int i = 0; i < kNumPaths; i++) {
    if (kPaths[i].supported()) best = kPaths[i].table;
    if (!wanted.empty() && wanted == kPaths[i].name) break;
  }
  return best;
}

const KernelTable& table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t) return *t;
  std::lock_guard<std::mutex> lock(g_mu);
  t = g_table.load();
  if (!t) {
    const char* env = std::getenv("TORCHCHAT_CPU_ISA");
    t = choose(env ? env : "");
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::string isa_info() {
  std::string s = table().name;
  s += ";";
  for (int i = 0; i < kNumPaths; i++) {
    if (!kPaths[i].supported()) continue;
    if (s.back() != ';') s += ",";
    s += kPaths[i].name;
  }
  return s;
}

// Tests switch paths inside one process; "" restores the default choice.
std::string set_isa(std::string name) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_table.store(name.empty() ? nullptr : choose(name));
  }
  return isa_info();
}

// ---- prefill mode ------------------------------------------------------------------------
// With many activation rows the int8 kernels are compute bound. Where the CPU has native bf16 dot
// products (AVX512_BF16), torch's dense bf16 GEMM (oneDNN) is about twice as fast as them, so
// prefill dequantizes the weights slice by slice (a scratch of ~1 MiB, never the whole matrix) and
// calls it. TORCHCHAT_CPU_PREFILL=int8|bf16 forces one; decode (few rows) always runs int8.
constexpr int64_t kDenseMinRows = 16;
std::atomic<int> g_prefill{-1};  // -1 unset, 0 int8, 1 bf16

int prefill_mode() {
  int p = g_prefill.load();
  if (p >= 0) return p;
  const char* env = std::getenv("TORCHCHAT_CPU_PREFILL");
  if (env && std::string(env) == "int8") p = 0;
  else if (env && std::string(env) == "bf16") p = 1;
  else p = has_avx512bf16() ? 1 : 0;
  g_prefill.store(p);
  return p;
}

std::string prefill_name() { return prefill_mode() ? "bf16" : "int8"; }

std::string set_prefill(std::string mode) {
  g_prefill.store(mode == "int8" ? 0 : mode == "bf16" ? 1 : -1);
  return prefill_mode() ? "bf16" : "int8";
}

// ---- operators -----------------------------------------------------------------------------

gemm_fn gemm_for(const KernelTable& t, int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return t.q4_0;
    case kQ4_1: return t.q4_1;
    case kQ8_0: return t.q8_0;
    case kQ4_K: return t.q4_k;
    case kQ5_K: return t.q5_k;
    case kQ6_K: return t.q6_k;
    default: return nullptr;
  }
}

void check_weight(const at::Tensor& w, int64_t qtype, int64_t n, int64_t k, const char* op) {
  const int be = block_elems((int)qtype), bb = block_bytes((int)qtype);
  TORCH_CHECK(bb > 0, op, ": unsupported GGUF type ", qtype, " (supported: 2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K)");
  TORCH_CHECK(k > 0 && k % be == 0, op, ": k=", k, " must be a positive multiple of ", be, " for type ", qtype);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2, op,
              ": w must be a 2-D uint8 CPU tensor, got ", w.scalar_type(), " with ", w.dim(), " dims");
  TORCH_CHECK(w.size(0) == n && w.size(1) == k / be * bb, op, ": w has shape ", w.sizes(), ", expected (", n, ", ",
              k / be * bb, ") for type ", qtype, " and k=", k);
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) == w.size(1), op, ": w must be contiguous");
}

// x (M, k) -> (M, n) in x's dtype through bf16 weight slices and at::mm.
at::Tensor dense_prefill(const KernelTable& t, const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                         int64_t k) {
  const at::Tensor xb = x.reshape({-1, k}).to(at::kBFloat16).contiguous();
  const int64_t M = xb.size(0), rb = w.size(1);
  // ~1 MiB of bf16 per slice (L2-sized), a multiple of 16 rows.
  const int64_t slice = std::min<int64_t>(n, std::max<int64_t>(64, (1 << 19) / k / 16 * 16));
  at::Tensor buf = at::empty({slice, k}, x.options().dtype(at::kBFloat16));
  at::Tensor y = at::empty({M, n}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint16_t* bp = reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>());
  for (int64_t r0 = 0; r0 < n; r0 += slice) {
    const int64_t len = std::min(slice, n - r0);
    at::parallel_for(0, len, 16, [&](int64_t b, int64_t e) {
      t.dequant_bf16((int)qtype, wp + (r0 + b) * rb, rb, e - b, k, bp + b * k);
    });
    y.narrow(1, r0, len).copy_(at::mm(xb, buf.narrow(0, 0, len).t()));
  }
  return y;
}

at::Tensor ggml_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n, int64_t k) {
  check_weight(w, qtype, n, k, "ggml_linear");
  TORCH_CHECK(x.device().is_cpu(), "ggml_linear: x must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "ggml_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "ggml_linear: x's last dimension is ", x.size(-1), ", expected k=", k);
  const KernelTable& t = table();
  const gemm_fn gemm = gemm_for(t, qtype);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const int64_t M = x.numel() / k;
  if (M == 0) return at::empty(out_shape, x.options());
  if (M >= kDenseMinRows && prefill_mode() == 1) return dense_prefill(t, x, w, qtype, n, k).view(out_shape);
  const at::Tensor xf = x.reshape({-1, k}).to(at::kFloat).contiguous();

  // Activation rows quantized once, reused by every weight row. The scratch is per calling thread
  // and kept between calls: decode makes ~100 small calls per token, each allocation costs.
  // (Only for a few rows, so a long prefill does not leave megabytes behind in every thread.)
  thread_local std::vector<int8_t> keep_q;
  thread_local std::vector<float> keep_d;
  thread_local std::vector<int16_t> keep_s;
  std::vector<int8_t> own_q;
  std::vector<float> own_d;
  std::vector<int16_t> own_s;
  const bool keep = M <= 16;
  std::vector<int8_t>& aq = keep ? keep_q : own_q;
  std::vector<float>& ad = keep ? keep_d : own_d;
  std::vector<int16_t>& as = keep ? keep_s : own_s;
  aq.resize(M * k);
  ad.resize(M * (k / 32));
  as.resize(M * (k / 16));
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = aq.data();
  float* dp = ad.data();
  int16_t* sp = as.data();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) t.quantize_row(xp + m * k, k, qp + m * k, dp + m * (k / 32), sp + m * (k / 16));
  });
  const ActQ act{qp, dp, sp, k};

  at::Tensor y = at::empty({M, n}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t rb = w.size(1);
  // Output rows are split evenly across threads; each chunk at least ~32 KiB of weights times M so
  // that small matrices do not pay for waking threads, and a multiple of 4 rows (the kernels' tile).
  int64_t grain = (32768 / (rb * M)) + 1;
  grain = (grain + 3) / 4 * 4;
  const int64_t tiles = (n + 3) / 4;
  at::parallel_for(0, tiles, (grain + 3) / 4, [&](int64_t b, int64_t e) {
    const int64_t r0 = b * 4, r1 = std::min(n, e * 4);
    gemm(wp + r0 * rb, rb, r1 - r0, act, M, yp + r0, n);
  });
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  return y.view(out_shape);
}

at::Tensor ggml_embedding(const at::Tensor& w, const at::Tensor& ids, int64_t qtype, int64_t k, at::ScalarType dtype) {
  TORCH_CHECK(w.dim() == 2, "ggml_embedding: w must be 2-D (rows, row_bytes)");
  check_weight(w, qtype, w.size(0), k, "ggml_embedding");
  TORCH_CHECK(!at::isIntegralType(dtype, true) , "ggml_embedding: dtype must be a floating type");
  const at::Tensor idx = ids.to(at::kLong).contiguous();
  const int64_t cnt = idx.numel(), rows = w.size(0), rb = w.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < cnt; i++)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "ggml_embedding: id ", ip[i], " out of range [0, ", rows, ")");
  at::Tensor out = at::empty({cnt, k}, w.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, cnt, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) dequantize_row((int)qtype, wp + ip[i] * rb, k, op + i * k);
  });
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(k);
  return out.to(dtype).view(shape);
}

}  // namespace
}  // namespace tcc

TORCH_LIBRARY(torchchat_cpu, m) {
  m.def("ggml_linear(Tensor x, Tensor w, int qtype, int n, int k) -> Tensor");
  m.def("ggml_embedding(Tensor w, Tensor ids, int qtype, int k, ScalarType dtype) -> Tensor");
  // "chosen;supported,..." and a switch for tests; not for graphs.
  m.def("_isa_info() -> str", &tcc::isa_info);
  m.def("_set_isa(str name) -> str", &tcc::set_isa);
  m.def("_set_prefill(str mode) -> str", &tcc::set_prefill);
  m.def("_prefill_mode() -> str", &tcc::prefill_name);
}

TORCH_LIBRARY_IMPL(torchchat_cpu, CPU, m) {
  m.impl("ggml_linear", &tcc::ggml_linear);
  m.impl("ggml_embedding", &tcc::ggml_embedding);
}
