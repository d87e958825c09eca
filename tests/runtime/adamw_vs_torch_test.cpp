// adamw_vs_torch: N steps of resync's AdamW (runtime::Optimizer: warm-up, cosine schedule,
// clipping of the averaged gradient) against torch.optim.AdamW on the same tensors, run by
// tests/runtime/adamw_torch.py. Skips visibly where python3-torch is not installed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/train/optimizer.h"
#include "tests/kernels/test_util.h"

namespace resync::runtime {
namespace {

namespace fs = std::filesystem;
using kernels::testing::random_floats;

template <typename T>
void put(std::ofstream& out, T value) {
  out.write(reinterpret_cast<const char*>(&value), sizeof(T));
}
void put(std::ofstream& out, const std::vector<float>& v) {
  out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
}

bool torch_available() {
  const std::string cmd = std::string(RESYNC_PYTHON) + " -c 'import torch' > /dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

struct Case {
  const char* name;
  float grad_clip;
  LrScheduleKind schedule;
  uint64_t warmup;
  float weight_decay;
};

class AdamWVsTorch : public ::testing::TestWithParam<Case> {};

TEST_P(AdamWVsTorch, SameParametersAndMomentsAfterNSteps) {
  if (!torch_available()) {
    GTEST_SKIP() << "python3-torch is not installed (apt-get install python3-torch, or "
                    "scripts/setup.sh)";
  }
  const Case& c = GetParam();
  const size_t n = 2000;
  const uint32_t steps = 12;
  OptimizerConfig cfg;
  cfg.kind = OptimizerKind::kAdamW;
  cfg.lr = 3e-3f;
  cfg.beta1 = 0.9f;
  cfg.beta2 = 0.95f;
  cfg.eps = 1e-8f;
  cfg.weight_decay = c.weight_decay;
  cfg.grad_clip = c.grad_clip;
  cfg.schedule = {.kind = c.schedule, .warmup_steps = c.warmup, .min_lr = 3e-4f,
                  .total_steps = steps};
  const float grad_scale = 0.5f;  // a sum over two ranks

  std::vector<float> params = random_floats(n, 1);
  std::vector<std::vector<float>> grads;
  for (uint32_t s = 0; s < steps; ++s) {
    // Large gradients every third step (clipped), small ones otherwise (within the bound).
    const float amplitude = s % 3 == 0 ? 5.0f : 0.01f;
    grads.push_back(random_floats(n, 100 + s, -amplitude, amplitude));
  }

  const fs::path dir = fs::temp_directory_path() /
                       ("resync_adamw_torch_" + std::string(c.name) + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path in = dir / "in.bin";
  const fs::path out = dir / "out.bin";
  {
    std::ofstream f(in, std::ios::binary);
    put<uint32_t>(f, uint32_t(n));
    put<uint32_t>(f, steps);
    for (float x : {cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip,
                    cfg.schedule.min_lr}) {
      put<float>(f, x);
    }
    put<uint32_t>(f, uint32_t(c.warmup));
    put<uint32_t>(f, c.schedule == LrScheduleKind::kCosine ? steps : 0);
    put<float>(f, grad_scale);
    put(f, params);
    for (const auto& g : grads) put(f, g);
  }
  const std::string cmd = std::string(RESYNC_PYTHON) + " " + RESYNC_ADAMW_TORCH_SCRIPT + " " +
                          in.string() + " " + out.string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  Optimizer opt(n, cfg);
  for (uint32_t s = 0; s < steps; ++s) opt.step(params, grads[s], grad_scale, s);

  std::vector<float> torch_out(3 * n);
  {
    std::ifstream f(out, std::ios::binary);
    f.read(reinterpret_cast<char*>(torch_out.data()), std::streamsize(torch_out.size() * 4));
    ASSERT_EQ(size_t(f.gcount()), torch_out.size() * 4) << "short output from " << cmd;
  }
  fs::remove_all(dir);
  // Float roundings in another order (torch's norm is a float sum; ours a double one): a few
  // ulps per step of the values, far below an AdamW step (about lr = 3e-3).
  const char* names[] = {"parameter", "first moment", "second moment"};
  const double abs_tol[] = {2e-6, 1e-7, 1e-9};
  for (size_t part = 0; part < 3; ++part) {
    const std::span<const float> ours =
        part == 0 ? std::span<const float>(params) : opt.buffer(part - 1);
    for (size_t i = 0; i < n; ++i) {
      const double theirs = torch_out[part * n + i];
      ASSERT_LE(std::fabs(ours[i] - theirs), abs_tol[part] + 1e-5 * std::fabs(theirs))
          << names[part] << " " << i << ": resync " << ours[i] << ", torch " << theirs;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, AdamWVsTorch,
    ::testing::Values(Case{"plain", 0.0f, LrScheduleKind::kConstant, 0, 0.01f},
                      Case{"clipped", 1.0f, LrScheduleKind::kConstant, 0, 0.1f},
                      Case{"warmup_cosine_clipped", 1.0f, LrScheduleKind::kCosine, 4, 0.1f}),
    [](const ::testing::TestParamInfo<Case>& p) { return std::string(p.param.name); });

}  // namespace
}  // namespace resync::runtime
