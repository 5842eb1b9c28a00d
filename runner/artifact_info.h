// What an exported artifact says about itself (docs/export-metadata.md): the part of the JSON metadata
// the runners use.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torchchat {

struct TokenizerInfo {
  std::string kind;  // "sentencepiece" | "tiktoken" | "hf"
  int64_t bos_id = -1;  // -1: the tokenizer's own
  int64_t eos_id = -1;
  std::vector<int64_t> stop_ids;  // empty: the tokenizer's own stop tokens
};

struct ArtifactInfo {
  std::string model_name;
  int64_t vocab_size = 0;  // 0: unknown, taken from the logits
  int64_t max_seq_len = 0;  // positions the static KV cache holds
  bool dynamic_shapes = false;  // true: forward takes S in [1, max_seq_len] tokens (parallel prefill)
  TokenizerInfo tokenizer;
  std::string chat_template;  // chat format: "llama2" | "llama3" | "chatml" | "gemma" | "phi3" | "hf" | "" (base model)
  std::string device = "cpu";  // where the exported model runs: "cpu" or "cuda" (export's --device)
};

// What the user passes on the command line: the metadata of an artifact that carries none (an AOT
// Inductor .so without its .json sidecar), or corrections to the metadata it has (explicit flags win).
struct MetadataOverrides {
  std::string metadata_path;  // -j: a metadata JSON file
  std::string tokenizer_kind;  // -l: "sentencepiece" | "tiktoken" | "hf"
  int64_t max_seq_len = 0;  // -c
};

// Parses the metadata JSON text; `source` names where it came from, for error messages.
ArtifactInfo parse_artifact_info(const std::string& json_text, const std::string& source);

// Reads a metadata JSON file (the sidecar of a .so, or one given with -j).
ArtifactInfo read_artifact_info_file(const std::string& path);

// -l replaces the tokenizer kind; -c lowers the positions used (never above the exported max_seq_len).
// Throws UsageError for a kind the runners do not read or a -c the artifact cannot hold.
void apply_overrides(ArtifactInfo& info, const MetadataOverrides& overrides, const std::string& source);

// The metadata of `artifact`, which carries none itself: the -j file, else the sidecar `sidecar_path`
// if it exists (either corrected by -l and -c), else what -l and -c say (stop tokens and chat format then follow the tokenizer kind,
// and prompts are fed one token at a time, which every export accepts).
ArtifactInfo artifact_info_from_outside(const std::string& artifact, const std::string& sidecar_path,
                                        const MetadataOverrides& overrides);

}  // namespace torchchat
