// ExecuTorch programs (.pte): the runtime, optimized CPU kernels, quantized kernels and the XNNPACK
// delegate from the executorch wheel. Metadata comes from the program's constant methods.
#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include <cstdio>
#include <filesystem>
#include <optional>
#include <vector>

#include "errors.h"
#include "model.h"

namespace torchchat {
namespace {

namespace et = executorch::runtime;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::extension::MallocMemoryAllocator;
using executorch::extension::MmapDataLoader;

constexpr const char* kMetadataMethod = "torchchat_metadata";

// The runtime logs CPU probing at Info level on every start; keep errors only, on stderr.
void log_errors_only(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t, const char* message,
                     size_t length) {
  if (level == kError || level == kFatal) std::fprintf(stderr, "executorch: %.*s\n", static_cast<int>(length), message);
}

std::string error_name(et::Error e) { return "ExecuTorch error " + std::to_string(static_cast<int>(e)); }

// A loaded method with the memory it runs in: planned buffers sized from the program, a malloc-backed
// allocator for the method's own bookkeeping and for kernels' scratch.
class LoadedMethod {
 public:
  LoadedMethod(const et::Program& program, const char* name, const std::string& path) {
    auto meta = program.method_meta(name);
    if (!meta.ok()) {
      throw RunnerError(path + " has no method \"" + name + "\": it was not exported by torchchat; re-export it");
    }
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
      buffers_.emplace_back(static_cast<size_t>(meta->memory_planned_buffer_size(i).get()));
    }
    for (auto& b : buffers_) spans_.emplace_back(b.data(), b.size());
    planned_.emplace(et::Span<et::Span<uint8_t>>(spans_.data(), spans_.size()));
    memory_.emplace(&method_allocator_, &*planned_, &temp_allocator_);
    auto method = program.load_method(name, &*memory_);
    if (!method.ok()) {
      throw RunnerError("cannot load method \"" + std::string(name) + "\" of " + path + " (" +
                        error_name(method.error()) +
                        "); was it exported with operators or a delegate this runner lacks?");
    }
    method_.emplace(std::move(*method));
  }

  et::Method& get() { return *method_; }

 private:
  MallocMemoryAllocator method_allocator_;
  MallocMemoryAllocator temp_allocator_;
  std::vector<std::vector<uint8_t>> buffers_;
  std::vector<et::Span<uint8_t>> spans_;
  std::optional<et::HierarchicalAllocator> planned_;
  std::optional<et::MemoryManager> memory_;
  std::optional<et::Method> method_;
};

std::string read_metadata(const et::Program& program, const std::string& path) {
  LoadedMethod method(program, kMetadataMethod, path);
  et::Error err = method.get().execute();
  if (err != et::Error::Ok) throw RunnerError(path + ": " + kMetadataMethod + " failed (" + error_name(err) + ")");
  const et::EValue& out = method.get().get_output(0);
  if (!out.isTensor() || out.toTensor().scalar_type() != ScalarType::Byte) {
    throw RunnerError(path + ": " + kMetadataMethod + " does not return a uint8 tensor; re-export the model");
  }
  const Tensor& t = out.toTensor();
  return std::string(reinterpret_cast<const char*>(t.const_data_ptr<uint8_t>()), t.numel());
}

class EtModel : public Model {
 public:
  EtModel(const std::string& path, const MetadataOverrides& overrides) {
    et::register_pal(et::PalImpl::create(log_errors_only, __FILE__));
    et::runtime_init();
    auto loader = MmapDataLoader::from(path.c_str());
    if (!loader.ok()) throw UsageError("cannot open " + path + " (" + error_name(loader.error()) + ")");
    loader_.emplace(std::move(*loader));
    auto program = et::Program::load(&*loader_);
    if (!program.ok()) {
      throw UsageError(path + " is not an ExecuTorch program this runtime reads (" + error_name(program.error()) +
                       "); export it with `torchchat.py export --output-pte-path`");
    }
    program_.emplace(std::move(*program));
    info_ = parse_artifact_info(read_metadata(*program_, path), path);
    apply_overrides(info_, overrides, path);
    if (info_.model_name.empty()) info_.model_name = path;
    forward_.emplace(*program_, "forward", path);
  }

  std::span<const float> forward(const int64_t* tokens, int64_t n, int64_t start_pos) override {
    positions_.resize(n);
    for (int64_t i = 0; i < n; ++i) positions_[i] = start_pos + i;
    // The inputs are not memory-planned (alloc_graph_input=False): set_input points them at our data.
    TensorImpl::SizesType token_sizes[2] = {1, static_cast<TensorImpl::SizesType>(n)};
    TensorImpl::DimOrderType token_order[2] = {0, 1};
    TensorImpl::SizesType pos_sizes[1] = {static_cast<TensorImpl::SizesType>(n)};
    TensorImpl::DimOrderType pos_order[1] = {0};
    TensorImpl token_impl(ScalarType::Long, 2, token_sizes, const_cast<int64_t*>(tokens), token_order);
    TensorImpl pos_impl(ScalarType::Long, 1, pos_sizes, positions_.data(), pos_order);
    et::Method& m = forward_->get();
    check(m.set_input(et::EValue(Tensor(&token_impl)), 0), "setting tokens", start_pos);
    check(m.set_input(et::EValue(Tensor(&pos_impl)), 1), "setting input_pos", start_pos);
    check(m.execute(), "forward", start_pos);
    const et::EValue& out = m.get_output(0);
    if (!out.isTensor() || out.toTensor().scalar_type() != ScalarType::Float || out.toTensor().dim() != 3) {
      throw RunnerError(info_.model_name + ": forward did not return float32 logits (1, S, vocab); re-export it");
    }
    const Tensor& logits = out.toTensor();
    const int64_t vocab = logits.size(2);
    return {logits.const_data_ptr<float>() + (logits.size(1) - 1) * vocab, static_cast<size_t>(vocab)};
  }

 private:
  void check(et::Error err, const char* what, int64_t pos) const {
    if (err != et::Error::Ok) {
      throw RunnerError(info_.model_name + ": " + what + " failed at position " + std::to_string(pos) + " (" +
                        error_name(err) + ")");
    }
  }

  std::optional<MmapDataLoader> loader_;
  std::optional<et::Program> program_;
  std::optional<LoadedMethod> forward_;
  std::vector<int64_t> positions_;
};

}  // namespace

std::unique_ptr<Model> load_model(const std::string& path, const MetadataOverrides& overrides) {
  if (!std::filesystem::is_regular_file(path)) {
    throw UsageError("model file " + path + " not found; pass the .pte that export wrote");
  }
  if (path.size() < 4 || path.compare(path.size() - 4, 4, ".pte") != 0) {
    throw UsageError(path + ": et_run reads ExecuTorch .pte programs; use aoti_run for .pt2 and .so");
  }
  return std::make_unique<EtModel>(path, overrides);
}

const char* backend_name() { return "et"; }
const char* backend_artifacts() { return ".pte"; }

}  // namespace torchchat
