// The one interface run.cpp calls. model_aoti.cpp (AOT Inductor .pt2/.so) and model_et.cpp (ExecuTorch
// .pte) each implement load_model(); the build links exactly one of them into a runner binary.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "artifact_info.h"

namespace torchchat {

class Model {
 public:
  virtual ~Model() = default;

  const ArtifactInfo& info() const { return info_; }

  // Runs `tokens` (n ids) at positions [start_pos, start_pos + n) and returns the logits of the last
  // one: vocab_size floats, valid until the next call. The KV cache inside the artifact keeps the
  // earlier positions, so calls come in position order.
  virtual std::span<const float> forward(const int64_t* tokens, int64_t n, int64_t start_pos) = 0;

 protected:
  ArtifactInfo info_;
};

// Loads an artifact of the kind this binary was built for; throws UsageError/RunnerError with a hint.
std::unique_ptr<Model> load_model(const std::string& path, const MetadataOverrides& overrides);

// "aoti" or "et": which implementation is linked in (for messages and --help).
const char* backend_name();

// The artifact suffixes this backend reads, for messages (".pt2 or .so", ".pte").
const char* backend_artifacts();

}  // namespace torchchat
