#include "chat_format.h"

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

}  // namespace

std::unique_ptr<ChatFormat> make_chat_format(const std::string& name, const Tokenizer& tokenizer) {
  if (name == "llama2") return std::make_unique<Llama2Format>(tokenizer);
  if (name == "llama3") return std::make_unique<Llama3Format>(tokenizer);
  if (name.empty()) {
    throw UsageError("this model has no chat format (it is a base model); use -m generate");
  }
  throw UsageError("unknown chat format \"" + name + "\" in the model's metadata; the runners know llama2 and llama3");
}

}  // namespace torchchat
