#include "runtime/io/dataset.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <numeric>

#include "base/error.h"
#include "base/random.h"
#include "runtime/io/idx.h"

namespace resync::runtime {
namespace {

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// DIR/name.gz if present, else DIR/name; DataError naming both if neither exists.
std::string find_file(const std::string& dir, const std::string& name) {
  for (const std::string& candidate : {dir + "/" + name + ".gz", dir + "/" + name}) {
    if (file_exists(candidate)) return candidate;
  }
  throw DataError(fmt::format("data directory '{}': neither {}.gz nor {} found", dir, name, name));
}

}  // namespace

void Dataset::gather(std::span<const uint32_t> indices, float* x, int32_t* y) const {
  const size_t features = n_features();
  constexpr float kScale = 1.0f / 255.0f;
  for (size_t i = 0; i < indices.size(); ++i) {
    const uint8_t* src = pixels.data() + size_t{indices[i]} * features;
    float* dst = x + i * features;
    for (size_t f = 0; f < features; ++f) dst[f] = static_cast<float>(src[f]) * kScale;
    y[i] = labels[indices[i]];
  }
}

Dataset load_idx_split(const std::string& dir, Split split) {
  const std::string prefix = split == Split::kTrain ? "train" : "t10k";
  const std::string images_path = find_file(dir, prefix + "-images-idx3-ubyte");
  const std::string labels_path = find_file(dir, prefix + "-labels-idx1-ubyte");
  IdxArray images = read_idx(images_path);
  IdxArray labels = read_idx(labels_path);
  if (images.dims.size() != 3) {
    throw DataError(fmt::format("data file '{}': images need 3 dimensions (N x H x W), found {}",
                                images_path, images.dims.size()));
  }
  if (labels.dims.size() != 1) {
    throw DataError(fmt::format("data file '{}': labels need 1 dimension, found {}", labels_path,
                                labels.dims.size()));
  }
  if (images.dims[0] != labels.dims[0]) {
    throw DataError(fmt::format("data files '{}' and '{}' disagree: {} images but {} labels",
                                images_path, labels_path, images.dims[0], labels.dims[0]));
  }
  Dataset d;
  d.name = dir + ":" + prefix;
  d.height = images.dims[1];
  d.width = images.dims[2];
  d.pixels = std::move(images.data);
  d.labels.resize(labels.dims[0]);
  for (size_t i = 0; i < d.labels.size(); ++i) {
    if (labels.data[i] >= d.n_classes) {
      throw DataError(fmt::format("data file '{}': label {} of sample {} is outside 0..{}",
                                  labels_path, labels.data[i], i, d.n_classes - 1));
    }
    d.labels[i] = labels.data[i];
  }
  return d;
}

Dataset make_synthetic(size_t n_samples, uint64_t seed, uint64_t stream) {
  Dataset d;
  d.name = "synthetic";
  const size_t features = d.n_features();
  // Prototypes depend on the seed only, so train and test sets share them.
  std::vector<float> prototypes(d.n_classes * features);
  SplitMix64 proto_rng(mix_seed(seed, 0x5EED));
  for (float& p : prototypes) p = static_cast<float>(proto_rng.uniform());

  SplitMix64 rng(mix_seed(seed, 0xDA7A, stream));
  d.pixels.resize(n_samples * features);
  d.labels.resize(n_samples);
  for (size_t i = 0; i < n_samples; ++i) {
    const auto label = static_cast<int32_t>(rng.below(d.n_classes));
    d.labels[i] = label;
    const float* proto = prototypes.data() + size_t(label) * features;
    const float contrast = 0.5f + 0.5f * static_cast<float>(rng.uniform());
    uint8_t* out = d.pixels.data() + i * features;
    for (size_t f = 0; f < features; ++f) {
      float v = contrast * proto[f] + 1.0f * static_cast<float>(rng.normal());
      v = std::clamp(v, 0.0f, 1.0f);
      out[f] = static_cast<uint8_t>(v * 255.0f + 0.5f);
    }
  }
  return d;
}

DataSplits load_data(const std::string& spec, uint64_t seed, size_t synthetic_train,
                     size_t synthetic_test) {
  if (spec == "synthetic") {
    return {make_synthetic(synthetic_train, seed, 1), make_synthetic(synthetic_test, seed, 2)};
  }
  std::string dir;
  if (spec == "fashion-mnist") {
    dir = kFashionMnistDir;
  } else if (spec.rfind("idx:", 0) == 0) {
    dir = spec.substr(4);
  } else {
    throw InvalidArgument(fmt::format("--data '{}': expected fashion-mnist, idx:DIR or synthetic", spec));
  }
  DataSplits splits{load_idx_split(dir, Split::kTrain), load_idx_split(dir, Split::kTest)};
  if (splits.train.n_features() != splits.test.n_features()) {
    throw DataError(fmt::format("data directory '{}': train images are {}x{} but test images {}x{}",
                                dir, splits.train.height, splits.train.width, splits.test.height,
                                splits.test.width));
  }
  return splits;
}

ShardSampler::ShardSampler(size_t n_samples, int world, int rank, size_t batch_size, uint64_t seed)
    : n_samples_(n_samples),
      world_(world),
      rank_(rank),
      batch_size_(batch_size),
      seed_(seed),
      shard_size_(n_samples / static_cast<size_t>(world)),
      steps_per_epoch_(shard_size_ / batch_size) {
  if (steps_per_epoch_ == 0) {
    throw InvalidArgument(fmt::format(
        "--batch-size {} is larger than each rank's shard ({} samples / {} ranks = {})", batch_size,
        n_samples, world, shard_size_));
  }
  permutation_.resize(n_samples_);
}

std::span<const uint32_t> ShardSampler::batch(uint64_t step) {
  const size_t epoch = epoch_of(step);
  if (epoch != cached_epoch_) {
    std::iota(permutation_.begin(), permutation_.end(), 0u);
    SplitMix64 rng(mix_seed(seed_, 0x5A3D, epoch));
    for (size_t i = n_samples_ - 1; i > 0; --i) {  // Fisher-Yates, portable
      std::swap(permutation_[i], permutation_[rng.below(i + 1)]);
    }
    cached_epoch_ = epoch;
  }
  const size_t in_epoch = step % steps_per_epoch_;
  const size_t begin = size_t(rank_) * shard_size_ + in_epoch * batch_size_;
  return {permutation_.data() + begin, batch_size_};
}

}  // namespace resync::runtime
