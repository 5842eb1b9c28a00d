#include "tokenizer.h"

#include "errors.h"

namespace torchchat {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& kind, const std::string& path) {
  if (kind == "sentencepiece") return load_sentencepiece(path);
  if (kind == "tiktoken") return load_tiktoken(path);
  if (kind == "hf") {
    throw UsageError("the model uses a Hugging Face tokenizer.json, which the C++ runners do not read; "
                     "run it with `python3 torchchat.py generate` instead");
  }
  throw UsageError("unknown tokenizer kind \"" + kind + "\"; the C++ runners read sentencepiece and tiktoken");
}

}  // namespace torchchat
