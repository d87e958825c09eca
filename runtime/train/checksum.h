// 64-bit checksum of a float buffer's bits (FNV-1a over 64-bit words), for comparing parameters
// across ranks and runs: equal only if every bit is equal.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>

namespace resync::runtime {

inline uint64_t checksum64(std::span<const float> values) {
  uint64_t h = 0xcbf29ce484222325ull;
  const size_t n_bytes = values.size_bytes();
  const auto* bytes = reinterpret_cast<const unsigned char*>(values.data());
  size_t i = 0;
  for (; i + 8 <= n_bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + i, 8);
    h = (h ^ word) * 0x100000001b3ull;
  }
  for (; i < n_bytes; ++i) h = (h ^ bytes[i]) * 0x100000001b3ull;
  return h ^ n_bytes;
}

}  // namespace resync::runtime
