// `resync generate`: text from a gpt checkpoint, one byte token at a time (greedy or top-k
// sampling with a temperature), printed to stdout.
#pragma once

#include <cstdint>
#include <string>

#include "models/model.h"

namespace resync::runtime {

struct GenerateConfig {
  std::string checkpoint;  // a checkpoint file, or a --checkpoint-dir (its newest valid one)
  std::string prompt = "\n";
  size_t tokens = 200;  // bytes to generate
  size_t top_k = 40;    // 0: greedy (the most likely byte each time)
  float temperature = 0.8f;
  uint64_t seed = 1;
};

// The gpt shape a model description names ("gpt L4 H4 C256 T128 V256 (3353600 params)").
// Throws DataError for a description that is not a gpt's.
models::ModelSpec gpt_spec_from_description(const std::string& description);

// Prompt + the generated text. Throws DataError for an unreadable or non-gpt checkpoint,
// InvalidArgument for bad settings.
std::string generate_text(const GenerateConfig& cfg);

// The subcommand's entry point (argv[0] is "generate"): exit code 0, or 2 on bad input.
int generate_main(int argc, char** argv);

}  // namespace resync::runtime
