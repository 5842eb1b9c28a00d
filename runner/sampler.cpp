#include "sampler.h"

#include <algorithm>
#include <cmath>

namespace torchchat {

int64_t argmax(std::span<const float> values) {
  return std::max_element(values.begin(), values.end()) - values.begin();
}

float Sampler::uniform() {
  // The top 24 bits: every value is exactly representable as a float below 1.
  return static_cast<float>(rng_() >> 40) / 16777216.0f;
}

int64_t Sampler::sample(std::span<const float> logits) {
  if (cfg_.temperature <= 0.0f) return argmax(logits);
  const auto vocab = static_cast<int64_t>(logits.size());
  candidates_.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) candidates_[i] = {logits[i] / cfg_.temperature, i};
  auto by_value_desc = [](const auto& a, const auto& b) { return a.first > b.first; };
  if (cfg_.top_k > 0 && cfg_.top_k < vocab) {
    std::nth_element(candidates_.begin(), candidates_.begin() + cfg_.top_k, candidates_.end(), by_value_desc);
    candidates_.resize(cfg_.top_k);
  }
  // Softmax over the candidates (shifted by the max so exp cannot overflow).
  float max_value = std::max_element(candidates_.begin(), candidates_.end(), [](const auto& a, const auto& b) {
                      return a.first < b.first;
                    })->first;
  float total = 0.0f;
  for (auto& c : candidates_) {
    c.first = std::exp(c.first - max_value);
    total += c.first;
  }
  for (auto& c : candidates_) c.first /= total;
  if (cfg_.top_p > 0.0f && cfg_.top_p < 1.0f) {
    // Sorting the whole vocabulary each step is slow, and the nucleus is small: a token other than the
    // most likely one is in it only if the tokens before it sum to at most top_p, so it and the (at most
    // n - 1) tokens after it share at least 1 - top_p, so it has at least (1 - top_p) / (n - 1). Drop
    // tokens below that before sorting (keep all when that would drop all: the top one then decides).
    const float floor = (1.0f - cfg_.top_p) / static_cast<float>(std::max<size_t>(candidates_.size() - 1, 1));
    auto kept = std::remove_if(candidates_.begin(), candidates_.end(), [&](const auto& c) { return c.first < floor; });
    if (kept != candidates_.begin()) candidates_.erase(kept, candidates_.end());
    std::sort(candidates_.begin(), candidates_.end(), by_value_desc);
    float cumulative = 0.0f;
    size_t keep = candidates_.size();
    for (size_t i = 0; i < candidates_.size(); ++i) {
      cumulative += candidates_[i].first;
      if (cumulative > cfg_.top_p) {
        keep = i + 1;
        break;
      }
    }
    candidates_.resize(keep);
  }
  float mass = 0.0f;
  for (const auto& c : candidates_) mass += c.first;
  const float coin = uniform() * mass;
  float cumulative = 0.0f;
  for (const auto& c : candidates_) {
    cumulative += c.first;
    if (coin < cumulative) return c.second;
  }
  return candidates_.back().second;  // rounding left coin at the very top
}

}  // namespace torchchat
