// Writes what tests/models/gpt_vs_torch.py compares with PyTorch: a seeded gpt's initial
// parameters, a seeded batch of byte tokens and next-token labels, and the model's logits, mean
// loss and gradient on it. Raw little-endian files in OUT_DIR:
//   shape.txt "L H C T V B", params.f32, x.f32 [B x T], y.i32 [B x T], logits.f32 [B x T x V],
//   loss.f32, grads.f32 (parameter order: models/gpt.h, models/transformer_layers.h).
// Usage: gpt_dump OUT_DIR L H C T V B SEED
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "base/random.h"
#include "models/gpt.h"
#include "models/model.h"

namespace {

template <typename T>
bool write(const std::string& path, const T* data, size_t n) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(data, sizeof(T), n, f) == n;
  return std::fclose(f) == 0 && ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: gpt_dump OUT_DIR L H C T V B SEED\n");
    return 2;
  }
  const std::string out = argv[1];
  const auto arg = [&](int i) { return static_cast<size_t>(std::strtoull(argv[i], nullptr, 10)); };
  const size_t L = arg(2), H = arg(3), C = arg(4), T = arg(5), V = arg(6), B = arg(7);
  const uint64_t seed = arg(8);
  const resync::models::ModelSpec spec = resync::models::gpt_spec(L, H, C, T, V);
  auto model = resync::models::make_model(spec, B, seed);
  const std::vector<float> params(model->params().begin(), model->params().end());

  resync::SplitMix64 rng(seed + 1);
  std::vector<float> x(B * T);
  std::vector<int32_t> y(B * T);
  for (float& v : x) v = static_cast<float>(rng.next() % V);
  for (int32_t& v : y) v = static_cast<int32_t>(rng.next() % V);
  const float loss = model->forward_backward(x.data(), y.data(), B);
  const std::vector<float> grads(model->grads().begin(), model->grads().end());
  const auto logits = model->logits(x.data(), B);

  std::FILE* f = std::fopen((out + "/shape.txt").c_str(), "w");
  if (f == nullptr) return 1;
  std::fprintf(f, "%zu %zu %zu %zu %zu %zu\n", L, H, C, T, V, B);
  std::fclose(f);
  const bool ok =
      write(out + "/params.f32", params.data(), params.size()) &&
      write(out + "/x.f32", x.data(), x.size()) && write(out + "/y.i32", y.data(), y.size()) &&
      write(out + "/logits.f32", logits.data(), logits.size()) &&
      write(out + "/loss.f32", &loss, 1) && write(out + "/grads.f32", grads.data(), grads.size());
  return ok ? 0 : 1;
}
