// tokenizer_test: the runners' tokenizers over stdin, for tests/runner to compare with reference ids.
//   tokenizer_test <sentencepiece|tiktoken> <tokenizer file> encode   stdin: one JSON string per line;
//                                                                     stdout: its ids, space-separated
//   tokenizer_test <sentencepiece|tiktoken> <tokenizer file> decode   stdin: space-separated ids per line;
//                                                                     stdout: the text as a JSON string
//   tokenizer_test <sentencepiece|tiktoken> <tokenizer file> chat-<llama2|llama3>
//       stdin: one JSON object per turn, {"system": ..., "user": ...} first, then {"user": ...};
//       stdout: the ids the chat format gives each turn, space-separated
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "chat_format.h"
#include "errors.h"
#include "tokenizer.h"

int main(int argc, char** argv) {
  using nlohmann::json;
  const std::string mode = argc == 4 ? argv[3] : "";
  if (mode != "encode" && mode != "decode" && mode.rfind("chat-", 0) != 0) {
    std::fprintf(stderr, "usage: %s <sentencepiece|tiktoken> <tokenizer file> encode|decode|chat-<format> < lines\n",
                 argv[0]);
    return 2;
  }
  auto print_ids = [](const std::vector<int64_t>& ids) {
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
    std::cout << '\n';
  };
  try {
    auto tok = torchchat::load_tokenizer(argv[1], argv[2]);
    std::unique_ptr<torchchat::ChatFormat> format;
    if (mode.rfind("chat-", 0) == 0) format = torchchat::make_chat_format(mode.substr(5), *tok);
    std::string line;
    for (bool first = true; std::getline(std::cin, line); first = false) {
      if (mode == "encode") {
        print_ids(tok->encode(json::parse(line).get<std::string>()));
      } else if (format) {
        const json turn = json::parse(line);
        const std::string user = turn.at("user").get<std::string>();
        print_ids(first ? format->first_turn(turn.value("system", ""), user) : format->next_turn(user));
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
