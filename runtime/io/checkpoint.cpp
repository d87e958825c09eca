#include "runtime/io/checkpoint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "base/error.h"
#include "base/log.h"
#include "runtime/train/finite.h"

namespace resync::runtime {
namespace {

namespace fs = std::filesystem;

static_assert(std::endian::native == std::endian::little,
              "the checkpoint format is little-endian; a big-endian build needs byte swaps");

constexpr std::string_view kPrefix = "ckpt-";
constexpr std::string_view kSuffix = ".rsck";
constexpr std::string_view kTempSuffix = ".tmp";
constexpr size_t kCrcOffset = 12;

// Closes on scope exit, so that no error path leaks a descriptor.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

[[noreturn]] void io_failed(const std::string& what, const std::string& path, int err) {
  throw Error(fmt::format("checkpoint {}: {} failed ({})", path, what, std::strerror(err)));
}

// Appends plain values and float arrays to a byte buffer.
class Writer {
 public:
  explicit Writer(size_t reserve_bytes) { bytes_.reserve(reserve_bytes); }
  template <typename T>
  void put(T value) {
    const auto* p = reinterpret_cast<const uint8_t*>(&value);
    bytes_.insert(bytes_.end(), p, p + sizeof(T));
  }
  void put_bytes(const void* data, size_t n_bytes) {
    const auto* p = static_cast<const uint8_t*>(data);
    bytes_.insert(bytes_.end(), p, p + n_bytes);
  }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

// Reads what Writer wrote; running past the end throws DataError naming the file.
class Reader {
 public:
  Reader(std::span<const uint8_t> bytes, const std::string& path) : bytes_(bytes), path_(path) {}
  template <typename T>
  T get(const char* field) {
    T value;
    std::memcpy(&value, take(sizeof(T), field), sizeof(T));
    return value;
  }
  std::string get_string(size_t n_bytes, const char* field) {
    const uint8_t* p = take(n_bytes, field);
    return std::string(reinterpret_cast<const char*>(p), n_bytes);
  }
  std::vector<float> get_floats(const char* field) {
    const auto n_elems = get<uint64_t>(field);
    if (n_elems > (bytes_.size() - pos_) / sizeof(float)) malformed(field);
    std::vector<float> out(n_elems);
    const uint8_t* src = take(n_elems * sizeof(float), field);
    if (n_elems > 0) std::memcpy(out.data(), src, n_elems * sizeof(float));  // data() may be null
    return out;
  }
  bool at_end() const { return pos_ == bytes_.size(); }
  size_t remaining() const { return bytes_.size() - pos_; }
  [[noreturn]] void malformed(const char* field) const {
    throw DataError(fmt::format("checkpoint {}: malformed contents (field '{}' at byte {})",
                                path_, field, kCheckpointHeaderBytes + pos_));
  }

 private:
  const uint8_t* take(size_t n_bytes, const char* field) {
    if (n_bytes > bytes_.size() - pos_) malformed(field);
    const uint8_t* p = bytes_.data() + pos_;
    pos_ += n_bytes;
    return p;
  }

  std::span<const uint8_t> bytes_;
  const std::string& path_;
  size_t pos_ = 0;
};

// The optimizer's code in the header (the word that format version 1 kept as reserved, 0: SGD,
// so every earlier checkpoint reads as SGD's).
constexpr std::string_view kOptimizerCodes[] = {"sgd", "adamw"};

uint32_t optimizer_code(const std::string& name) {
  for (uint32_t i = 0; i < std::size(kOptimizerCodes); ++i) {
    if (kOptimizerCodes[i] == name) return i;
  }
  throw InvalidArgument(fmt::format("checkpoint: unknown optimizer '{}'", name));
}

// CRC-32 of the file without its own four bytes; zlib's crc32 takes at most 4 GiB per call.
uint32_t file_crc(std::span<const uint8_t> file) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  auto feed = [&crc](std::span<const uint8_t> part) {
    while (!part.empty()) {
      const size_t n = std::min<size_t>(part.size(), 1u << 30);
      crc = ::crc32(crc, part.data(), static_cast<uInt>(n));
      part = part.subspan(n);
    }
  };
  feed(file.first(kCrcOffset));
  feed(file.subspan(kCrcOffset + 4));
  return static_cast<uint32_t>(crc);
}

std::vector<uint8_t> encode(const CheckpointMeta& meta, std::span<const float> params,
                            std::span<const float> state) {
  Writer w(kCheckpointHeaderBytes + 64 + meta.model.size() + params.size_bytes() +
           state.size_bytes() + 8 * (meta.worker_steps.size() + meta.shard_versions.size()));
  w.put_bytes(kCheckpointMagic, sizeof(kCheckpointMagic));
  const uint32_t version = !meta.shard_versions.empty() ? kCheckpointVersion
                           : !meta.worker_steps.empty() ? kCheckpointVersionWorkerSteps
                                                        : kCheckpointVersionPlain;
  w.put<uint32_t>(version);
  w.put<uint32_t>(0);  // CRC, filled in below
  w.put<uint64_t>(0);  // body bytes, filled in below
  w.put<uint64_t>(meta.step);
  w.put<uint32_t>(static_cast<uint32_t>(meta.world_size));
  w.put<uint32_t>(optimizer_code(meta.optimizer));
  w.put<uint64_t>(meta.seed);
  w.put<uint64_t>(meta.batch_size);
  w.put<uint32_t>(static_cast<uint32_t>(meta.model.size()));
  w.put_bytes(meta.model.data(), meta.model.size());
  w.put<uint64_t>(params.size());
  w.put_bytes(params.data(), params.size_bytes());
  w.put<uint64_t>(state.size());
  w.put_bytes(state.data(), state.size_bytes());
  if (version != kCheckpointVersionPlain) {
    w.put<uint32_t>(static_cast<uint32_t>(meta.worker_steps.size()));
    for (uint64_t steps : meta.worker_steps) w.put<uint64_t>(steps);
  }
  if (version == kCheckpointVersion) {
    w.put<uint32_t>(static_cast<uint32_t>(meta.shard_versions.size()));
    for (uint64_t v : meta.shard_versions) w.put<uint64_t>(v);
  }

  std::vector<uint8_t>& bytes = w.bytes();
  const uint64_t body_bytes = bytes.size() - kCheckpointHeaderBytes;
  std::memcpy(bytes.data() + 16, &body_bytes, sizeof(body_bytes));
  const uint32_t crc = file_crc(bytes);
  std::memcpy(bytes.data() + kCrcOffset, &crc, sizeof(crc));
  return std::move(bytes);
}

void write_all(int fd, std::span<const uint8_t> bytes, const std::string& path) {
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      io_failed("write", path, errno);
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
}

void fsync_dir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) io_failed("open of the directory", dir, errno);
  if (::fsync(fd.get()) != 0 && errno != EINVAL) io_failed("fsync of the directory", dir, errno);
}

std::vector<uint8_t> read_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    throw DataError(fmt::format("checkpoint {}: cannot open ({})", path, std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    throw DataError(fmt::format("checkpoint {}: cannot stat ({})", path, std::strerror(errno)));
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      throw DataError(fmt::format("checkpoint {}: read failed ({})", path, std::strerror(errno)));
    }
    if (n == 0) break;  // shrank meanwhile: the size check reports it
    done += static_cast<size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

// The step of a checkpoint file name, or nullopt for any other name (temp files included).
std::optional<uint64_t> step_of_name(std::string_view name) {
  if (name.size() <= kPrefix.size() + kSuffix.size() || !name.starts_with(kPrefix) ||
      !name.ends_with(kSuffix)) {
    return std::nullopt;
  }
  const std::string_view digits =
      name.substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;
  }
  uint64_t step = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return step;
}

bool is_temp_name(std::string_view name) {
  return name.starts_with(".") && name.substr(1).starts_with(kPrefix) &&
         name.ends_with(kTempSuffix);
}

}  // namespace

std::string checkpoint_file_name(uint64_t step) {
  return fmt::format("{}{:09d}{}", kPrefix, step, kSuffix);
}

void prepare_checkpoint_dir(const std::string& dir) {
  auto fail = [&dir](const std::string& why) {
    throw InvalidArgument(fmt::format("--checkpoint-dir '{}': {}", dir, why));
  };
  if (dir.empty()) fail("empty path");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("cannot create the directory (" + ec.message() + ")");
  if (!fs::is_directory(dir, ec)) fail("not a directory");
  // Creating a file is what a checkpoint needs: test exactly that (permissions, read-only
  // file systems, ACLs all show up here and not at the first checkpoint hours later).
  const std::string probe = (fs::path(dir) / fmt::format(".resync-probe-{}", ::getpid())).string();
  {
    Fd fd(::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) fail(fmt::format("cannot write into it ({})", std::strerror(errno)));
  }
  ::unlink(probe.c_str());
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (is_temp_name(name)) {
      log::get("ckpt")->info("removing {}, left by a writer that did not finish",
                             entry.path().string());
      fs::remove(entry.path(), ec);
    }
  }
}

std::string write_checkpoint(const std::string& dir, const CheckpointMeta& meta,
                             std::span<const float> params,
                             std::span<const float> optimizer_state) {
  // A diverged state (NaN or inf) is never written: NonFiniteError before any file is touched.
  check_finite_values(params, "parameters to checkpoint", meta.step, process_rank());
  check_finite_values(optimizer_state, "optimizer state to checkpoint", meta.step, process_rank());
  const std::vector<uint8_t> bytes = encode(meta, params, optimizer_state);
  const std::string name = checkpoint_file_name(meta.step);
  const std::string path = (fs::path(dir) / name).string();
  // One temp file per writer: after a rank died, several survivors may save the same step.
  const std::string temp =
      (fs::path(dir) / fmt::format(".{}.{}{}", name, ::getpid(), kTempSuffix)).string();
  {
    Fd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) io_failed("create", temp, errno);
    write_all(fd.get(), bytes, temp);
    if (::fsync(fd.get()) != 0) io_failed("fsync", temp, errno);
    if (::close(fd.release()) != 0) io_failed("close", temp, errno);
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    io_failed("rename to " + path, temp, err);
  }
  fsync_dir(dir);  // makes the rename itself durable
  return path;
}

Checkpoint read_checkpoint(const std::string& path) {
  const std::vector<uint8_t> file = read_file(path);
  if (file.size() < kCheckpointHeaderBytes) {
    throw DataError(fmt::format("checkpoint {}: truncated ({} bytes, the header alone has {})",
                                path, file.size(), kCheckpointHeaderBytes));
  }
  if (std::memcmp(file.data(), kCheckpointMagic, sizeof(kCheckpointMagic)) != 0) {
    throw DataError(fmt::format("checkpoint {}: not a resync checkpoint (wrong magic)", path));
  }
  uint32_t version = 0;
  std::memcpy(&version, file.data() + 8, sizeof(version));
  if (version < kCheckpointVersionPlain || version > kCheckpointVersion) {
    throw DataError(fmt::format("checkpoint {}: format version {}, this build reads versions {} to {}",
                                path, version, kCheckpointVersionPlain, kCheckpointVersion));
  }
  uint64_t body_bytes = 0;
  std::memcpy(&body_bytes, file.data() + 16, sizeof(body_bytes));
  const size_t actual_body = file.size() - kCheckpointHeaderBytes;
  if (body_bytes != actual_body) {
    throw DataError(fmt::format("checkpoint {}: {} ({} bytes, the header says {})", path,
                                actual_body < body_bytes ? "truncated" : "has trailing bytes",
                                file.size(), kCheckpointHeaderBytes + body_bytes));
  }
  uint32_t stored_crc = 0;
  std::memcpy(&stored_crc, file.data() + kCrcOffset, sizeof(stored_crc));
  const uint32_t crc = file_crc(file);
  if (crc != stored_crc) {
    throw DataError(fmt::format("checkpoint {}: CRC mismatch (stored {:08x}, computed {:08x})",
                                path, stored_crc, crc));
  }

  Reader r(std::span<const uint8_t>(file).subspan(kCheckpointHeaderBytes), path);
  Checkpoint c;
  c.meta.step = r.get<uint64_t>("step");
  c.meta.world_size = static_cast<int>(r.get<uint32_t>("world size"));
  const auto optimizer = r.get<uint32_t>("optimizer");
  if (optimizer >= std::size(kOptimizerCodes)) r.malformed("optimizer");
  c.meta.optimizer = std::string(kOptimizerCodes[optimizer]);
  c.meta.seed = r.get<uint64_t>("seed");
  c.meta.batch_size = r.get<uint64_t>("batch size");
  const auto model_bytes = r.get<uint32_t>("model description length");
  c.meta.model = r.get_string(model_bytes, "model description");
  c.params = r.get_floats("parameters");
  c.optimizer_state = r.get_floats("optimizer state");
  if (version != kCheckpointVersionPlain) {
    // Fewer workers than ranks (version 2: at least one); the run's progress is the slowest
    // worker's.
    const auto n_workers = r.get<uint32_t>("worker count");
    const size_t versions_bytes = version == kCheckpointVersion ? 4 + sizeof(uint64_t) : 0;
    if ((n_workers == 0 && version == kCheckpointVersionWorkerSteps) ||
        int64_t(n_workers) >= int64_t(c.meta.world_size) ||
        r.remaining() < size_t(n_workers) * sizeof(uint64_t) + versions_bytes) {
      r.malformed("worker count");
    }
    c.meta.worker_steps.resize(n_workers);
    for (uint64_t& steps : c.meta.worker_steps) steps = r.get<uint64_t>("worker steps");
    if (n_workers > 0 &&
        *std::min_element(c.meta.worker_steps.begin(), c.meta.worker_steps.end()) != c.meta.step) {
      r.malformed("worker steps (their minimum is not the step)");
    }
  }
  if (version == kCheckpointVersion) {
    const auto n_shards = r.get<uint32_t>("shard count");
    if (n_shards == 0 || int64_t(n_shards) >= int64_t(c.meta.world_size) ||
        r.remaining() != size_t(n_shards) * sizeof(uint64_t)) {
      r.malformed("shard count");
    }
    c.meta.shard_versions.resize(n_shards);
    for (uint64_t& v : c.meta.shard_versions) v = r.get<uint64_t>("shard versions");
  }
  if (!r.at_end()) r.malformed("end of contents");
  return c;
}

std::vector<CheckpointFile> list_checkpoints(const std::string& dir) {
  std::vector<CheckpointFile> out;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return out;
  fs::directory_iterator it(dir, ec);
  if (ec) throw DataError(fmt::format("checkpoint directory {}: {}", dir, ec.message()));
  for (const fs::directory_entry& entry : it) {
    if (std::optional<uint64_t> step = step_of_name(entry.path().filename().string())) {
      out.push_back({*step, entry.path().string()});
    }
  }
  std::sort(out.begin(), out.end(),
            [](const CheckpointFile& a, const CheckpointFile& b) { return a.step < b.step; });
  return out;
}

std::vector<std::string> prune_checkpoints(const std::string& dir, size_t keep) {
  RESYNC_CHECK_ARG(keep >= 1, "prune_checkpoints: keep must be at least 1");
  const std::vector<CheckpointFile> files = list_checkpoints(dir);
  std::vector<std::string> removed;
  for (size_t i = 0; i + keep < files.size(); ++i) {
    std::error_code ec;
    if (fs::remove(files[i].path, ec)) {
      removed.push_back(files[i].path);
    } else if (ec) {
      log::get("ckpt")->warn("could not remove old checkpoint {}: {}", files[i].path,
                             ec.message());
    }
  }
  return removed;
}

std::optional<LoadedCheckpoint> load_latest_checkpoint(const std::string& dir) {
  const std::vector<CheckpointFile> files = list_checkpoints(dir);
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    try {
      return LoadedCheckpoint{it->path, read_checkpoint(it->path)};
    } catch (const DataError& e) {
      log::get("ckpt")->warn("{}: skipped", e.what());
    }
  }
  return std::nullopt;
}

void check_resumable(const Checkpoint& ckpt, const std::string& path, const std::string& model,
                     size_t n_params, size_t n_state) {
  if (ckpt.meta.model != model) {
    throw InvalidArgument(fmt::format("--resume: checkpoint {} holds model '{}', this run "
                                      "trains '{}'",
                                      path, ckpt.meta.model, model));
  }
  if (ckpt.params.size() != n_params || ckpt.optimizer_state.size() != n_state) {
    throw InvalidArgument(fmt::format(
        "--resume: checkpoint {} holds {} parameters and {} optimizer values, model '{}' needs {} "
        "and {}",
        path, ckpt.params.size(), ckpt.optimizer_state.size(), model, n_params, n_state));
  }
}

std::string write_checkpoint(const std::string& dir, const CheckpointMeta& meta,
                             std::span<const std::span<float>> state) {
  RESYNC_CHECK_ARG(!state.empty(), "checkpoint: a state without parameters");
  std::vector<float> optimizer_state;
  for (std::span<const float> buffer : state.subspan(1)) {
    optimizer_state.insert(optimizer_state.end(), buffer.begin(), buffer.end());
  }
  return write_checkpoint(dir, meta, state[0], optimizer_state);
}

void restore_state(const Checkpoint& ckpt, const std::string& path, const std::string& model,
                   const StateLayout& layout, std::span<const std::span<float>> state) {
  RESYNC_CHECK_ARG(state.size() == layout.n_parts(), "checkpoint: state parts and layout differ");
  check_resumable(ckpt, path, model, layout.n_params, layout.n_optimizer_floats());
  std::copy(ckpt.params.begin(), ckpt.params.end(), state[0].begin());
  for (size_t j = 0; j < layout.n_optimizer_buffers; ++j) {
    const auto first = ckpt.optimizer_state.begin() + static_cast<ptrdiff_t>(j * layout.n_params);
    std::copy(first, first + static_cast<ptrdiff_t>(layout.n_params), state[1 + j].begin());
  }
}

}  // namespace resync::runtime
