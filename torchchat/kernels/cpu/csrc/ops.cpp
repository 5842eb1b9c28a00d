// torch operators over the kernels: registered with TORCH_LIBRARY so that eager PyTorch,
// torch.compile's generated C++ and AOT Inductor packages all reach them through the dispatcher.
// Fake (meta) implementations live in Python (torchchat/kernels/cpu/__init__.py): they must handle
// symbolic sizes, which torch.library.register_fake does for free.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
#if defined(__linux__)
#include <sys/mman.h>
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
// With many activation rows the integer kernels are compute bound. For weights in the file's row
// layout, where the CPU has native bf16 dot products (AVX512_BF16), torch's dense bf16 GEMM (oneDNN) is
// about twice as fast as them, so prefill dequantizes the weights slice by slice (a scratch of ~1 MiB,
// never the whole matrix) and calls it. The interleaved layouts' integer kernels are faster than that
// (stories110M's linears, 128 rows, 1 thread: 87-143 ms against 170-182; bench/cpu_kernels.py), so they
// keep them. TORCHCHAT_CPU_PREFILL=int8|bf16 forces one; decode (few rows) always runs int8.
constexpr int64_t kDenseMinRows = 16;
std::atomic<int> g_prefill{-1};  // -1 unset, 0 int8, 1 bf16, 2 automatic

int prefill_mode() {
  int p = g_prefill.load();
  if (p >= 0) return p;
  const char* env = std::getenv("TORCHCHAT_CPU_PREFILL");
  if (env && std::string(env) == "int8") p = 0;
  else if (env && std::string(env) == "bf16") p = 1;
  else p = 2;
  g_prefill.store(p);
  return p;
}

// Whether a prefill of a weight of this type goes through the dense bf16 GEMM.
bool dense_prefill_for(int64_t qtype) {
  const int p = prefill_mode();
  return p == 1 || (p == 2 && !is_x16((int)qtype) && has_avx512bf16());
}

std::string prefill_name() {
  const int p = prefill_mode();
  return p == 0 ? "int8" : p == 1 ? "bf16" : has_avx512bf16() ? "auto (bf16 for the file's row layout, int8 interleaved)" : "int8";
}

std::string set_prefill(std::string mode) {
  g_prefill.store(mode == "int8" ? 0 : mode == "bf16" ? 1 : -1);
  return prefill_name();
}

// ---- operators -----------------------------------------------------------------------------

gemm_fn gemm_for_table(const KernelTable& t, int64_t qtype) {
  switch (qtype) {
    case kQ5_0: return t.q5_0;
    case kQ5_1: return t.q5_1;
    case kQ5_0 | kX16: return t.q5_0x;
    case kQ5_1 | kX16: return t.q5_1x;
    case kQ4_0: return t.q4_0;
    case kQ4_1: return t.q4_1;
    case kQ8_0: return t.q8_0;
    case kQ4_K: return t.q4_k;
    case kQ5_K: return t.q5_k;
    case kQ6_K: return t.q6_k;
    case kQ4_0 | kX16: return t.q4_0x;
    case kQ4_1 | kX16: return t.q4_1x;
    case kQ8_0 | kX16: return t.q8_0x;
    case kQ4_K | kX16: return t.q4_kx;
    case kQ5_K | kX16: return t.q5_kx;
    case kQ6_K | kX16: return t.q6_kx;
    default: return nullptr;
  }
}

// The table's kernel, or the scalar one where the table has none (Q5_0 / Q5_1 in the file's row layout).
gemm_fn gemm_for(const KernelTable& t, int64_t qtype) {
  const gemm_fn f = gemm_for_table(t, qtype);
  return f ? f : gemm_for_table(scalar_table, qtype);
}

// The SIMD tables dequantize every type but Q5_0 / Q5_1, which the scalar code does.
const KernelTable& dequant_table(const KernelTable& t, int base) {
  return base == kQ5_0 || base == kQ5_1 ? scalar_table : t;
}

// Bytes per block and row of a weight of this type id (file layout or interleaved), 0 if unknown.
int layout_block_bytes(int64_t qtype) {
  if (qtype < 0 || qtype >= 2 * kX16) return 0;
  return is_x16((int)qtype) ? x16_block_bytes(base_type((int)qtype)) : block_bytes((int)qtype);
}

void check_weight(const at::Tensor& w, int64_t qtype, int64_t n, int64_t k, const char* op) {
  const int be = block_elems(base_type((int)qtype)), bb = layout_block_bytes(qtype);
  TORCH_CHECK(bb > 0, op, ": unsupported GGUF type ", qtype,
              " (supported: 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K; +256 for each interleaved)");
  TORCH_CHECK(!is_x16((int)qtype) || n % 16 == 0, op, ": an interleaved weight has a multiple of 16 rows, got ", n);
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
  const int base = base_type((int)qtype);
  const int64_t plain_rb = k / block_elems(base) * block_bytes(base);
  for (int64_t r0 = 0; r0 < n; r0 += slice) {
    const int64_t len = std::min(slice, n - r0);
    if (is_x16((int)qtype)) {  // slice and r0 are multiples of 16: whole groups
      at::parallel_for(0, len / 16, 1, [&](int64_t b, int64_t e) {
        std::vector<uint8_t> rows(16 * plain_rb);
        for (int64_t g = b; g < e; g++) {
          for (int r = 0; r < 16; r++)
            unpack_x16_row(base, wp + (r0 + 16 * g) * rb, k / block_elems(base), r, rows.data() + r * plain_rb);
          dequant_table(t, base).dequant_bf16(base, rows.data(), plain_rb, 16, k, bp + 16 * g * k);
        }
      });
    } else {
      at::parallel_for(0, len, 16, [&](int64_t b, int64_t e) {
        dequant_table(t, base).dequant_bf16((int)qtype, wp + (r0 + b) * rb, rb, e - b, k, bp + b * k);
      });
    }
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
  if (M >= kDenseMinRows && dense_prefill_for(qtype)) return dense_prefill(t, x, w, qtype, n, k).view(out_shape);
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
  const int base = base_type((int)qtype);
  const bool kquant = base == kQ4_K || base == kQ5_K || base == kQ6_K;
  const int blk = t.k256 && kquant && is_x16((int)qtype) && M >= kBufferedRows ? 256 : 32;
  aq.resize(M * k);
  ad.resize(M * (k / blk));
  as.resize(M * (k / 16));
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = aq.data();
  float* dp = ad.data();
  int16_t* sp = as.data();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) t.quantize_row(xp + m * k, k, blk, qp + m * k, dp + m * (k / blk), sp + m * (k / 16));
  });
  const ActQ act{qp, dp, sp, k, blk};

  at::Tensor y = at::empty({M, n}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t rb = w.size(1);
  // Output rows are split evenly across threads; each chunk at least ~32 KiB of weights times M so
  // that small matrices do not pay for waking threads, and a multiple of 4 rows (the kernels' tile).
  // (Interleaved weights: whole groups of 16 rows.)
  const int64_t tile = is_x16((int)qtype) ? 16 : 4;
  const int64_t tiles = (n + tile - 1) / tile;
  const int64_t grain = (32768 / (rb * M)) / tile + 1;
  at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
    const int64_t r0 = b * tile, r1 = std::min(n, e * tile);
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
  const int base = base_type((int)qtype);
  at::parallel_for(0, cnt, 8, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> row(is_x16((int)qtype) ? k / block_elems(base) * block_bytes(base) : 0);
    for (int64_t i = b; i < e; i++) {
      if (is_x16((int)qtype)) {
        unpack_x16_row(base, wp + ip[i] / 16 * 16 * rb, k / block_elems(base), (int)(ip[i] % 16), row.data());
        dequantize_row(base, row.data(), k, op + i * k);
      } else {
        dequantize_row((int)qtype, wp + ip[i] * rb, k, op + i * k);
      }
    }
  });
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(k);
  return out.to(dtype).view(shape);
}

// Decode attention: one query per sequence against the KV cache, over the positions the causal (or
// sliding-window) mask lets it see, [max(0, pos - window + 1), pos], rather than the whole cache.
// q (B, H, 1, D); k, v (B, H_kv, S_max, D) contiguous, fp32 or bf16; pos (1,), (B,) or (B, 1) int64.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                            double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, H, 1, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "decode_attention: k and v must be (B, H_kv, S_max, D) alike");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "decode_attention: the caches must be contiguous");
  const at::ScalarType ct = k.scalar_type();
  TORCH_CHECK(ct == v.scalar_type() && (ct == at::kFloat || ct == at::kBFloat16 || ct == at::kHalf),
              "decode_attention: caches must both be float32, bfloat16 or float16");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0, "decode_attention: q ", q.sizes(),
              " does not match the cache ", k.sizes());
  const at::Tensor p = pos.to(at::kLong).contiguous().view(-1);
  TORCH_CHECK(p.numel() == 1 || p.numel() == B, "decode_attention: pos must hold 1 or B positions, got ", p.numel());
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.numel(); i++)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < S, "decode_attention: position ", pp[i], " outside the cache [0, ", S, ")");
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options().dtype(at::kFloat));
  const KernelTable& t = table();
  const int kind = ct == at::kFloat ? kCacheF32 : ct == at::kBFloat16 ? kCacheBF16 : kCacheF16;
  const int64_t esize = kind == kCacheF32 ? 4 : 2;
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t longest = *std::max_element(pp, pp + p.numel()) + 1;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, longest * D * 2));
  const auto kv_offset = [&](int64_t i) { return ((i / H * Hkv + i % H / (H / Hkv)) * S) * D * esize; };
  at::parallel_for(0, B * H, grain, [&](int64_t b0, int64_t e0) {
    // The scores' scratch is kept per thread between calls (a decode step makes one call per layer).
    thread_local std::vector<float> scores;
    if ((int64_t)scores.size() < S) scores.resize(S);
    for (int64_t i = b0; i < e0; i++) {
      const int64_t b = i / H;
      const int64_t t1 = pp[p.numel() == 1 ? 0 : b];
      const int64_t t0 = window > 0 ? std::max<int64_t>(0, t1 - window + 1) : 0;
      const int64_t off = kv_offset(i);
      // The next head's keys, when it reads other ones over the same positions (same row of the batch).
      const bool next = i + 1 < e0 && (i + 1) / H == b && kv_offset(i + 1) != off;
      t.attend(qp + i * D, kp + off, vp + off, kind, D, t0, t1, (float)scale, scores.data(), op + i * D,
               next ? kp + kv_offset(i + 1) : nullptr);
    }
  });
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// Interleaved weights live in memory backed by transparent huge pages (Linux, THP "always" or
// "madvise"). A decode step streams every weight once: with 4 KiB pages the hardware prefetcher stops at
// each page boundary and every 4 KiB costs a TLB miss. Measured on a 2-vCPU EPYC, one thread, all
// linears of a Llama-3.2-1B forward (distinct weights, A/B in one process): Q4_K 39.3 -> 34.3 ms, Q4_0
// 35.3 -> 31.7, Q8_0 69.5 -> 65.3, Q6_K 48.5 -> 47.3.
//
// Most weights of a small model are under 2 MiB (stories110M's are ~1 MB), so tensors are placed one
// after another in 2 MiB-aligned chunks of at least 32 MiB: a bump allocator, a chunk unmapped when the
// last tensor in it is freed. Pages are only made resident where tensors are written, so the chunks'
// unused tails cost address space, not memory (at most the rest of one 2 MiB page per chunk).
#if defined(__linux__) && defined(MADV_HUGEPAGE)
struct HugeChunk {
  uint8_t* base;
  size_t len, used;
  int64_t refs;  // tensors alive in it, plus one while it takes new ones
};
std::mutex huge_mu;
HugeChunk* huge_open = nullptr;

void huge_release(HugeChunk* c) {  // under huge_mu
  if (--c->refs == 0) {
    munmap(c->base, c->len);
    delete c;
  }
}

HugeChunk* huge_chunk(size_t len) {
  constexpr size_t kHuge = size_t(2) << 20;
  void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = (uintptr_t)raw, aligned = (start + kHuge - 1) & ~(uintptr_t)(kHuge - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + len + kHuge;
  if (end > aligned + len) munmap((void*)(aligned + len), end - (aligned + len));
  madvise((void*)aligned, len, MADV_HUGEPAGE);  // advice only: where it fails, small pages
  return new HugeChunk{(uint8_t*)aligned, len, 0, 1};
}
#endif

at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20, kChunk = size_t(32) << 20, kAlign = 4096;
  size_t nbytes = 1;
  for (int64_t d : sizes) nbytes *= (size_t)d;
  nbytes = (nbytes + kAlign - 1) / kAlign * kAlign;
  if (nbytes > 0) {
    std::lock_guard<std::mutex> lock(huge_mu);
    if (huge_open == nullptr || huge_open->len - huge_open->used < nbytes) {
      if (huge_open != nullptr) huge_release(huge_open);  // full: no new tensors go there
      huge_open = huge_chunk(std::max(kChunk, (nbytes + kHuge - 1) / kHuge * kHuge));
    }
    if (huge_open != nullptr) {
      HugeChunk* c = huge_open;
      void* p = c->base + c->used;
      c->used += nbytes;
      c->refs++;
      return at::from_blob(p, sizes, [c](void*) {
        std::lock_guard<std::mutex> lock(huge_mu);
        if (c == huge_open && c->refs == 2) {  // its last tensor: give the chunk back rather than keep it open
          huge_open = nullptr;
          huge_release(c);
        }
        huge_release(c);
      }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

// Rows (n, k) of a weight in the file's layout -> the interleaved layout (common.h), n a multiple of 16.
at::Tensor ggml_interleave(const at::Tensor& w, int64_t qtype, int64_t k) {
  TORCH_CHECK(!is_x16((int)qtype) && x16_block_bytes((int)qtype) > 0, "ggml_interleave: type ", qtype,
              " has no interleaved layout (every supported GGUF type has one)");
  const int64_t n = w.size(0);
  check_weight(w, qtype, n, k, "ggml_interleave");
  TORCH_CHECK(n % 16 == 0, "ggml_interleave: ", n, " rows is not a multiple of 16");
  const int64_t nb = k / block_elems((int)qtype), rb = w.size(1), xrb = nb * x16_block_bytes((int)qtype);
  at::Tensor out = empty_huge({n, xrb}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / 16, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; g++) repack_x16((int)qtype, src + 16 * g * rb, rb, nb, dst + 16 * g * xrb);
  });
  return out;
}

// The inverse: an interleaved weight (type id | 256) back in the file's layout.
at::Tensor ggml_deinterleave(const at::Tensor& w, int64_t qtype, int64_t k) {
  const int64_t n = w.size(0);
  check_weight(w, qtype, n, k, "ggml_deinterleave");
  TORCH_CHECK(is_x16((int)qtype), "ggml_deinterleave: type ", qtype, " is not an interleaved layout");
  const int base = base_type((int)qtype);
  const int64_t nb = k / block_elems(base), rb = nb * block_bytes(base), xrb = w.size(1);
  at::Tensor out = at::empty({n, rb}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / 16, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; g++)
      for (int r = 0; r < 16; r++) unpack_x16_row(base, src + 16 * g * xrb, nb, r, dst + (16 * g + r) * rb);
  });
  return out;
}

}  // namespace

bool simd_allowed() { return &table() != &scalar_table; }

}  // namespace tcc

TORCH_LIBRARY(torchchat_cpu, m) {
  m.def("ggml_linear(Tensor x, Tensor w, int qtype, int n, int k) -> Tensor");
  m.def("ggml_embedding(Tensor w, Tensor ids, int qtype, int k, ScalarType dtype) -> Tensor");
  m.def("ggml_interleave(Tensor w, int qtype, int k) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos, float scale, int window) -> Tensor");
  m.def("ggml_deinterleave(Tensor w, int qtype, int k) -> Tensor");
  // "chosen;supported,..." and a switch for tests; not for graphs.
  m.def("_isa_info() -> str", &tcc::isa_info);
  m.def("_set_isa(str name) -> str", &tcc::set_isa);
  m.def("_set_prefill(str mode) -> str", &tcc::set_prefill);
  m.def("_prefill_mode() -> str", &tcc::prefill_name);
}

TORCH_LIBRARY_IMPL(torchchat_cpu, CPU, m) {
  m.impl("ggml_linear", &tcc::ggml_linear);
  m.impl("ggml_embedding", &tcc::ggml_embedding);
  m.impl("ggml_interleave", &tcc::ggml_interleave);
  m.impl("decode_attention", &tcc::decode_attention);
  m.impl("ggml_deinterleave", &tcc::ggml_deinterleave);
}
