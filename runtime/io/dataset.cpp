#include "runtime/io/dataset.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
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
  if (context > 0) {
    for (size_t i = 0; i < indices.size(); ++i) {
      const uint8_t* src = text.data() + size_t{indices[i]} * context;
      float* dst = x + i * context;
      int32_t* next = y + i * context;
      for (size_t t = 0; t < context; ++t) {
        dst[t] = static_cast<float>(src[t]);
        next[t] = static_cast<int32_t>(src[t + 1]);
      }
    }
    return;
  }
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

namespace {

std::vector<uint8_t> read_bytes(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    throw DataError(fmt::format("text file '{}': {}", path, std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) throw DataError(fmt::format("text file '{}' is not a file", path));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(fmt::format("text file '{}' cannot be read", path));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  if (in.bad()) throw DataError(fmt::format("text file '{}': read error", path));
  if (bytes.empty()) throw DataError(fmt::format("text file '{}' is empty", path));
  return bytes;
}

Dataset text_split(const std::string& name, std::vector<uint8_t> bytes, size_t context) {
  Dataset d;
  d.name = name;
  d.channels = 1;
  d.height = 1;
  d.width = context;
  d.n_classes = 256;
  d.text = std::move(bytes);
  d.context = context;
  return d;
}

}  // namespace

DataSplits load_text(const std::string& path, size_t context) {
  RESYNC_CHECK_ARG(context > 0, "--context must be > 0");
  std::vector<uint8_t> bytes = read_bytes(path);
  const size_t n_train = bytes.size() / 10 * 9;
  // Each split needs one window of context + 1 bytes.
  if (n_train < context + 1 || bytes.size() - n_train < context + 1) {
    throw DataError(fmt::format(
        "text file '{}' of {} bytes is too short: its train (90%) and validation (10%) splits "
        "need {} bytes each for one window of --context {}",
        path, bytes.size(), context + 1, context));
  }
  std::vector<uint8_t> valid(bytes.begin() + static_cast<std::ptrdiff_t>(n_train), bytes.end());
  bytes.resize(n_train);
  return {text_split(path + ":train", std::move(bytes), context),
          text_split(path + ":validation", std::move(valid), context)};
}

std::string bible_kjv_path() {
  std::string dir;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    dir = std::string(xdg) + "/resync";
  } else if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    dir = std::string(home) + "/.cache/resync";
  } else {
    dir = "/tmp/resync-cache";
  }
  const std::string path = dir + "/bible-kjv.txt";
  if (file_exists(path)) return path;
  // Several ranks may get here at once: each writes its own file and renames it into place.
  for (size_t at = dir.find('/', 1); ; at = dir.find('/', at + 1)) {
    ::mkdir(dir.substr(0, at).c_str(), 0755);
    if (at == std::string::npos) break;
  }
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  // -l79: the line width the package's own default gives, fixed so the bytes never depend on
  // the terminal (COLUMNS).
  const std::string command = fmt::format("bible -l79 gen1:1-rev22:21 > '{}' 2>/dev/null", tmp);
  const int rc = std::system(command.c_str());
  struct stat st;
  const bool ok = rc == 0 && ::stat(tmp.c_str(), &st) == 0 && st.st_size > 4'000'000;
  if (!ok) {
    ::unlink(tmp.c_str());
    throw DataError(
        "--data bible-kjv: the `bible` program of Debian's bible-kjv package failed or is "
        "missing (scripts/setup.sh installs it)");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw DataError(fmt::format("--data bible-kjv: cannot write '{}': {}", path,
                                std::strerror(errno)));
  }
  return path;
}

DataSplits load_data(const std::string& spec, uint64_t seed, size_t synthetic_train,
                     size_t synthetic_test, size_t context) {
  if (spec == "bible-kjv") return load_text(bible_kjv_path(), context);
  if (spec.rfind("text:", 0) == 0) return load_text(spec.substr(5), context);
  if (spec == "synthetic") {
    return {make_synthetic(synthetic_train, seed, 1), make_synthetic(synthetic_test, seed, 2)};
  }
  std::string dir;
  if (spec == "fashion-mnist") {
    dir = kFashionMnistDir;
  } else if (spec.rfind("idx:", 0) == 0) {
    dir = spec.substr(4);
  } else {
    throw InvalidArgument(fmt::format(
        "--data '{}': expected fashion-mnist, idx:DIR, synthetic, text:FILE or bible-kjv", spec));
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
