// aoti_run / et_run: generate text or chat with an exported model, in the style of llama2.c's run.c.
// This file is the same for both runners; model.h's load_model() is whichever backend was linked in.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <string>
#include <unordered_set>
#include <vector>

#include "chat_format.h"
#include "errors.h"
#include "model.h"
#include "sampler.h"
#include "tokenizer.h"

namespace torchchat {
namespace {

using Clock = std::chrono::steady_clock;

struct RunOptions {
  std::string model_path;
  std::string tokenizer_path;
  std::string prompt;
  std::string system_prompt;
  std::string mode = "generate";
  std::string chat_format;  // -f: wins over the artifact's chat format
  int64_t steps = 200;  // new tokens to generate; 0: until the context is full
  SamplerConfig sampler;
  MetadataOverrides overrides;
};

void print_usage(const char* prog) {
  std::fprintf(stderr,
               "Usage:   %s <model%s> -z <tokenizer> [options]\n"
               "Example: %s model%s -z tokenizer.model -i \"Once upon a time\" -n 200 -t 0\n"
               "Options:\n"
               "  -z <path>   tokenizer file (its kind, sentencepiece or tiktoken, comes from the model;\n"
               "              for a model exported from a GGUF: the <model>.tokenizer.model export wrote)\n"
               "  -i <text>   prompt (generate) or first user message (chat); default empty\n"
               "  -n <int>    number of tokens to generate, default 200; 0 = until the context is full\n"
               "  -t <float>  temperature in [0, inf), default 0.8; 0 = greedy\n"
               "  -k <int>    top-k, default 200; 0 = off\n"
               "  -p <float>  top-p (nucleus) in (0, 1], default 1 = off\n"
               "  -s <int>    random seed, default the time\n"
               "  -m <mode>   generate | chat, default generate\n"
               "  -y <text>   system prompt (chat)\n"
               "  -f <name>   chat format, llama2 | llama3 | chatml | gemma | phi3; default the model's\n"
               "For an AOT Inductor .so without its <model>.so.json sidecar:\n"
               "  -j <path>   the model's metadata JSON file, or\n"
               "  -l <kind>   tokenizer kind, sentencepiece | tiktoken | hf (tokenizer.json), with\n"
               "  -c <int>    the max_seq_len the model was exported with\n"
               "Given with any model, -l and -c win over its metadata (-c at most the exported length).\n",
               prog, backend_artifacts(), prog, backend_name() == std::string("et") ? ".pte" : ".pt2");
}

int64_t parse_int(const std::string& flag, const char* value) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(value, &end, 10);
  if (*value == '\0' || *end != '\0' || errno != 0) throw UsageError(flag + " " + value + ": expected an integer");
  return v;
}

float parse_float(const std::string& flag, const char* value) {
  char* end = nullptr;
  float v = std::strtof(value, &end);
  if (*value == '\0' || *end != '\0' || !std::isfinite(v)) throw UsageError(flag + " " + value + ": expected a number");
  return v;
}

RunOptions parse_args(int argc, char** argv) {
  RunOptions opt;
  opt.sampler.seed = static_cast<uint64_t>(std::time(nullptr));
  if (argc < 2) throw UsageError("no model given; run with -h for usage");
  opt.model_path = argv[1];
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag.size() != 2 || flag[0] != '-') throw UsageError("unexpected argument " + flag + "; run with -h for usage");
    if (i + 1 >= argc) throw UsageError(flag + " needs a value; run with -h for usage");
    const char* value = argv[i + 1];
    switch (flag[1]) {
      case 'z': opt.tokenizer_path = value; break;
      case 'i': opt.prompt = value; break;
      case 'y': opt.system_prompt = value; break;
      case 'm': opt.mode = value; break;
      case 'f': opt.chat_format = value; break;
      case 'n': opt.steps = parse_int(flag, value); break;
      case 't': opt.sampler.temperature = parse_float(flag, value); break;
      case 'p': opt.sampler.top_p = parse_float(flag, value); break;
      case 'k': opt.sampler.top_k = static_cast<int>(parse_int(flag, value)); break;
      case 's': opt.sampler.seed = static_cast<uint64_t>(parse_int(flag, value)); break;
      case 'j': opt.overrides.metadata_path = value; break;
      case 'l': opt.overrides.tokenizer_kind = value; break;
      case 'c': opt.overrides.max_seq_len = parse_int(flag, value); break;
      default: throw UsageError("unknown flag " + flag + "; run with -h for usage");
    }
  }
  if (opt.tokenizer_path.empty()) throw UsageError("no tokenizer given; pass -z <tokenizer.model>");
  if (opt.mode != "generate" && opt.mode != "chat") throw UsageError("-m " + opt.mode + ": the mode is generate or chat");
  if (opt.steps < 0) throw UsageError("-n must be >= 0");
  if (opt.sampler.temperature < 0) throw UsageError("-t must be >= 0");
  if (opt.sampler.top_p <= 0 || opt.sampler.top_p > 1) throw UsageError("-p must be in (0, 1]");
  if (opt.sampler.top_k < 0) throw UsageError("-k must be >= 0");
  return opt;
}

// Streams decoded tokens to stdout as they are generated.
class TextStream {
 public:
  explicit TextStream(const Tokenizer& tok) : tok_(tok) {}

  // at_start: the next token begins the text (nothing but BOS before it).
  void begin(bool at_start) { at_start_ = at_start; }

  void put(int64_t id) {
    const std::string text = tok_.decode_token(id, at_start_);
    at_start_ = false;
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }

 private:
  const Tokenizer& tok_;
  bool at_start_ = true;
};

// The model with the position the next token goes to.
class Session {
 public:
  Session(Model& model, int64_t max_seq_len) : model_(model), max_seq_len_(max_seq_len) {}

  int64_t pos() const { return pos_; }
  int64_t room() const { return max_seq_len_ - pos_; }

  // Feeds `ids` at the next positions; returns the logits after the last. Parallel prefill where the
  // artifact takes dynamic sequence lengths, one token at a time otherwise.
  std::span<const float> feed(const std::vector<int64_t>& ids) {
    if (static_cast<int64_t>(ids.size()) > room()) {
      throw UsageError("the prompt needs " + std::to_string(ids.size()) + " positions but only " +
                       std::to_string(room()) + " of the model's " + std::to_string(max_seq_len_) +
                       " are left; shorten it");
    }
    std::span<const float> logits;
    if (model_.info().dynamic_shapes) {
      logits = model_.forward(ids.data(), static_cast<int64_t>(ids.size()), pos_);
      pos_ += static_cast<int64_t>(ids.size());
    } else {
      for (int64_t id : ids) logits = model_.forward(&id, 1, pos_++);
    }
    return logits;
  }

 private:
  Model& model_;
  int64_t max_seq_len_;
  int64_t pos_ = 0;
};

struct Stats {
  int64_t prompt_tokens = 0;
  int64_t generated = 0;
  double prefill_s = 0;
  double decode_s = 0;
};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Samples up to `steps` tokens (0: as many as the context holds) starting from `logits`, streaming each
// and feeding it back, until a stop token (not printed, not fed). Returns the count. As in the Python
// engine, a reply gets at most the positions left after its prompt. When it ends at the limit rather
// than at a stop token, its last token is printed but not yet fed: `*unfed` is set to it (else -1).
int64_t generate_reply(Session& session, Sampler& sampler, std::span<const float> logits, int64_t steps,
                       const std::unordered_set<int64_t>& stop_ids, TextStream& out, double& decode_s,
                       int64_t* unfed) {
  const auto start = Clock::now();
  const int64_t max_new = steps == 0 ? session.room() : std::min(steps, session.room());
  int64_t generated = 0;
  *unfed = -1;
  while (generated < max_new) {
    const int64_t next = sampler.sample(logits);
    if (stop_ids.count(next)) break;
    out.put(next);
    ++generated;
    if (generated == max_new) {  // nothing is sampled after it, so it need not be fed yet
      *unfed = next;
      break;
    }
    logits = session.feed({next});
  }
  decode_s += seconds_since(start);
  return generated;
}

void print_stats(const Stats& s) {
  // Decode speed counts the tokens sampled after the first (which comes from the prefill's logits).
  const double decode_tps = s.generated > 1 && s.decode_s > 0 ? (s.generated - 1) / s.decode_s : 0.0;
  std::fprintf(stderr, "\nprompt tokens: %lld, generated tokens: %lld, prefill: %.1f ms, decode: %.2f tok/s\n",
               static_cast<long long>(s.prompt_tokens), static_cast<long long>(s.generated), s.prefill_s * 1e3,
               decode_tps);
}

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unordered_set<int64_t> stop_ids;
  int64_t bos_id;
};

Loaded load(const RunOptions& opt) {
  Loaded l;
  l.model = load_model(opt.model_path, opt.overrides);
  const ArtifactInfo& info = l.model->info();
  l.tokenizer = load_tokenizer(info.tokenizer.kind, opt.tokenizer_path);
  if (info.vocab_size > 0 && l.tokenizer->vocab_size() > info.vocab_size) {
    throw UsageError(opt.tokenizer_path + " has " + std::to_string(l.tokenizer->vocab_size()) +
                     " tokens but the model only " + std::to_string(info.vocab_size) +
                     "; pass the tokenizer the model was trained with");
  }
  const auto& stops = info.tokenizer.stop_ids.empty() ? l.tokenizer->default_stop_ids() : info.tokenizer.stop_ids;
  l.stop_ids.insert(stops.begin(), stops.end());
  l.bos_id = info.tokenizer.bos_id >= 0 ? info.tokenizer.bos_id : l.tokenizer->bos_id();
  return l;
}

void run_generate(const RunOptions& opt, Loaded& l) {
  Session session(*l.model, l.model->info().max_seq_len);
  Sampler sampler(opt.sampler);
  TextStream out(*l.tokenizer);
  std::vector<int64_t> prompt;
  if (l.bos_id >= 0) prompt.push_back(l.bos_id);  // Qwen, SmolLM and Phi prompts start without one
  const auto body = l.tokenizer->encode(opt.prompt);
  prompt.insert(prompt.end(), body.begin(), body.end());
  const int64_t max_seq_len = l.model->info().max_seq_len;
  if (static_cast<int64_t>(prompt.size()) >= max_seq_len) {
    throw UsageError("the prompt is " + std::to_string(prompt.size()) + " tokens but the model holds " +
                     std::to_string(max_seq_len) + " positions, one of which the reply needs; shorten it");
  }

  Stats stats;
  stats.prompt_tokens = static_cast<int64_t>(prompt.size());
  const auto start = Clock::now();
  auto logits = session.feed(prompt);
  stats.prefill_s = seconds_since(start);
  std::fwrite(opt.prompt.data(), 1, opt.prompt.size(), stdout);
  out.begin(body.empty());
  int64_t unfed = -1;
  stats.generated = generate_reply(session, sampler, logits, opt.steps, l.stop_ids, out, stats.decode_s, &unfed);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  print_stats(stats);
}

void run_chat(const RunOptions& opt, Loaded& l) {
  auto format = make_chat_format(opt.chat_format.empty() ? l.model->info().chat_template : opt.chat_format, *l.tokenizer);
  Session session(*l.model, l.model->info().max_seq_len);
  Sampler sampler(opt.sampler);
  TextStream out(*l.tokenizer);
  Stats stats;
  std::string user = opt.prompt;
  int64_t unfed = -1;  // the last reply's final token, when the reply ended at -n rather than a stop token
  for (bool first = true;; first = false) {
    if (!first || user.empty()) {
      std::fputs("User: ", stdout);
      std::fflush(stdout);
      if (!std::getline(std::cin, user)) break;
    }
    std::vector<int64_t> ids = first ? format->first_turn(opt.system_prompt, user) : format->next_turn(user);
    if (unfed >= 0) ids.insert(ids.begin(), unfed);
    if (static_cast<int64_t>(ids.size()) >= session.room()) {
      std::fprintf(stderr, "The conversation has filled the model's %lld positions; start a new chat.\n",
                   static_cast<long long>(l.model->info().max_seq_len));
      break;
    }
    auto start = Clock::now();
    auto logits = session.feed(ids);
    stats.prefill_s += seconds_since(start);
    stats.prompt_tokens += static_cast<int64_t>(ids.size());
    std::fputs("Assistant: ", stdout);
    out.begin(true);
    stats.generated += generate_reply(session, sampler, logits, opt.steps, l.stop_ids, out, stats.decode_s, &unfed);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
  print_stats(stats);
}

}  // namespace
}  // namespace torchchat

int main(int argc, char** argv) {
  using namespace torchchat;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "-h" || std::string(argv[i]) == "--help") {
      print_usage(argv[0]);
      return 0;
    }
  }
  try {
    const RunOptions opt = parse_args(argc, argv);
    Loaded loaded = load(opt);
    if (opt.mode == "chat") {
      run_chat(opt, loaded);
    } else {
      run_generate(opt, loaded);
    }
    return 0;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
