// IDX reader, data sets and the shard sampler.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "base/error.h"
#include "runtime/io/dataset.h"
#include "runtime/io/idx.h"

namespace fs = std::filesystem;
using resync::DataError;
using namespace resync::runtime;

namespace {

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("resync_data_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

std::vector<uint8_t> idx_bytes(std::vector<uint32_t> dims, const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> out = {0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(d >> s));
  }
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

void write_raw(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void write_gz(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), int(bytes.size()));
  gzclose(f);
}

std::string error_of(const std::string& path) {
  try {
    read_idx(path);
  } catch (const DataError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST(Idx, ReadsRawAndGzipIdentically) {
  TempDir dir;
  std::vector<uint8_t> payload(2 * 3 * 4);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i * 7);
  write_raw(dir.file("a"), idx_bytes({2, 3, 4}, payload));
  write_gz(dir.file("a.gz"), idx_bytes({2, 3, 4}, payload));
  for (const char* name : {"a", "a.gz"}) {
    IdxArray arr = read_idx(dir.file(name));
    EXPECT_EQ(arr.dims, (std::vector<size_t>{2, 3, 4})) << name;
    EXPECT_EQ(arr.data, payload) << name;
  }
}

TEST(Idx, RejectsBadFilesNamingFileAndProblem) {
  TempDir dir;
  std::vector<uint8_t> payload(6, 1);
  std::vector<uint8_t> good = idx_bytes({2, 3}, payload);

  std::vector<uint8_t> bad_magic = good;
  bad_magic[0] = 0x1f;
  write_raw(dir.file("magic"), bad_magic);
  EXPECT_NE(error_of(dir.file("magic")).find("bad magic"), std::string::npos);
  EXPECT_NE(error_of(dir.file("magic")).find(dir.file("magic")), std::string::npos);

  std::vector<uint8_t> bad_type = good;
  bad_type[2] = 0x0D;  // float
  write_raw(dir.file("type"), bad_type);
  EXPECT_NE(error_of(dir.file("type")).find("element type"), std::string::npos);

  write_raw(dir.file("trunc"), std::vector<uint8_t>(good.begin(), good.end() - 1));
  EXPECT_NE(error_of(dir.file("trunc")).find("truncated"), std::string::npos);

  std::vector<uint8_t> longer = good;
  longer.push_back(9);
  write_raw(dir.file("long"), longer);
  EXPECT_NE(error_of(dir.file("long")).find("longer"), std::string::npos);

  write_raw(dir.file("short"), {0, 0, 8});
  EXPECT_NE(error_of(dir.file("short")).find("too short"), std::string::npos);

  write_raw(dir.file("zero"), idx_bytes({0, 3}, {}));
  EXPECT_NE(error_of(dir.file("zero")).find("zero"), std::string::npos);

  EXPECT_NE(error_of(dir.file("missing")).find("cannot open"), std::string::npos);

  // A gzip stream cut in the middle is corrupt, not silently short.
  std::vector<uint8_t> big_payload(5000);
  for (size_t i = 0; i < big_payload.size(); ++i) big_payload[i] = static_cast<uint8_t>(i * 31 + i / 7);
  write_gz(dir.file("whole.gz"), idx_bytes({50, 100}, big_payload));
  std::ifstream in(dir.file("whole.gz"), std::ios::binary);
  std::vector<char> gz((std::istreambuf_iterator<char>(in)), {});
  gz.resize(gz.size() / 2);
  write_raw(dir.file("cut.gz"), std::vector<uint8_t>(gz.begin(), gz.end()));
  EXPECT_NE(error_of(dir.file("cut.gz")), "no error");
}

TEST(Idx, DirectoryNeedsMatchingImagesAndLabels) {
  TempDir dir;
  write_gz(dir.file("train-images-idx3-ubyte.gz"), idx_bytes({3, 2, 2}, std::vector<uint8_t>(12, 255)));
  write_raw(dir.file("train-labels-idx1-ubyte"), idx_bytes({3}, {0, 9, 4}));
  Dataset d = load_idx_split(dir.file(""), Split::kTrain);
  ASSERT_EQ(d.n_samples(), 3u);
  EXPECT_EQ(d.n_features(), 4u);
  std::vector<uint32_t> idx = {2, 0};
  std::vector<float> x(8);
  std::vector<int32_t> y(2);
  d.gather(idx, x.data(), y.data());
  EXPECT_EQ(y[0], 4);
  EXPECT_EQ(y[1], 0);
  EXPECT_FLOAT_EQ(x[0], 1.0f);

  write_raw(dir.file("train-labels-idx1-ubyte"), idx_bytes({2}, {0, 1}));
  EXPECT_THROW(load_idx_split(dir.file(""), Split::kTrain), DataError);
  write_raw(dir.file("train-labels-idx1-ubyte"), idx_bytes({3}, {0, 10, 1}));
  EXPECT_THROW(load_idx_split(dir.file(""), Split::kTrain), DataError);
  EXPECT_THROW(load_idx_split(dir.file(""), Split::kTest), DataError);  // no t10k files
}

TEST(Synthetic, DeterministicFromSeedAndBalanced) {
  Dataset a = make_synthetic(500, 7, 1);
  Dataset b = make_synthetic(500, 7, 1);
  Dataset c = make_synthetic(500, 8, 1);
  EXPECT_EQ(a.pixels, b.pixels);
  EXPECT_EQ(a.labels, b.labels);
  EXPECT_NE(a.pixels, c.pixels);
  std::vector<int> counts(10);
  for (int32_t l : a.labels) counts.at(l)++;
  for (int k = 0; k < 10; ++k) EXPECT_GT(counts[k], 20) << "class " << k;
}

TEST(ShardSampler, ShardsAreDisjointAndCoverEachEpoch) {
  const size_t n = 1003, batch = 10;
  const int world = 3;
  std::set<uint32_t> seen;
  size_t steps = 0;
  for (int r = 0; r < world; ++r) {
    ShardSampler s(n, world, r, batch, 42);
    EXPECT_EQ(s.steps_per_epoch(), (n / world) / batch);
    steps = s.steps_per_epoch();
    for (uint64_t step = 0; step < steps; ++step) {
      for (uint32_t i : s.batch(step)) {
        EXPECT_LT(i, n);
        EXPECT_TRUE(seen.insert(i).second) << "sample " << i << " used twice (rank " << r << ")";
      }
    }
  }
  EXPECT_EQ(seen.size(), world * steps * batch);
}

TEST(ShardSampler, ReshufflesEveryEpochAndIsAPureFunctionOfTheStep) {
  ShardSampler a(600, 2, 1, 20, 5);
  ShardSampler b(600, 2, 1, 20, 5);
  const uint64_t spe = a.steps_per_epoch();
  std::vector<uint32_t> e0(a.batch(0).begin(), a.batch(0).end());
  std::vector<uint32_t> e1(a.batch(spe).begin(), a.batch(spe).end());
  EXPECT_NE(e0, e1);
  // b jumps straight to a later step (as a catching-up rank does) and agrees with a.
  std::vector<uint32_t> late(b.batch(spe + 3).begin(), b.batch(spe + 3).end());
  std::vector<uint32_t> in_order(a.batch(spe + 3).begin(), a.batch(spe + 3).end());
  EXPECT_EQ(late, in_order);
  std::vector<uint32_t> back(b.batch(0).begin(), b.batch(0).end());
  EXPECT_EQ(back, e0);
}

TEST(ShardSampler, RejectsBatchLargerThanShard) {
  EXPECT_THROW(ShardSampler(100, 4, 0, 30, 1), resync::InvalidArgument);
}
