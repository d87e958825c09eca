// Micro-benchmark of the cnn's conv layers at batch 64 on one BLAS thread: forward+backward
// GFLOP/s of each GEMM lowering next to the GFLOP/s of the same GEMM calls alone (how close
// im2col + GEMM gets to the BLAS it relies on), and the whole cnn's step time.
// Usage: OPENBLAS_CORETYPE=SkylakeX bench_conv [batch] [repetitions]. Exit 1 on a wrong result.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "kernels/conv2d.h"
#include "kernels/gemm.h"
#include "models/cnn.h"
#include "models/conv_layers.h"
#include "models/model.h"
#include "tests/kernels/test_util.h"

namespace {

using resync::kernels::Conv2dShape;
using resync::kernels::ConvLowering;
using resync::kernels::gemm;
using resync::kernels::Transpose;
using resync::kernels::testing::random_floats;

const char* lowering_name(ConvLowering l) {
  return l == ConvLowering::kPerSample ? "per-sample" : "batched";
}

// Wall times of repeated runs; the median is reported. Measurements that are compared are
// interleaved rep by rep, so that load from other processes on a shared machine hits all of them.
class Samples {
 public:
  template <typename Fn>
  void time(Fn&& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    ms_.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  double median_ms() {
    std::nth_element(ms_.begin(), ms_.begin() + ms_.size() / 2, ms_.end());
    return ms_[ms_.size() / 2];
  }

 private:
  std::vector<double> ms_;
};

struct ConvResult {
  double fwd_ms, bwd_ms, gemm_ms;
  std::vector<float> y, dw, db, dx;  // for the cross-check of the two lowerings
};

// The layer's kernels, then exactly the GEMM calls they make on the same shapes (operands
// prepared once, so nothing but BLAS is timed).
ConvResult run(const Conv2dShape& s, ConvLowering l, bool input_grad, size_t batch, int reps) {
  const size_t k = s.col_rows(), p = s.col_cols(), m = s.out_c;
  const auto x = random_floats(batch * s.in_size(), 1);
  const auto w = random_floats(s.n_weights(), 2, -0.1f, 0.1f);
  const auto bias = random_floats(m, 3);
  const auto dy = random_floats(batch * s.out_size(), 4);
  std::vector<float> ws(resync::kernels::conv2d_workspace_elems(s, l, batch));
  ConvResult r;
  r.y.resize(batch * s.out_size());
  r.dw.resize(s.n_weights());
  r.db.resize(m);
  r.dx.resize(input_grad ? batch * s.in_size() : 0);
  float* dx = input_grad ? r.dx.data() : nullptr;
  const auto forward = [&] {
    resync::kernels::conv2d_forward(s, l, x.data(), w.data(), bias.data(), r.y.data(), batch, ws);
  };
  const auto backward = [&] {
    resync::kernels::conv2d_backward(s, l, x.data(), w.data(), dy.data(), r.dw.data(),
                                     r.db.data(), dx, batch, ws);
  };

  // The GEMM calls alone, on operands prepared once.
  std::vector<float> y(batch * s.out_size()), dw(s.n_weights());
  const size_t ld = l == ConvLowering::kPerSample ? p : batch * p;
  auto col = random_floats(k * ld, 5);
  std::vector<float> dcol(k * ld);
  const auto gemms = [&] {
    if (l == ConvLowering::kPerSample) {
      for (size_t n = 0; n < batch; ++n) {
        gemm(Transpose::kNo, Transpose::kNo, m, p, k, 1.0f, w.data(), k, col.data(), p, 0.0f,
             y.data() + n * m * p, p);
      }
      for (size_t n = 0; n < batch; ++n) {
        const float* dy_n = dy.data() + n * m * p;
        gemm(Transpose::kNo, Transpose::kYes, m, k, p, 1.0f, dy_n, p, col.data(), p,
             n == 0 ? 0.0f : 1.0f, dw.data(), k);
        if (input_grad) {
          gemm(Transpose::kYes, Transpose::kNo, k, p, m, 1.0f, w.data(), k, dy_n, p, 0.0f,
               dcol.data(), p);
        }
      }
    } else {
      gemm(Transpose::kNo, Transpose::kNo, m, ld, k, 1.0f, w.data(), k, col.data(), ld, 0.0f,
           y.data(), ld);
      gemm(Transpose::kNo, Transpose::kYes, m, k, ld, 1.0f, dy.data(), ld, col.data(), ld, 0.0f,
           dw.data(), k);
      if (input_grad) {
        gemm(Transpose::kYes, Transpose::kNo, k, ld, m, 1.0f, w.data(), k, dy.data(), ld, 0.0f,
             dcol.data(), ld);
      }
    }
  };

  for (int i = 0; i < 2; ++i) {  // warm-up: page in buffers, let BLAS allocate its scratch
    forward();
    backward();
    gemms();
  }
  Samples fwd, bwd, gemm_only;
  for (int i = 0; i < reps; ++i) {
    fwd.time(forward);
    bwd.time(backward);
    gemm_only.time(gemms);
  }
  r.fwd_ms = fwd.median_ms();
  r.bwd_ms = bwd.median_ms();
  r.gemm_ms = gemm_only.median_ms();
  return r;
}

// Elements of b farther from a than 1e-4 of a's largest magnitude (summation order differs).
size_t n_wrong(const std::vector<float>& a, const std::vector<float>& b) {
  float scale = 0;
  for (const float v : a) scale = std::max(scale, std::fabs(v));
  size_t wrong = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    wrong += std::fabs(a[i] - b[i]) <= 1e-4f * scale ? 0 : 1;  // NaN counts as wrong
  }
  return wrong;
}

// The cnn with every conv layer switched to `lowering`.
std::unique_ptr<resync::models::Model> make_cnn(ConvLowering lowering, size_t batch) {
  resync::models::ModelSpec spec;
  spec.name = "cnn";
  resync::models::LayerStack stack = resync::models::build_cnn(spec);
  for (auto& layer : stack.layers) {
    if (const auto* conv = dynamic_cast<resync::models::Conv2d*>(layer.get())) {
      layer = std::make_unique<resync::models::Conv2d>(conv->shape(), lowering);
    }
  }
  return std::make_unique<resync::models::Model>(std::move(stack), spec.n_classes, batch, 1);
}

}  // namespace

int main(int argc, char** argv) {
  const size_t batch = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 64;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 20;
  if (batch == 0 || reps <= 0) {
    std::fprintf(stderr, "usage: bench_conv [batch > 0] [repetitions > 0]\n");
    return 2;
  }
  resync::kernels::set_blas_threads(1);
  std::printf("# %s, kernels '%s', 1 thread, batch %zu, median of %d\n",
              resync::kernels::blas_version().c_str(), resync::kernels::blas_core().c_str(), batch,
              reps);
  if (const std::string advice = resync::kernels::blas_core_advice(); !advice.empty()) {
    std::printf("# note: %s\n", advice.c_str());
  }

  resync::models::ModelSpec spec;
  spec.name = "cnn";
  std::vector<Conv2dShape> shapes;
  for (const auto& layer : resync::models::build_cnn(spec).layers) {
    if (const auto* conv = dynamic_cast<const resync::models::Conv2d*>(layer.get())) {
      shapes.push_back(conv->shape());
    }
  }

  std::printf("# GEMM m x n x k of the forward call; backward adds dW (m=out_c, n=K, k=pixels)\n");
  std::printf("# and, except for the first layer, dcol (m=K, n=pixels, k=out_c); x64 = per sample\n");
  std::printf("%-37s %-10s %-16s %7s %7s %8s %8s %8s %8s %6s %6s\n", "layer", "lowering",
              "fwd GEMM", "fwd ms", "bwd ms", "conv ms", "GFLOP/s", "GEMM ms", "GFLOP/s", "ratio",
              "#wrong");
  size_t total_wrong = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const Conv2dShape& s = shapes[i];
    const bool input_grad = i > 0;  // as in the model: the first layer needs no input gradient
    const double flops = 2.0 * double(s.out_c) * double(s.col_cols()) * double(s.col_rows()) *
                         double(batch) * (input_grad ? 3.0 : 2.0);
    const resync::models::Conv2d layer(s);
    ConvResult results[2];
    for (const ConvLowering l : {ConvLowering::kPerSample, ConvLowering::kBatched}) {
      ConvResult& r = results[l == ConvLowering::kPerSample ? 0 : 1];
      r = run(s, l, input_grad, batch, reps);
      size_t wrong = 0;
      if (l == ConvLowering::kBatched) {
        const ConvResult& ref = results[0];
        wrong = n_wrong(ref.y, r.y) + n_wrong(ref.dw, r.dw) + n_wrong(ref.db, r.db) +
                n_wrong(ref.dx, r.dx);
        total_wrong += wrong;
      }
      const std::string gemm_shape =
          l == ConvLowering::kPerSample
              ? std::to_string(s.out_c) + "x" + std::to_string(s.col_cols()) + "x" +
                    std::to_string(s.col_rows()) + " x" + std::to_string(batch)
              : std::to_string(s.out_c) + "x" + std::to_string(s.col_cols() * batch) + "x" +
                    std::to_string(s.col_rows());
      const double conv_ms = r.fwd_ms + r.bwd_ms;
      std::printf("%-37s %-10s %-16s %7.2f %7.2f %8.2f %8.1f %8.2f %8.1f %5.0f%% %6zu\n",
                  layer.name().c_str(), lowering_name(l), gemm_shape.c_str(), r.fwd_ms, r.bwd_ms,
                  conv_ms, flops / conv_ms * 1e-6, r.gemm_ms, flops / r.gemm_ms * 1e-6,
                  100.0 * r.gemm_ms / conv_ms, wrong);
    }
  }
  std::printf("# ratio = GEMM-only time / conv time: the share of the conv layer spent in BLAS\n");
  std::printf("# #wrong: batched-lowering elements (y, dW, db, dx) off the per-sample ones by\n"
              "#         more than 1e-4 of the largest magnitude\n\n");

  // Whole model, both lowerings interleaved step by step.
  const ConvLowering lowerings[] = {ConvLowering::kPerSample, ConvLowering::kBatched};
  std::unique_ptr<resync::models::Model> models[] = {make_cnn(lowerings[0], batch),
                                                     make_cnn(lowerings[1], batch)};
  const auto x = random_floats(batch * models[0]->input_size(), 6, 0.0f, 1.0f);
  std::vector<int32_t> labels(batch);
  for (size_t i = 0; i < batch; ++i) labels[i] = static_cast<int32_t>(i % 10);
  Samples steps[2];
  for (int i = 0; i < reps + 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const auto step = [&] { models[j]->forward_backward(x.data(), labels.data(), batch); };
      if (i < 2) {
        step();  // warm-up
      } else {
        steps[j].time(step);
      }
    }
  }
  for (int j = 0; j < 2; ++j) {
    std::printf("%s forward+backward, batch %zu, %-10s conv: %7.2f ms\n",
                models[j]->describe().c_str(), batch, lowering_name(lowerings[j]),
                steps[j].median_ms());
  }
  if (total_wrong > 0) {
    std::fprintf(stderr, "bench_conv: %zu wrong elements\n", total_wrong);
    return 1;
  }
  return 0;
}
