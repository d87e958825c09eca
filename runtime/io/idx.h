// Reader of IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace resync::runtime {

// An IDX array of unsigned bytes (type code 0x08), the only element type MNIST-format data uses.
struct IdxArray {
  std::vector<size_t> dims;
  std::vector<uint8_t> data;  // row-major, product(dims) bytes
};

// Reads `path` (.gz or raw: detected from the content, not the name). Validates the magic
// number, the element type, the dimensions and the length; throws resync::DataError naming the
// file and what is wrong.
IdxArray read_idx(const std::string& path);

}  // namespace resync::runtime
