// Chat prompt formats, as token ids: Llama 2 ([INST] ... [/INST]) and Llama 3 (header tokens).
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

// name: "llama2" or "llama3" (the artifact's chat_template). Throws UsageError for "" and unknown names.
std::unique_ptr<ChatFormat> make_chat_format(const std::string& name, const Tokenizer& tokenizer);

}  // namespace torchchat
