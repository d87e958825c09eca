// Labelled image data sets (Fashion-MNIST, any MNIST-format directory, a synthetic set), byte-level
// text (any file, the King James Bible of Debian's bible-kjv) and the per-rank sampler that gives each rank its own shard, reshuffled every epoch from the seed.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace resync::runtime {

// Images stored as bytes (scaled to [0, 1] floats only when a batch is gathered), or text.
// Text (context > 0): byte tokens, n_classes 256, features = context; sample i is the window of
// context + 1 bytes at i * context: x its first context bytes (as floats), y the next byte of
// each, so a sample has context labels.
struct Dataset {
  std::string name;
  size_t channels = 1, height = 28, width = 28;
  size_t n_classes = 10;
  std::vector<uint8_t> pixels;  // n_samples x features
  std::vector<int32_t> labels;  // n_samples
  std::vector<uint8_t> text;    // text: the bytes of this split
  size_t context = 0;           // text: tokens per sample (T); 0 for images

  size_t n_samples() const {
    if (context == 0) return labels.size();
    return text.size() > context ? (text.size() - 1) / context : 0;
  }
  size_t n_features() const { return channels * height * width; }
  size_t labels_per_sample() const { return context == 0 ? 1 : context; }
  // Copies samples `indices` into x (indices.size() x features; images scaled to [0,1], text as
  // token ids) and y (indices.size() x labels_per_sample()).
  void gather(std::span<const uint32_t> indices, float* x, int32_t* y) const;
};

struct DataSplits {
  Dataset train;
  Dataset test;
};

enum class Split { kTrain, kTest };

// Default location of Debian's dataset-fashion-mnist package.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// Loads `spec`: "fashion-mnist", "idx:DIR", "synthetic", "text:FILE" or "bible-kjv" (text
// windows of `context` tokens). Throws DataError / InvalidArgument.
DataSplits load_data(const std::string& spec, uint64_t seed, size_t synthetic_train,
                     size_t synthetic_test, size_t context = 128);

// Text: the first 90% of the bytes train, the last 10% validate (the "test" split). A file that
// is missing, unreadable, empty or too short for one window in each split throws DataError.
DataSplits load_text(const std::string& path, size_t context);

// The King James Bible as Debian's bible-kjv prints it (`bible -l79 gen1:1-rev22:21`, 4.3 MB),
// generated once into $XDG_CACHE_HOME/resync/bible-kjv.txt (default ~/.cache) and read from
// there. Returns the path; DataError if the `bible` program is missing or fails.
std::string bible_kjv_path();

// Reads an MNIST-format pair DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
Dataset load_idx_split(const std::string& dir, Split split);

// A learnable synthetic set: each class is a random prototype image; samples are noisy,
// shifted copies of their prototype. Same seed -> same bytes.
Dataset make_synthetic(size_t n_samples, uint64_t seed, uint64_t stream);

// Which training samples rank `rank` of `world` uses at a given step. Every epoch a fresh
// global permutation (from seed and epoch) is cut into `world` equal shards; a step's batch is a
// slice of this rank's shard. A pure function of the step, so a rank that catches up at any
// step knows its data position.
class ShardSampler {
 public:
  ShardSampler(size_t n_samples, int world, int rank, size_t batch_size, uint64_t seed);

  size_t steps_per_epoch() const { return steps_per_epoch_; }
  size_t epoch_of(uint64_t step) const { return step / steps_per_epoch_; }
  // Indices of this rank's batch at `step` (valid until the next call).
  std::span<const uint32_t> batch(uint64_t step);

 private:
  size_t n_samples_;
  int world_;
  int rank_;
  size_t batch_size_;
  uint64_t seed_;
  size_t shard_size_;
  size_t steps_per_epoch_;
  size_t cached_epoch_ = SIZE_MAX;
  std::vector<uint32_t> permutation_;
};

}  // namespace resync::runtime
