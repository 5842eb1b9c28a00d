// Chat prompt formats, as token ids: Llama 2 ([INST] ... [/INST]), Llama 3 (header tokens), ChatML (Qwen,
// SmolLM), Gemma (<start_of_turn>) and Phi-3 / Phi-4-mini (<|user|> ... <|end|>).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tokenizer.h"

namespace torchchat {

class ChatFormat {
 public:
  virtual ~ChatFormat() = default;

  // The ids that open a conversation (BOS, the system prompt) and carry the first user message, ending
  // where the assistant's reply begins. `system` may be empty.
  virtual std::vector<int64_t> first_turn(const std::string& system, const std::string& user) const = 0;

  // The ids for a later user message, starting with the token that closes the assistant's previous reply
  // (the model samples that token but it is not yet in the KV cache).
  virtual std::vector<int64_t> next_turn(const std::string& user) const = 0;
};

inline constexpr const char* kChatFormats = "llama2|llama3|chatml|gemma|phi3";

// name: one of kChatFormats (the artifact's chat format, or -f). Throws UsageError for "", "hf" (a Jinja
// template) and unknown names, and when the tokenizer lacks the format's special tokens.
std::unique_ptr<ChatFormat> make_chat_format(const std::string& name, const Tokenizer& tokenizer);

}  // namespace torchchat
