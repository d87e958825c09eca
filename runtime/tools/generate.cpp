#include "runtime/tools/generate.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "base/error.h"
#include "base/random.h"
#include "models/gpt.h"
#include "runtime/io/checkpoint.h"

namespace resync::runtime {

models::ModelSpec gpt_spec_from_description(const std::string& description) {
  size_t L = 0, H = 0, C = 0, T = 0, V = 0;
  if (std::sscanf(description.c_str(), "gpt L%zu H%zu C%zu T%zu V%zu", &L, &H, &C, &T, &V) != 5) {
    throw DataError(fmt::format("the checkpoint holds '{}', not a gpt model", description));
  }
  return models::gpt_spec(L, H, C, T, V);
}

namespace {

Checkpoint load(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    auto latest = load_latest_checkpoint(path);
    if (!latest) throw DataError(fmt::format("no valid checkpoint in '{}'", path));
    return std::move(latest->checkpoint);
  }
  return read_checkpoint(path);
}

// The next token from the logits of one position: greedy, or top-k sampling at a temperature.
size_t pick(const float* logits, size_t vocab, const GenerateConfig& cfg, SplitMix64& rng) {
  std::vector<size_t> order(vocab);
  std::iota(order.begin(), order.end(), size_t{0});
  if (cfg.top_k == 0) {
    return static_cast<size_t>(std::max_element(logits, logits + vocab) - logits);
  }
  const size_t k = std::min(cfg.top_k, vocab);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                    [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  std::vector<double> p(k);
  const double top = logits[order[0]];
  double sum = 0;
  for (size_t i = 0; i < k; ++i) {
    p[i] = std::exp((logits[order[i]] - top) / cfg.temperature);
    sum += p[i];
  }
  double u = rng.uniform() * sum;
  for (size_t i = 0; i < k; ++i) {
    if (u < p[i]) return order[i];
    u -= p[i];
  }
  return order[k - 1];
}

}  // namespace

std::string generate_text(const GenerateConfig& cfg) {
  RESYNC_CHECK_ARG(cfg.temperature > 0 && std::isfinite(cfg.temperature),
                   "--temperature must be a finite number > 0");
  const Checkpoint ckpt = load(cfg.checkpoint);
  const models::ModelSpec spec = gpt_spec_from_description(ckpt.meta.model);
  std::unique_ptr<models::Model> model;
  try {
    model = models::make_model(spec, 1, 0);
  } catch (const InvalidArgument& e) {
    throw DataError(fmt::format("checkpoint model '{}': {}", ckpt.meta.model, e.what()));
  }
  if (model->n_params() != ckpt.params.size() || model->describe() != ckpt.meta.model) {
    throw DataError(fmt::format("checkpoint '{}' holds {} parameters for '{}', which has {}",
                                cfg.checkpoint, ckpt.params.size(), ckpt.meta.model,
                                model->n_params()));
  }
  std::copy(ckpt.params.begin(), ckpt.params.end(), model->params().begin());

  const size_t T = spec.input_size(), V = spec.n_classes;
  std::string text = cfg.prompt.empty() ? std::string("\n") : cfg.prompt;
  SplitMix64 rng(cfg.seed);
  std::vector<float> window(T);
  for (size_t n = 0; n < cfg.tokens; ++n) {
    // The last T bytes; a shorter text fills the front of the window, and causality makes the
    // padding behind it irrelevant to the logits read at its last position.
    const size_t len = std::min(text.size(), T);
    const size_t start = text.size() - len;
    std::fill(window.begin(), window.end(), 0.0f);
    for (size_t t = 0; t < len; ++t) {
      window[t] = static_cast<float>(static_cast<unsigned char>(text[start + t]));
    }
    const std::span<const float> logits = model->logits(window.data(), 1);
    text.push_back(static_cast<char>(pick(logits.data() + (len - 1) * V, V, cfg, rng)));
  }
  return text;
}

int generate_main(int argc, char** argv) {
  GenerateConfig cfg;
  CLI::App app{"resync generate: text from a gpt checkpoint (greedy or top-k sampling)"};
  app.name("resync generate");
  app.add_option("--checkpoint", cfg.checkpoint,
                 "A checkpoint file, or a checkpoint directory (its newest valid checkpoint)")
      ->required();
  app.add_option("--prompt", cfg.prompt, "Text the generation continues")->capture_default_str();
  app.add_option("--tokens", cfg.tokens, "Bytes to generate")
      ->capture_default_str()
      ->check(CLI::Range(size_t{0}, size_t{1'000'000}));
  app.add_option("--top-k", cfg.top_k, "Sample among the k most likely bytes; 0 = greedy")
      ->capture_default_str()
      ->check(CLI::Range(size_t{0}, size_t{1'000'000}));
  app.add_option("--temperature", cfg.temperature, "Divides the logits before sampling")
      ->capture_default_str()
      ->check(CLI::Range(1e-3f, 100.0f));
  app.add_option("--seed", cfg.seed, "Seed of the sampling")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "resync: error: %s\n", e.what());
    return 2;
  }
  try {
    const std::string text = generate_text(cfg);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fputc('\n', stdout);
    return 0;
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "resync: error: %s\n", e.what());
    return 2;
  } catch (const DataError& e) {
    std::fprintf(stderr, "resync: error: %s\n", e.what());
    return 2;
  }
}

}  // namespace resync::runtime
