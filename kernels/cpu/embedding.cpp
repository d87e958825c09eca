#include "kernels/embedding.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>

#include "base/error.h"

namespace resync::kernels {
namespace {

size_t checked_token(const float* tokens, size_t i, size_t vocab) {
  const float t = tokens[i];
  RESYNC_CHECK_ARG(
      t >= 0.0f && t < static_cast<float>(vocab) && std::floor(t) == t,
      fmt::format("embedding: token {} at position {} is not an integer in [0, {})", t, i, vocab));
  return static_cast<size_t>(t);
}

}  // namespace

void embedding_forward(const float* tokens, const float* wte, const float* wpe, float* out,
                       const EmbeddingShape& s) {
  const size_t C = s.dim;
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t t = 0; t < s.seq_len; ++t) {
      const size_t i = b * s.seq_len + t;
      const float* te = wte + checked_token(tokens, i, s.vocab) * C;
      const float* pe = wpe + t * C;
      float* o = out + i * C;
      for (size_t c = 0; c < C; ++c) o[c] = te[c] + pe[c];
    }
  }
}

void embedding_backward(const float* dout, const float* tokens, float* dwte, float* dwpe,
                        const EmbeddingShape& s) {
  const size_t C = s.dim;
  std::memset(dwpe, 0, s.seq_len * C * sizeof(float));
  for (size_t b = 0; b < s.batch; ++b) {
    for (size_t t = 0; t < s.seq_len; ++t) {
      const size_t i = b * s.seq_len + t;
      const float* d = dout + i * C;
      float* dte = dwte + checked_token(tokens, i, s.vocab) * C;
      float* dpe = dwpe + t * C;
      for (size_t c = 0; c < C; ++c) {
        dte[c] += d[c];
        dpe[c] += d[c];
      }
    }
  }
}

}  // namespace resync::kernels
