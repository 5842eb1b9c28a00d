// AOT Inductor artifacts: a .pt2 package (AOTIModelPackageLoader; its metadata under key "torchchat")
// or a bare .so (AOTIModelContainerRunnerCpu; metadata from the .so.json sidecar or the command line).
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <functional>

#include "errors.h"
#include "model.h"

namespace torchchat {
namespace {

constexpr const char* kMetadataKey = "torchchat";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

class AotiModel : public Model {
 public:
  using RunFn = std::function<std::vector<at::Tensor>(std::vector<at::Tensor>&)>;

  AotiModel(ArtifactInfo info, RunFn run) : run_(std::move(run)), device_(info.device) { info_ = std::move(info); }

  std::span<const float> forward(const int64_t* tokens, int64_t n, int64_t start_pos) override {
    auto opts = at::TensorOptions().dtype(at::kLong);
    // from_blob does not copy; the inputs only need to live through run(). A CUDA model takes its
    // inputs on the GPU (`to` is a no-op on the CPU).
    std::vector<at::Tensor> inputs{
        at::from_blob(const_cast<int64_t*>(tokens), {1, n}, opts).to(device_),
        at::arange(start_pos, start_pos + n, opts).to(device_),
    };
    std::vector<at::Tensor> outputs;
    try {
      outputs = run_(inputs);
    } catch (const c10::Error& e) {
      throw RunnerError(info_.model_name + ": forward failed at position " + std::to_string(start_pos) + ": " +
                        e.what_without_backtrace());
    }
    if (outputs.size() != 1 || outputs[0].dim() != 3 || outputs[0].scalar_type() != at::kFloat) {
      throw RunnerError(info_.model_name + ": forward did not return float32 logits (1, S, vocab); re-export it");
    }
    // The sampler reads host memory: a CUDA model's last row comes back to the CPU (one vocab row).
    last_ = outputs[0].select(1, n - 1).to(at::kCPU).contiguous();  // (1, vocab)
    return {last_.data_ptr<float>(), static_cast<size_t>(last_.numel())};
  }

 private:
  RunFn run_;
  at::Device device_;
  at::Tensor last_;
};

std::unique_ptr<Model> load_package(const std::string& path, const MetadataOverrides& overrides) {
  auto loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(path);
  auto metadata = loader->get_metadata();
  auto it = metadata.find(kMetadataKey);
  if (it == metadata.end()) {
    throw UsageError(path + " has no \"" + kMetadataKey +
                     "\" metadata: it was not exported by torchchat; export it with `torchchat.py export "
                     "--output-aoti-package-path`");
  }
  ArtifactInfo info = parse_artifact_info(it->second, path);
  apply_overrides(info, overrides, path);
  if (info.model_name.empty()) info.model_name = path;
  return std::make_unique<AotiModel>(std::move(info),
                                     [loader](std::vector<at::Tensor>& in) { return loader->run(in); });
}

std::unique_ptr<Model> load_shared_library(const std::string& path, const MetadataOverrides& overrides) {
  ArtifactInfo info = artifact_info_from_outside(path, path + ".json", overrides);
  if (info.device != "cpu") {
    throw UsageError(path + " was exported for " + info.device + ": aoti_run runs GPU models from .pt2 packages; "
                     "export it with --output-aoti-package-path");
  }
  auto runner = std::make_shared<torch::inductor::AOTIModelContainerRunnerCpu>(path);
  return std::make_unique<AotiModel>(std::move(info),
                                     [runner](std::vector<at::Tensor>& in) { return runner->run(in); });
}

// Models exported from packed GGUF weights (or torchchat's CPU recipes) call torchchat's native CPU
// operators (torchchat_cpu::ggml_linear, ...), which live in their own library: the AOTI loader looks the
// operators up while it loads the model, so the library must be loaded first. Its path comes from
// $TORCHCHAT_OPS_LIBRARY (':'-separated), else the newest build in torchchat's kernel cache
// (${TORCHCHAT_CACHE:-~/.cache/torchchat}/kernels/*/torchchat_cpu_kernels.so), tried only when loading
// fails for want of those operators.
void load_ops_library(const std::string& lib) {
  if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    const char* err = dlerror();
    throw RunnerError("cannot load the operator library " + lib + ": " + (err ? err : "unknown error") +
                      "; rebuild it with `python3 -m torchchat.kernels.cpu.build`");
  }
}

bool load_ops_from_env() {
  const char* env = std::getenv("TORCHCHAT_OPS_LIBRARY");
  if (!env || !*env) return false;
  std::string list(env);
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(':', start);
    if (end == std::string::npos) end = list.size();
    if (end > start) load_ops_library(list.substr(start, end - start));
    start = end + 1;
  }
  return true;
}

std::string newest_cached_ops_library() {
  namespace fs = std::filesystem;
  fs::path cache;
  if (const char* c = std::getenv("TORCHCHAT_CACHE"); c && *c) {
    cache = c;
  } else if (const char* home = std::getenv("HOME"); home && *home) {
    cache = fs::path(home) / ".cache" / "torchchat";
  } else {
    return "";
  }
  std::error_code ec;
  fs::path best;
  fs::file_time_type best_time{};
  for (const auto& dir : fs::directory_iterator(cache / "kernels", ec)) {
    fs::path lib = dir.path() / "torchchat_cpu_kernels.so";
    if (!fs::is_regular_file(lib, ec)) continue;
    auto t = fs::last_write_time(lib, ec);
    if (best.empty() || t > best_time) best = lib, best_time = t;
  }
  return best.string();
}

std::unique_ptr<Model> load_any(const std::string& path, const MetadataOverrides& overrides) {
  if (ends_with(path, ".pt2")) return load_package(path, overrides);
  if (ends_with(path, ".so")) return load_shared_library(path, overrides);
  return nullptr;
}

}  // namespace

std::unique_ptr<Model> load_model(const std::string& path, const MetadataOverrides& overrides) {
  if (!std::filesystem::is_regular_file(path)) {
    throw UsageError("model file " + path + " not found; pass the .pt2 or .so that export wrote");
  }
  bool from_env = load_ops_from_env();
  try {
    try {
      if (auto model = load_any(path, overrides)) return model;
    } catch (const c10::Error& e) {
      std::string what = e.what_without_backtrace();
      if (from_env || what.find("torchchat_cpu") == std::string::npos) throw;
      std::string lib = newest_cached_ops_library();
      if (lib.empty()) {
        throw RunnerError(path + " runs torchchat's CPU kernels and none are built here: run `python3 -m "
                          "torchchat.kernels.cpu.build` and set TORCHCHAT_OPS_LIBRARY to the path it prints");
      }
      load_ops_library(lib);
      if (auto model = load_any(path, overrides)) return model;
    }
  } catch (const c10::Error& e) {
    throw RunnerError("cannot load " + path + ": " + e.what_without_backtrace() +
                      "; re-export it with the torch version this runner was built against");
  }
  throw UsageError(path + ": aoti_run reads AOT Inductor .pt2 packages and .so libraries; use et_run for .pte");
}

const char* backend_name() { return "aoti"; }
const char* backend_artifacts() { return ".pt2 or .so"; }

}  // namespace torchchat
