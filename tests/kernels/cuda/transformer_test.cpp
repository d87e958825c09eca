// The CUDA transformer kernels (kernels/cuda/transformer.h) against their CPU twins on seeded
// inputs. The elementwise math is shared, but device tanh/exp/sqrt and fused multiply-adds may
// round differently: results agree within 1e-5 relative (plus 1e-6 absolute); attention's
// GEMMs go through cuBLAS, so 1e-4 there. Every test skips without a device.
#include "kernels/cuda/transformer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/embedding.h"
#include "kernels/gelu.h"
#include "kernels/layernorm.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/kernels/test_util.h"

namespace resync::kernels {
namespace {

using testing::CudaTest;
using testing::random_floats;

void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, double rtol,
                  const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  for (size_t i = 0; i < gpu.size(); ++i) {
    ASSERT_NEAR(gpu[i], cpu[i], rtol * std::fabs(cpu[i]) + 1e-6)
        << what << ": index " << i << " expected (CPU) " << cpu[i] << " actual (CUDA) " << gpu[i];
  }
}

using CudaTransformer = CudaTest;

TEST_F(CudaTransformer, GeluMatchesCpu) {
  const auto x = random_floats(1000, 1, -6.0f, 6.0f), dy = random_floats(1000, 2);
  std::vector<float> y(x.size()), dx(x.size());
  gelu_forward(x.data(), y.data(), x.size());
  gelu_backward(x.data(), dy.data(), dx.data(), x.size());
  auto d_x = to_device(x), d_dy = to_device(dy), d_y = to_device(y), d_dx = to_device(dx);
  cuda::gelu_forward(stream(), d_x.data(), d_y.data(), x.size());
  cuda::gelu_backward(stream(), d_x.data(), d_dy.data(), d_dx.data(), x.size());
  expect_close(to_host(d_y), y, 1e-5, "gelu forward");
  expect_close(to_host(d_dx), dx, 1e-5, "gelu backward");
}

TEST_F(CudaTransformer, LayerNormMatchesCpu) {
  const size_t rows = 37, cols = 64;
  const auto x = random_floats(rows * cols, 3, -2.0f, 3.0f), dy = random_floats(rows * cols, 4);
  const auto w = random_floats(cols, 5), b = random_floats(cols, 6);
  std::vector<float> y(x.size()), mean(rows), rstd(rows), dx(x.size(), 0.5f), dw(cols, 0.25f),
      db(cols, -0.25f);
  auto d_dx = to_device(dx), d_dw = to_device(dw), d_db = to_device(db);
  layernorm_forward(x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), rows, cols);
  layernorm_backward(dy.data(), x.data(), w.data(), mean.data(), rstd.data(), dx.data(), dw.data(),
                     db.data(), rows, cols);
  auto d_x = to_device(x), d_dy = to_device(dy), d_w = to_device(w), d_b = to_device(b);
  auto d_y = to_device(y), d_mean = to_device(mean), d_rstd = to_device(rstd);
  cuda::layernorm_forward(stream(), d_x.data(), d_w.data(), d_b.data(), d_y.data(), d_mean.data(),
                          d_rstd.data(), rows, cols);
  cuda::layernorm_backward(stream(), d_dy.data(), d_x.data(), d_w.data(), d_mean.data(),
                           d_rstd.data(), d_dx.data(), d_dw.data(), d_db.data(), rows, cols);
  expect_close(to_host(d_y), y, 1e-5, "layernorm y");
  expect_close(to_host(d_dx), dx, 1e-5, "layernorm dx");
  expect_close(to_host(d_dw), dw, 1e-5, "layernorm dweight");
  expect_close(to_host(d_db), db, 1e-5, "layernorm dbias");
}

TEST_F(CudaTransformer, EmbeddingMatchesCpu) {
  const EmbeddingShape s{3, 8, 16, 11};
  std::vector<float> tokens = random_floats(s.batch * s.seq_len, 7, 0.0f, 11.0f);
  for (float& t : tokens) t = std::floor(t);
  const auto wte = random_floats(s.vocab * s.dim, 8), wpe = random_floats(s.seq_len * s.dim, 9);
  const auto dout = random_floats(s.batch * s.seq_len * s.dim, 10);
  std::vector<float> out(dout.size()), dwte(wte.size(), 0.125f), dwpe(wpe.size());
  auto d_dwte = to_device(dwte), d_dwpe = to_device(dwpe);
  embedding_forward(tokens.data(), wte.data(), wpe.data(), out.data(), s);
  embedding_backward(dout.data(), tokens.data(), dwte.data(), dwpe.data(), s);
  auto d_tokens = to_device(tokens), d_wte = to_device(wte), d_wpe = to_device(wpe);
  auto d_out = to_device(out), d_dout = to_device(dout);
  cuda::embedding_forward(stream(), d_tokens.data(), d_wte.data(), d_wpe.data(), d_out.data(), s);
  cuda::embedding_backward(stream(), d_dout.data(), d_tokens.data(), d_dwte.data(), d_dwpe.data(),
                           s);
  // Same additions in the same order: bit for bit.
  testing::expect_same_bits(to_host(d_out), out, "embedding out");
  testing::expect_same_bits(to_host(d_dwte), dwte, "embedding dwte");
  testing::expect_same_bits(to_host(d_dwpe), dwpe, "embedding dwpe");
}

TEST_F(CudaTransformer, AttentionMatchesCpu) {
  const AttentionShape s{2, 16, 32, 4};
  const size_t T = s.seq_len, C = s.dim;
  const auto qkv = random_floats(s.batch * T * 3 * C, 11, -2.0f, 2.0f);
  const auto dout = random_floats(s.batch * T * C, 12);
  std::vector<float> out(s.batch * T * C), att(s.batch * s.n_head * T * T), dqkv(qkv.size()),
      scratch(T * T);
  attention_forward(qkv.data(), out.data(), att.data(), s);
  attention_backward(dout.data(), qkv.data(), att.data(), dqkv.data(), scratch.data(), s);
  auto d_qkv = to_device(qkv), d_dout = to_device(dout), d_out = to_device(out);
  auto d_att = to_device(att), d_dqkv = to_device(dqkv), d_scratch = to_device(scratch);
  cuda::attention_forward(cublas(), stream(), d_qkv.data(), d_out.data(), d_att.data(), s);
  cuda::attention_backward(cublas(), stream(), d_dout.data(), d_qkv.data(), d_att.data(),
                           d_dqkv.data(), d_scratch.data(), s);
  expect_close(to_host(d_att), att, 1e-4, "attention probabilities");
  expect_close(to_host(d_out), out, 1e-4, "attention out");
  expect_close(to_host(d_dqkv), dqkv, 1e-4, "attention dqkv");
}

}  // namespace
}  // namespace resync::kernels
