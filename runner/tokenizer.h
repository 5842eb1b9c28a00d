// Text <-> token ids for the runners: SentencePiece (Llama 2 family) and Llama 3 tiktoken BPE.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace torchchat {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text -> ids, without BOS/EOS. Special-token strings such as "<|eot_id|>" are encoded as plain text;
  // chat formats insert special tokens by id (special_id).
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;

  // The bytes token `id` contributes to the decoded text. `at_start`: it is the first token of the
  // text (SentencePiece drops the space it prefixes to the first word). Control tokens give "".
  virtual std::string decode_token(int64_t id, bool at_start) const = 0;

  // Id of a special token given as text ("<|eot_id|>", "</s>"), or -1.
  virtual int64_t special_id(const std::string& text) const = 0;

  virtual int64_t bos_id() const = 0;
  virtual int64_t eos_id() const = 0;
  // The ids that end a generation when the artifact's metadata names none.
  virtual std::vector<int64_t> default_stop_ids() const = 0;
  virtual int64_t vocab_size() const = 0;

  // decode_token over a whole sequence.
  std::string decode(const std::vector<int64_t>& ids) const {
    std::string out;
    for (size_t i = 0; i < ids.size(); ++i) out += decode_token(ids[i], i == 0);
    return out;
  }
};

// kind: "sentencepiece" (a SentencePiece .model), "tiktoken" (a Llama 3 tokenizer.model ranks file), "hf"
// (a Hugging Face tokenizer.json with a byte-level BPE model: Qwen, SmolLM, Phi-4-mini) or
// "gguf" (the <artifact>.tokenizer.model export writes for a model converted from a GGUF file).
// Throws UsageError naming the file and the kind when it cannot be read as that kind.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& kind, const std::string& path);

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);
std::unique_ptr<Tokenizer> load_tiktoken(const std::string& path);
std::unique_ptr<Tokenizer> load_hf_bpe(const std::string& path);  // a byte-level BPE tokenizer.json

}  // namespace torchchat
