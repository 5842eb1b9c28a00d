// tokenizer_test: the runners' tokenizers over stdin, for tests/runner to compare with reference ids.
//   tokenizer_test <sentencepiece|tiktoken> <tokenizer file> encode   stdin: one JSON string per line;
//                                                                     stdout: its ids, space-separated
//   tokenizer_test <sentencepiece|tiktoken> <tokenizer file> decode   stdin: space-separated ids per line;
//                                                                     stdout: the text as a JSON string
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "errors.h"
#include "tokenizer.h"

int main(int argc, char** argv) {
  using nlohmann::json;
  if (argc != 4 || (std::string(argv[3]) != "encode" && std::string(argv[3]) != "decode")) {
    std::fprintf(stderr, "usage: %s <sentencepiece|tiktoken> <tokenizer file> encode|decode < lines\n", argv[0]);
    return 2;
  }
  try {
    auto tok = torchchat::load_tokenizer(argv[1], argv[2]);
    const bool encode = std::string(argv[3]) == "encode";
    std::string line;
    while (std::getline(std::cin, line)) {
      if (encode) {
        const auto ids = tok->encode(json::parse(line).get<std::string>());
        for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
        std::cout << '\n';
      } else {
        std::vector<int64_t> ids;
        std::istringstream in(line);
        for (int64_t id; in >> id;) ids.push_back(id);
        std::cout << json(tok->decode(ids)).dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
      }
    }
  } catch (const torchchat::UsageError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
