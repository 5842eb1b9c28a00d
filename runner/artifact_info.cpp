#include "artifact_info.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "errors.h"

namespace torchchat {
namespace {

using nlohmann::json;

constexpr int kFormatVersion = 1;

template <typename T>
T get_or(const json& obj, const char* key, T fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  return it->get<T>();
}

}  // namespace

ArtifactInfo parse_artifact_info(const std::string& json_text, const std::string& source) {
  json doc;
  try {
    doc = json::parse(json_text);
  } catch (const json::parse_error& e) {
    throw RunnerError(source + ": metadata is not valid JSON (" + e.what() +
                      "); re-export the model with this version of torchchat");
  }
  if (!doc.is_object()) throw RunnerError(source + ": metadata must be a JSON object; re-export the model");
  ArtifactInfo info;
  try {
    int version = get_or<int>(doc, "format_version", 0);
    if (version != kFormatVersion) {
      throw RunnerError(source + ": metadata format_version " + std::to_string(version) + ", this runner reads " +
                        std::to_string(kFormatVersion) + "; rebuild the runner or re-export the model");
    }
    info.model_name = get_or<std::string>(doc, "model_name", "");
    info.max_seq_len = get_or<int64_t>(doc, "max_seq_len", 0);
    info.dynamic_shapes = get_or<bool>(doc, "dynamic_shapes", false);
    info.device = get_or<std::string>(doc, "device", "cpu");
    info.chat_template = get_or<std::string>(doc, "chat_template", "");
    // A model whose chat template the runners cannot render ("hf") names the turn format they write instead.
    const std::string runner_format = get_or<std::string>(doc, "runner_chat_format", "");
    if (!runner_format.empty()) info.chat_template = runner_format;
    if (auto cfg = doc.find("config"); cfg != doc.end() && cfg->is_object()) {
      info.vocab_size = get_or<int64_t>(*cfg, "vocab_size", 0);
      if (info.max_seq_len == 0) info.max_seq_len = get_or<int64_t>(*cfg, "max_seq_len", 0);
    }
    auto tok = doc.find("tokenizer");
    if (tok == doc.end() || !tok->is_object()) {
      throw RunnerError(source + ": metadata has no \"tokenizer\" object; re-export the model");
    }
    info.tokenizer.kind = get_or<std::string>(*tok, "kind", "");
    info.tokenizer.bos_id = get_or<int64_t>(*tok, "bos_id", -1);
    info.tokenizer.eos_id = get_or<int64_t>(*tok, "eos_id", -1);
    info.tokenizer.stop_ids = get_or<std::vector<int64_t>>(*tok, "stop_ids", {});
  } catch (const json::exception& e) {
    throw RunnerError(source + ": metadata has a field of the wrong type (" + e.what() + "); re-export the model");
  }
  if (info.max_seq_len <= 0) throw RunnerError(source + ": metadata has no positive max_seq_len; re-export the model");
  return info;
}

ArtifactInfo read_artifact_info_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot open metadata file " + path + "; check the path given with -j");
  std::stringstream text;
  text << in.rdbuf();
  return parse_artifact_info(text.str(), path);
}

void apply_overrides(ArtifactInfo& info, const MetadataOverrides& overrides, const std::string& source) {
  if (!overrides.tokenizer_kind.empty()) {
    const std::string& kind = overrides.tokenizer_kind;
    if (kind != "sentencepiece" && kind != "tiktoken" && kind != "hf") {
      throw UsageError("-l " + kind + ": the tokenizer kind is sentencepiece, tiktoken or hf");
    }
    info.tokenizer.kind = overrides.tokenizer_kind;
  }
  if (overrides.max_seq_len > 0) {
    // The KV cache inside the artifact has the exported size: fewer positions are fine, more would
    // write past it.
    if (info.max_seq_len > 0 && overrides.max_seq_len > info.max_seq_len) {
      throw UsageError("-c " + std::to_string(overrides.max_seq_len) + ": " + source + " was exported with " +
                       std::to_string(info.max_seq_len) + " positions; pass at most that");
    }
    info.max_seq_len = overrides.max_seq_len;
  }
}

ArtifactInfo artifact_info_from_outside(const std::string& artifact, const std::string& sidecar_path,
                                        const MetadataOverrides& overrides) {
  std::string file = overrides.metadata_path;
  if (file.empty() && std::ifstream(sidecar_path).good()) file = sidecar_path;
  if (!file.empty()) {
    // Flags given on the command line win over the file (a wrong sidecar can be corrected with -l).
    ArtifactInfo info = read_artifact_info_file(file);
    apply_overrides(info, overrides, file);
    return info;
  }
  if (overrides.tokenizer_kind.empty() || overrides.max_seq_len <= 0) {
    throw UsageError(artifact + " carries no metadata and " + sidecar_path +
                     " is missing; pass -j METADATA.json, or -l sentencepiece|tiktoken|hf and -c MAX_SEQ_LEN "
                     "(the max_seq_len it was exported with)");
  }
  ArtifactInfo info;
  info.model_name = artifact;
  apply_overrides(info, overrides, artifact);
  // A tokenizer.json says nothing of the model's family: its chat format is named with -f.
  const std::string& kind = overrides.tokenizer_kind;
  info.chat_template = kind == "tiktoken" ? "llama3" : kind == "sentencepiece" ? "llama2" : "";
  return info;
}

}  // namespace torchchat
