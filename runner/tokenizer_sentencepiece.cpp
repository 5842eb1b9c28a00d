// SentencePiece through Debian's libsentencepiece: the library Llama 2's tokenizer was made with.
#include <sentencepiece_processor.h>

#include "errors.h"
#include "tokenizer.h"

namespace torchchat {
namespace {

constexpr const char* kWordBoundary = "\xe2\x96\x81";  // U+2581, SentencePiece's marker for a space

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& path) {
    auto status = sp_.Load(path);
    if (!status.ok()) {
      throw UsageError("cannot read " + path + " as a SentencePiece model (" + status.ToString() +
                       "); the model's metadata says its tokenizer is sentencepiece, pass its tokenizer.model");
    }
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int> ids;
    auto status = sp_.Encode(text, &ids);
    if (!status.ok()) throw RunnerError("SentencePiece could not encode the text: " + status.ToString());
    return {ids.begin(), ids.end()};
  }

  std::string decode_token(int64_t id, bool at_start) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const int i = static_cast<int>(id);
    if (sp_.IsControl(i)) return "";
    if (sp_.IsUnknown(i)) return " \xe2\x81\x87 ";  // " ⁇ ", as SentencePiece renders <unk>
    const std::string& piece = sp_.IdToPiece(i);
    if (sp_.IsByte(i)) {  // "<0xAB>": one raw byte of a UTF-8 sequence the vocabulary lacks
      return std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
    }
    std::string text;
    for (size_t pos = 0; pos < piece.size();) {
      if (piece.compare(pos, 3, kWordBoundary) == 0) {
        text += ' ';
        pos += 3;
      } else {
        text += piece[pos++];
      }
    }
    // The space SentencePiece prefixes to the first word is not part of the text.
    if (at_start && !text.empty() && text[0] == ' ') text.erase(0, 1);
    return text;
  }

  int64_t special_id(const std::string& text) const override {
    const int id = sp_.PieceToId(text);  // the unknown id when there is no such piece
    return sp_.IdToPiece(id) == text ? id : -1;
  }

  int64_t bos_id() const override { return sp_.bos_id(); }
  int64_t eos_id() const override { return sp_.eos_id(); }
  std::vector<int64_t> default_stop_ids() const override { return {eos_id()}; }
  int64_t vocab_size() const override { return sp_.GetPieceSize(); }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path) {
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace torchchat
