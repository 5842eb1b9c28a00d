// Hugging Face tokenizer.json with a byte-level BPE model, the vocabularies of Qwen2/2.5/3, SmolLM2/3 and
// Phi-4-mini: added tokens, a pre-tokenizer regex (ByteLevel's GPT-2 pattern, or a Split pattern followed
// by ByteLevel without its own regex), each piece's bytes mapped to GPT-2's printable characters, and
// pair merges by their order in `merges`. A normalizer other than NFC is refused; NFC is taken as already
// applied (text is expected in NFC, as nearly all text is).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "errors.h"
#include "tokenizer.h"

namespace torchchat {
namespace {

using nlohmann::json;

// GPT-2's pattern, which ByteLevel applies when its use_regex is true.
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string utf8(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

// The UTF-8 characters of `s`, one string each.
std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

class HFBpeTokenizer : public Tokenizer {
 public:
  explicit HFBpeTokenizer(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw UsageError("cannot open tokenizer " + path);
    json doc;
    try {
      doc = json::parse(in);
    } catch (const json::parse_error& e) {
      throw UsageError(path + " is not a Hugging Face tokenizer.json (" + e.what() + ")");
    }
    try {
      load(doc, path);
    } catch (const json::exception& e) {
      throw UsageError(path + ": an unexpected tokenizer.json layout (" + e.what() + ")");
    }
  }

  ~HFBpeTokenizer() override {
    pcre2_match_data_free(match_data_);
    pcre2_code_free(regex_);
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    std::string piece_text = add_prefix_space_ && !text.empty() && text[0] != ' ' ? " " + text : text;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece_text.data());
    PCRE2_SIZE offset = 0, done = 0;
    uint32_t options = 0;
    while (offset < piece_text.size()) {
      int rc = pcre2_match(regex_, subject, piece_text.size(), offset, options, match_data_, nullptr);
      options = PCRE2_NO_UTF_CHECK;
      if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21) {
        throw UsageError("the text is not valid UTF-8; pass UTF-8 text");
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) throw RunnerError("tokenizer.json pre-tokenizer failed");
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match_data_);
      // "Isolated": the text between matches is a piece of its own, as is each match.
      if (ov[0] > done) encode_piece(piece_text.substr(done, ov[0] - done), ids);
      if (ov[1] > ov[0]) encode_piece(piece_text.substr(ov[0], ov[1] - ov[0]), ids);
      done = ov[1];
      offset = ov[1] > ov[0] ? ov[1] : ov[1] + 1;
    }
    if (done < piece_text.size()) encode_piece(piece_text.substr(done), ids);
    return ids;
  }

  std::string decode_token(int64_t id, bool /*at_start*/) const override {
    if (id < 0 || id >= static_cast<int64_t>(tokens_.size())) return "";
    if (special_[id]) return "";
    if (added_[id]) return tokens_[id];
    std::string out;
    for (const auto& ch : utf8_chars(tokens_[id])) {
      auto it = char_to_byte_.find(ch);
      out += it == char_to_byte_.end() ? ch : std::string(1, static_cast<char>(it->second));
    }
    return out;
  }

  int64_t special_id(const std::string& text) const override {
    auto it = added_ids_.find(text);
    return it == added_ids_.end() ? -1 : it->second;
  }

  // tokenizer.json names neither: the artifact's metadata carries them (and the stop tokens).
  int64_t bos_id() const override { return -1; }
  int64_t eos_id() const override { return -1; }
  std::vector<int64_t> default_stop_ids() const override { return {}; }
  int64_t vocab_size() const override { return static_cast<int64_t>(tokens_.size()); }

 private:
  void load(const json& doc, const std::string& path) {
    const json& model = doc.at("model");
    if (model.value("type", "") != "BPE") throw UsageError(path + ": the runners read BPE tokenizer.json models only");
    const json& normalizer = doc.contains("normalizer") ? doc["normalizer"] : json();
    if (!normalizer.is_null() && normalizer.value("type", "") != "NFC") {
      throw UsageError(path + ": normalizer " + normalizer.value("type", "?") + " is not supported by the runners");
    }
    std::string pattern = pre_tokenizer_pattern(doc.contains("pre_tokenizer") ? doc["pre_tokenizer"] : json(), path);
    for (const auto& [token, id] : model.at("vocab").items()) set_token(id.get<int64_t>(), token, false, false);
    int rank = 0;
    for (const auto& merge : model.at("merges")) {
      std::string left, right;
      if (merge.is_array()) {
        left = merge.at(0).get<std::string>();
        right = merge.at(1).get<std::string>();
      } else {
        const std::string m = merge.get<std::string>();
        const size_t space = m.find(' ', 1);
        left = m.substr(0, space);
        right = m.substr(space + 1);
      }
      merges_.emplace(left + '\x01' + right, rank++);
    }
    if (doc.contains("added_tokens")) {
      for (const auto& t : doc["added_tokens"]) {
        const std::string content = t.at("content").get<std::string>();
        const int64_t id = t.at("id").get<int64_t>();
        set_token(id, content, true, t.value("special", false));
        added_ids_[content] = id;
      }
    }
    for (size_t i = 0; i < tokens_.size(); ++i) vocab_[tokens_[i]] = static_cast<int64_t>(i);
    // GPT-2's table: printable bytes stand for themselves, the others for code points from 256 up.
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_char_[b] = utf8(printable ? b : next++);
      char_to_byte_[byte_to_char_[b]] = static_cast<uint8_t>(b);
    }
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    regex_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                           &err, &err_offset, nullptr);
    if (regex_ == nullptr) throw UsageError(path + ": its pre-tokenizer regex does not compile with PCRE2");
    pcre2_jit_compile(regex_, PCRE2_JIT_COMPLETE);
    match_data_ = pcre2_match_data_create_from_pattern(regex_, nullptr);
  }

  // The regex that splits text into pieces: ByteLevel (use_regex) alone, or Split(Regex, Isolated) then
  // ByteLevel(use_regex false).
  std::string pre_tokenizer_pattern(const json& pre, const std::string& path) {
    const std::string type = pre.is_null() ? "" : pre.value("type", "");
    if (type == "ByteLevel" && pre.value("use_regex", true)) {
      add_prefix_space_ = pre.value("add_prefix_space", false);
      return kGpt2Pattern;
    }
    if (type == "Sequence" && pre.at("pretokenizers").size() == 2) {
      const json& split = pre["pretokenizers"][0];
      const json& byte_level = pre["pretokenizers"][1];
      if (split.value("type", "") == "Split" && split.value("behavior", "") == "Isolated" &&
          !split.value("invert", false) && split.at("pattern").contains("Regex") &&
          byte_level.value("type", "") == "ByteLevel" && !byte_level.value("use_regex", true)) {
        add_prefix_space_ = byte_level.value("add_prefix_space", false);
        return split["pattern"]["Regex"].get<std::string>();
      }
    }
    throw UsageError(path + ": this pre-tokenizer is not supported by the runners (ByteLevel, or Split then ByteLevel)");
  }

  void set_token(int64_t id, const std::string& text, bool added, bool special) {
    if (id < 0) return;
    if (id >= static_cast<int64_t>(tokens_.size())) {
      tokens_.resize(id + 1);
      added_.resize(id + 1, false);
      special_.resize(id + 1, false);
    }
    tokens_[id] = text;
    added_[id] = added;
    special_[id] = special;
  }

  // One piece's bytes as GPT-2 characters, merged pair by pair (lowest merge rank first) into tokens.
  void encode_piece(const std::string& piece, std::vector<int64_t>& ids) const {
    std::vector<std::string> symbols;
    for (unsigned char b : piece) symbols.push_back(byte_to_char_[b]);
    while (symbols.size() > 1) {
      int best = -1;
      size_t at = 0;
      for (size_t i = 0; i + 1 < symbols.size(); ++i) {
        auto it = merges_.find(symbols[i] + '\x01' + symbols[i + 1]);
        if (it != merges_.end() && (best < 0 || it->second < best)) {
          best = it->second;
          at = i;
        }
      }
      if (best < 0) break;
      symbols[at] += symbols[at + 1];
      symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    for (const auto& s : symbols) {
      auto it = vocab_.find(s);
      if (it == vocab_.end()) throw RunnerError("tokenizer.json has no token for \"" + s + "\"");
      ids.push_back(it->second);
    }
  }

  std::vector<std::string> tokens_;  // id -> token text (byte-level characters; an added token's own text)
  std::vector<bool> added_, special_;
  std::unordered_map<std::string, int64_t> vocab_, added_ids_;
  std::unordered_map<std::string, int> merges_;  // left \x01 right -> rank
  std::array<std::string, 256> byte_to_char_;
  std::unordered_map<std::string, uint8_t> char_to_byte_;
  bool add_prefix_space_ = false;
  pcre2_code* regex_ = nullptr;
  pcre2_match_data* match_data_ = nullptr;  // encode() is not thread-safe: one tokenizer per thread
};

}  // namespace

std::unique_ptr<Tokenizer> load_hf_bpe(const std::string& path) { return std::make_unique<HFBpeTokenizer>(path); }

}  // namespace torchchat
