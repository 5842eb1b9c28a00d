#include "tokenizer.h"

#include <fstream>

#include "errors.h"

namespace torchchat {
namespace {

// A model exported from a GGUF file has tokenizer kind "gguf": its vocabulary lived in the GGUF's
// metadata. `torchchat.py export` writes that vocabulary beside the artifact as a SentencePiece
// <artifact>.tokenizer.model (the same ModelProto the Python loader builds from the GGUF), which is what
// the runner reads; the GGUF itself (often gigabytes, with a format of its own) is not parsed here.
std::unique_ptr<Tokenizer> load_gguf_export_tokenizer(const std::string& path) {
  char magic[4] = {};
  std::ifstream(path, std::ios::binary).read(magic, sizeof magic);
  if (std::string(magic, sizeof magic) == "GGUF") {
    throw UsageError(path + " is the GGUF file itself; pass -z <model>.tokenizer.model, the SentencePiece "
                     "vocabulary `torchchat.py export` wrote beside the exported model (a GGUF with a BPE "
                     "vocabulary has none: pass Llama 3's tokenizer.model with -l tiktoken)");
  }
  return load_sentencepiece(path);
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& kind, const std::string& path) {
  if (kind == "sentencepiece") return load_sentencepiece(path);
  if (kind == "tiktoken") return load_tiktoken(path);
  if (kind == "gguf") return load_gguf_export_tokenizer(path);
  if (kind == "hf") return load_hf_bpe(path);
  throw UsageError("unknown tokenizer kind \"" + kind + "\"; the C++ runners read sentencepiece, tiktoken, hf "
                   "(a byte-level BPE tokenizer.json) and gguf (a GGUF's vocabulary written by export)");
}

}  // namespace torchchat
