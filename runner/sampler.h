// Picks the next token from logits: greedy at temperature 0, otherwise temperature, top-k, then top-p
// (nucleus) sampling with a seeded generator, so a seed repeats a run.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

namespace torchchat {

struct SamplerConfig {
  // Defaults as the Python CLI's.
  float temperature = 0.8f;  // 0: greedy (argmax)
  float top_p = 1.0f;  // in (0, 1]; 1 keeps every candidate
  int top_k = 200;  // 0: no top-k cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& cfg) : cfg_(cfg), rng_(cfg.seed) {}

  // logits: one float per vocabulary id. Returns the chosen id.
  int64_t sample(std::span<const float> logits);

 private:
  float uniform();  // in [0, 1)

  SamplerConfig cfg_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int64_t>> candidates_;  // (probability, id), reused between calls
};

// The first index of the largest value.
int64_t argmax(std::span<const float> values);

}  // namespace torchchat
