#include "runtime/io/idx.h"

#include <fmt/format.h>
#include <zlib.h>

#include <memory>

#include "base/error.h"

namespace resync::runtime {
namespace {

struct GzCloser {
  void operator()(gzFile f) const { gzclose(f); }
};
using GzHandle = std::unique_ptr<std::remove_pointer_t<gzFile>, GzCloser>;

[[noreturn]] void bad(const std::string& path, const std::string& why) {
  throw DataError(fmt::format("data file '{}': {}", path, why));
}

// Reads exactly n bytes or reports how many were there; gzread handles raw files too.
size_t read_some(gzFile f, const std::string& path, void* dst, size_t n_bytes) {
  size_t done = 0;
  auto* out = static_cast<unsigned char*>(dst);
  while (done < n_bytes) {
    const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n_bytes - done, 1u << 30));
    int got = gzread(f, out + done, chunk);
    if (got < 0) {
      int errnum = 0;
      const char* msg = gzerror(f, &errnum);
      bad(path, fmt::format("corrupt or unreadable ({})", msg ? msg : "zlib error"));
    }
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

}  // namespace

IdxArray read_idx(const std::string& path) {
  GzHandle file(gzopen(path.c_str(), "rb"));
  if (!file) bad(path, "cannot open (does it exist and is it readable?)");

  unsigned char magic[4];
  if (read_some(file.get(), path, magic, 4) != 4) bad(path, "too short for an IDX header");
  if (magic[0] != 0 || magic[1] != 0) {
    bad(path, fmt::format("bad magic number {:02x}{:02x}{:02x}{:02x} (not an IDX file)", magic[0],
                          magic[1], magic[2], magic[3]));
  }
  if (magic[2] != 0x08) {
    bad(path, fmt::format("element type 0x{:02x} is not supported (expected 0x08, unsigned byte)",
                          magic[2]));
  }
  const size_t n_dims = magic[3];
  if (n_dims < 1 || n_dims > 4) bad(path, fmt::format("{} dimensions (expected 1 to 4)", n_dims));

  IdxArray array;
  size_t n_elems = 1;
  for (size_t i = 0; i < n_dims; ++i) {
    unsigned char be[4];
    if (read_some(file.get(), path, be, 4) != 4) bad(path, "header ends inside the dimensions");
    const size_t dim = (size_t{be[0]} << 24) | (size_t{be[1]} << 16) | (size_t{be[2]} << 8) | be[3];
    if (dim == 0) bad(path, fmt::format("dimension {} is zero", i));
    if (n_elems > (size_t{1} << 34) / dim) bad(path, "dimensions describe more than 16 GiB");
    n_elems *= dim;
    array.dims.push_back(dim);
  }

  array.data.resize(n_elems);
  const size_t got = read_some(file.get(), path, array.data.data(), n_elems);
  if (got != n_elems) {
    bad(path, fmt::format("truncated: header promises {} bytes of data, file has {}", n_elems, got));
  }
  unsigned char extra;
  if (read_some(file.get(), path, &extra, 1) != 0) {
    bad(path, fmt::format("longer than its header says ({} bytes of data expected)", n_elems));
  }
  return array;
}

}  // namespace resync::runtime
