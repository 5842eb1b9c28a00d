#include "chat_format.h"

#include <map>

#include "errors.h"

namespace torchchat {
namespace {

void append(std::vector<int64_t>& out, const std::vector<int64_t>& ids) { out.insert(out.end(), ids.begin(), ids.end()); }

std::string strip(const std::string& s) {
  const char* ws = " \t\r\n";
  const size_t begin = s.find_first_not_of(ws);
  if (begin == std::string::npos) return "";
  return s.substr(begin, s.find_last_not_of(ws) - begin + 1);
}

// Meta's Llama 2 format: each exchange is BOS "[INST] user [/INST] reply " EOS; a system prompt goes
// inside the first [INST] between <<SYS>> markers.
class Llama2Format : public ChatFormat {
 public:
  explicit Llama2Format(const Tokenizer& tok) : tok_(tok) {}

  std::vector<int64_t> first_turn(const std::string& system, const std::string& user) const override {
    std::string content = strip(user);
    if (!strip(system).empty()) content = "<<SYS>>\n" + strip(system) + "\n<</SYS>>\n\n" + content;
    return instruction(content);
  }

  std::vector<int64_t> next_turn(const std::string& user) const override {
    std::vector<int64_t> ids{tok_.eos_id()};
    append(ids, instruction(strip(user)));
    return ids;
  }

 private:
  std::vector<int64_t> instruction(const std::string& content) const {
    std::vector<int64_t> ids{tok_.bos_id()};
    append(ids, tok_.encode("[INST] " + content + " [/INST]"));
    return ids;
  }

  const Tokenizer& tok_;
};

// Meta's Llama 3 format: <|begin_of_text|>, then per message <|start_header_id|>role<|end_header_id|>
// "\n\n" content <|eot_id|>, and an open assistant header for the reply.
class Llama3Format : public ChatFormat {
 public:
  explicit Llama3Format(const Tokenizer& tok) : tok_(tok) {
    for (auto [name, id] : {std::pair{"<|start_header_id|>", &start_header_}, std::pair{"<|end_header_id|>", &end_header_},
                            std::pair{"<|eot_id|>", &eot_}}) {
      *id = tok.special_id(name);
      if (*id < 0) throw UsageError(std::string("the tokenizer has no ") + name + "; pass the model's Llama 3 tokenizer");
    }
  }

  std::vector<int64_t> first_turn(const std::string& system, const std::string& user) const override {
    std::vector<int64_t> ids{tok_.bos_id()};
    if (!strip(system).empty()) append(ids, message("system", system));
    append(ids, message("user", user));
    append(ids, header("assistant"));
    return ids;
  }

  std::vector<int64_t> next_turn(const std::string& user) const override {
    std::vector<int64_t> ids{eot_};
    append(ids, message("user", user));
    append(ids, header("assistant"));
    return ids;
  }

 private:
  std::vector<int64_t> header(const std::string& role) const {
    std::vector<int64_t> ids{start_header_};
    append(ids, tok_.encode(role));
    ids.push_back(end_header_);
    append(ids, tok_.encode("\n\n"));
    return ids;
  }

  std::vector<int64_t> message(const std::string& role, const std::string& content) const {
    std::vector<int64_t> ids = header(role);
    append(ids, tok_.encode(strip(content)));
    ids.push_back(eot_);
    return ids;
  }

  const Tokenizer& tok_;
  int64_t start_header_ = -1, end_header_ = -1, eot_ = -1;
};

// Turn formats of Llama's relatives, written as their Hugging Face chat templates render plain text messages
// (the Python chat command renders those templates: torchchat/generation/chat_format.py). Special tokens go
// in by id; the text between two of them is encoded in one piece, as the Python side encodes it.
class SpecialTokenFormat : public ChatFormat {
 protected:
  SpecialTokenFormat(const Tokenizer& tok, std::initializer_list<const char*> names) : tok_(tok) {
    for (const char* name : names) {
      const int64_t id = tok.special_id(name);
      if (id < 0) throw UsageError(std::string("the tokenizer has no ") + name + " token; pass the model's own tokenizer");
      ids_[name] = id;
    }
  }

  int64_t id(const std::string& name) const { return ids_.at(name); }

  // The text between two special tokens, encoded in one piece.
  void text(std::vector<int64_t>& out, std::initializer_list<std::string> parts) const {
    std::string joined;
    for (const auto& part : parts) joined += part;
    if (!joined.empty()) append(out, tok_.encode(joined));
  }

  const Tokenizer& tok_;

 private:
  std::map<std::string, int64_t> ids_;
};

// ChatML (Qwen2/2.5/3, SmolLM2/3): <|im_start|>role "\n" content <|im_end|> "\n" per message, then an open
// assistant message. No default system prompt is added (Qwen2.5's own template adds one when none is given).
class ChatMLFormat : public SpecialTokenFormat {
 public:
  explicit ChatMLFormat(const Tokenizer& tok) : SpecialTokenFormat(tok, {"<|im_start|>", "<|im_end|>"}) {}

  std::vector<int64_t> first_turn(const std::string& system, const std::string& user) const override {
    std::vector<int64_t> ids;
    if (!strip(system).empty()) message(ids, "system", system);
    message(ids, "user", user);
    ids.push_back(id("<|im_start|>"));
    text(ids, {"assistant\n"});
    return ids;
  }

  std::vector<int64_t> next_turn(const std::string& user) const override {
    std::vector<int64_t> ids{id("<|im_end|>")};
    text(ids, {"\n"});
    message(ids, "user", user);
    ids.push_back(id("<|im_start|>"));
    text(ids, {"assistant\n"});
    return ids;
  }

 private:
  void message(std::vector<int64_t>& ids, const std::string& role, const std::string& content) const {
    ids.push_back(id("<|im_start|>"));
    text(ids, {role + "\n", content});
    ids.push_back(id("<|im_end|>"));
    text(ids, {"\n"});
  }
};

// Gemma 2/3: BOS, then <start_of_turn>user "\n" content <end_of_turn> "\n" and <start_of_turn>model "\n" for
// the reply; contents are trimmed, and a system prompt opens the first user message followed by "\n\n"
// (Gemma has no system role).
class GemmaFormat : public SpecialTokenFormat {
 public:
  explicit GemmaFormat(const Tokenizer& tok) : SpecialTokenFormat(tok, {"<start_of_turn>", "<end_of_turn>"}) {}

  std::vector<int64_t> first_turn(const std::string& system, const std::string& user) const override {
    std::vector<int64_t> ids{tok_.bos_id()};
    ids.push_back(id("<start_of_turn>"));
    if (strip(system).empty()) {
      text(ids, {"user\n", strip(user)});
    } else {
      text(ids, {"user\n", system, "\n\n", strip(user)});
    }
    close_and_open_reply(ids);
    return ids;
  }

  std::vector<int64_t> next_turn(const std::string& user) const override {
    std::vector<int64_t> ids{id("<end_of_turn>")};
    text(ids, {"\n"});
    ids.push_back(id("<start_of_turn>"));
    text(ids, {"user\n", strip(user)});
    close_and_open_reply(ids);
    return ids;
  }

 private:
  void close_and_open_reply(std::vector<int64_t>& ids) const {
    ids.push_back(id("<end_of_turn>"));
    text(ids, {"\n"});
    ids.push_back(id("<start_of_turn>"));
    text(ids, {"model\n"});
  }
};

// Phi-3 / Phi-4-mini (Phi-4-mini's template): <|system|> content <|end|> <|user|> content <|end|> <|assistant|>,
// no newlines between them.
class Phi3Format : public SpecialTokenFormat {
 public:
  explicit Phi3Format(const Tokenizer& tok)
      : SpecialTokenFormat(tok, {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}) {}

  std::vector<int64_t> first_turn(const std::string& system, const std::string& user) const override {
    std::vector<int64_t> ids;
    if (!strip(system).empty()) message(ids, "<|system|>", system);
    message(ids, "<|user|>", user);
    ids.push_back(id("<|assistant|>"));
    return ids;
  }

  std::vector<int64_t> next_turn(const std::string& user) const override {
    std::vector<int64_t> ids{id("<|end|>")};
    message(ids, "<|user|>", user);
    ids.push_back(id("<|assistant|>"));
    return ids;
  }

 private:
  void message(std::vector<int64_t>& ids, const std::string& role, const std::string& content) const {
    ids.push_back(id(role));
    text(ids, {content});
    ids.push_back(id("<|end|>"));
  }
};

}  // namespace

std::unique_ptr<ChatFormat> make_chat_format(const std::string& name, const Tokenizer& tokenizer) {
  if (name == "llama2") return std::make_unique<Llama2Format>(tokenizer);
  if (name == "llama3") return std::make_unique<Llama3Format>(tokenizer);
  if (name == "chatml") return std::make_unique<ChatMLFormat>(tokenizer);
  if (name == "gemma") return std::make_unique<GemmaFormat>(tokenizer);
  if (name == "phi3") return std::make_unique<Phi3Format>(tokenizer);
  if (name.empty()) {
    throw UsageError("this model has no chat format (it is a base model); use -m generate, or name one with -f");
  }
  if (name == "hf") {
    throw UsageError("the model's chat template is a Hugging Face Jinja template the runners cannot render; "
                     "name the format with -f " + std::string(kChatFormats));
  }
  throw UsageError("unknown chat format \"" + name + "\"; the runners know " + std::string(kChatFormats));
}

}  // namespace torchchat
