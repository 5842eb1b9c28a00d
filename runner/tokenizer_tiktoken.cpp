// Llama 3 tokenizer: a tiktoken ranks file (`base64(bytes) rank` per line), Meta's pre-tokenizer regex
// (run with PCRE2: it needs Unicode classes and a lookahead), byte-pair merges by rank, and the 256
// special tokens Meta numbers after the ranks.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <fstream>
#include <limits>
#include <string_view>
#include <unordered_map>

#include "errors.h"
#include "tokenizer.h"

namespace torchchat {
namespace {

// Contractions, letters with one leading non-letter, numbers in groups of up to 3 digits, punctuation
// runs, newlines, other whitespace (whitespace before a non-space is left to join the next word).
constexpr const char* kPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

constexpr int kNumSpecialTokens = 256;

// Llama 3.1's names for the first special ids; the rest are <|reserved_special_token_N|> from N = 3.
constexpr std::array<const char*, 11> kNamedSpecials = {
    "<|begin_of_text|>", "<|end_of_text|>",     "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",        "<|eot_id|>",          "<|python_tag|>",
};

// Lets the rank table be searched with string_view slices of the text, without copying them.
struct ViewHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using RankMap = std::unordered_map<std::string, int64_t, ViewHash, std::equal_to<>>;

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

// Standard base64 with '=' padding; false on any other character.
bool base64_decode(std::string_view in, std::string& out) {
  out.clear();
  uint32_t acc = 0;
  int bits = 0;
  size_t i = 0;
  for (; i < in.size() && in[i] != '='; ++i) {
    int v = base64_value(in[i]);
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  for (; i < in.size(); ++i) {
    if (in[i] != '=') return false;
  }
  return !out.empty() && in.size() % 4 == 0;
}

class TiktokenTokenizer : public Tokenizer {
 public:
  explicit TiktokenTokenizer(const std::string& path) {
    load_ranks(path);
    const auto n = static_cast<int64_t>(decoder_.size());
    for (int i = 0; i < kNumSpecialTokens; ++i) {
      std::string name = i < static_cast<int>(kNamedSpecials.size())
                             ? kNamedSpecials[i]
                             : "<|reserved_special_token_" + std::to_string(i - kNamedSpecials.size() + 3) + "|>";
      specials_[name] = n + i;
      decoder_.push_back(name);
    }
    compile_pattern();
  }

  ~TiktokenTokenizer() override {
    pcre2_match_data_free(match_data_);
    pcre2_code_free(regex_);
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    PCRE2_SIZE offset = 0;
    uint32_t options = 0;  // the first match checks the whole text is UTF-8; later ones need not
    while (offset < text.size()) {
      int rc = pcre2_match(regex_, subject, text.size(), offset, options, match_data_, nullptr);
      options = PCRE2_NO_UTF_CHECK;
      if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21) {
        throw UsageError("the text is not valid UTF-8 (" + pcre2_message(rc) + "); pass UTF-8 text");
      }
      // Every character is a letter, a number, whitespace or other, so some alternative matches.
      if (rc < 0) throw RunnerError("tiktoken pre-tokenizer failed: " + pcre2_message(rc));
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data_);
      encode_piece(std::string_view(text).substr(ovector[0], ovector[1] - ovector[0]), ids);
      offset = ovector[1];
    }
    return ids;
  }

  std::string decode_token(int64_t id, bool /*at_start*/) const override {
    if (id < 0 || id >= static_cast<int64_t>(decoder_.size())) return "";
    return decoder_[id];
  }

  int64_t special_id(const std::string& text) const override {
    auto it = specials_.find(text);
    return it == specials_.end() ? -1 : it->second;
  }

  int64_t bos_id() const override { return specials_.at("<|begin_of_text|>"); }
  int64_t eos_id() const override { return specials_.at("<|end_of_text|>"); }
  std::vector<int64_t> default_stop_ids() const override {
    return {specials_.at("<|end_of_text|>"), specials_.at("<|eom_id|>"), specials_.at("<|eot_id|>")};
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(decoder_.size()); }

 private:
  void load_ranks(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw UsageError("cannot open tokenizer " + path + "; check the path given with -z");
    std::string line, bytes;
    int64_t lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      const size_t space = line.find(' ');
      int64_t rank = -1;
      try {
        if (space != std::string::npos) rank = std::stoll(line.substr(space + 1));
      } catch (const std::exception&) {
        rank = -1;
      }
      if (rank < 0 || !base64_decode(std::string_view(line).substr(0, space), bytes)) {
        throw UsageError(path + " line " + std::to_string(lineno) +
                         " is not a tiktoken `base64 rank` line; the model's metadata says its tokenizer is "
                         "tiktoken, pass a Llama 3 tokenizer.model");
      }
      if (rank >= static_cast<int64_t>(decoder_.size())) decoder_.resize(rank + 1);
      decoder_[rank] = bytes;
      encoder_.emplace(bytes, rank);
    }
    if (decoder_.empty() || encoder_.size() != decoder_.size()) {
      throw UsageError(path + ": tiktoken ranks must be distinct and numbered 0..n-1; the file is damaged");
    }
  }

  void compile_pattern() {
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    regex_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED,
                           PCRE2_UTF | PCRE2_UCP, &err, &err_offset, nullptr);
    if (regex_ == nullptr) throw RunnerError("cannot compile the Llama 3 pre-tokenizer regex: " + pcre2_message(err));
    // JIT is an optimization; without it (some builds lack it) matching is slower but the same.
    pcre2_jit_compile(regex_, PCRE2_JIT_COMPLETE);
    match_data_ = pcre2_match_data_create_from_pattern(regex_, nullptr);
  }

  static std::string pcre2_message(int code) {
    std::array<PCRE2_UCHAR, 256> buf{};
    pcre2_get_error_message(code, buf.data(), buf.size());
    return reinterpret_cast<const char*>(buf.data());
  }

  int64_t rank_of(std::string_view bytes) const {
    auto it = encoder_.find(bytes);
    return it == encoder_.end() ? std::numeric_limits<int64_t>::max() : it->second;
  }

  // Byte-pair merge: start from single bytes and repeatedly join the adjacent pair whose joined bytes
  // have the lowest rank (the leftmost one on ties) until no joined pair is a token.
  void encode_piece(std::string_view piece, std::vector<int64_t>& ids) const {
    if (auto it = encoder_.find(piece); it != encoder_.end()) {
      ids.push_back(it->second);
      return;
    }
    constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
    // starts[i] begins part i; pair_rank[i] is the rank of parts i and i+1 joined.
    std::vector<size_t> starts(piece.size() + 1);
    for (size_t i = 0; i <= piece.size(); ++i) starts[i] = i;
    auto joined_rank = [&](size_t i) {
      return i + 2 < starts.size() ? rank_of(piece.substr(starts[i], starts[i + 2] - starts[i])) : kNone;
    };
    std::vector<int64_t> pair_rank(starts.size());
    for (size_t i = 0; i < starts.size(); ++i) pair_rank[i] = joined_rank(i);
    while (starts.size() > 2) {
      size_t best = 0;
      for (size_t i = 1; i + 2 < starts.size(); ++i) {
        if (pair_rank[i] < pair_rank[best]) best = i;
      }
      if (pair_rank[best] == kNone) break;
      starts.erase(starts.begin() + best + 1);
      pair_rank.erase(pair_rank.begin() + best + 1);
      pair_rank[best] = joined_rank(best);
      if (best > 0) pair_rank[best - 1] = joined_rank(best - 1);
    }
    for (size_t i = 0; i + 1 < starts.size(); ++i) {
      int64_t rank = rank_of(piece.substr(starts[i], starts[i + 1] - starts[i]));
      if (rank == kNone) throw RunnerError("the tiktoken ranks lack a single byte; the tokenizer file is damaged");
      ids.push_back(rank);
    }
  }

  RankMap encoder_;
  std::vector<std::string> decoder_;  // id -> bytes (special tokens: their text)
  std::unordered_map<std::string, int64_t> specials_;
  pcre2_code* regex_ = nullptr;
  pcre2_match_data* match_data_ = nullptr;  // encode() is not thread-safe: one tokenizer per thread
};

}  // namespace

std::unique_ptr<Tokenizer> load_tiktoken(const std::string& path) { return std::make_unique<TiktokenTokenizer>(path); }

}  // namespace torchchat
