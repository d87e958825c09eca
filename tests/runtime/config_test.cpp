// `resync train` flags: NaN and inf are rejected on every floating-point flag (command line and
// --config TOML file, exit code 2), and the learning rate's default depends on --mode.
#include <gtest/gtest.h>

#include <unistd.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "base/error.h"
#include "runtime/io/cli.h"
#include "runtime/io/config.h"

using namespace resync::runtime;

namespace {

// Every floating-point flag of `resync train`, with a valid value of it.
const std::vector<std::pair<std::string, std::string>> kFloatFlags = {
    {"--lr", "0.01"},
    {"--momentum", "0.5"},
    {"--weight-decay", "0.0001"},
    {"--straggler-timeout-ms", "10"},
    {"--stall-warning-s", "30"},
    {"--stall-abort-s", "60"},
    {"--progress-every-s", "5"},
};

const std::vector<std::string> kNonFinite = {"nan", "NaN", "-nan", "inf", "-inf", "Infinity",
                                             "1e999"};

// Parses `args` (without the program name) like `resync train` does; returns the config.
TrainConfig parse(std::vector<std::string> args) {
  TrainConfig cfg;
  CLI::App app;
  declare_train_flags(app, cfg);
  std::reverse(args.begin(), args.end());  // CLI11 takes a reversed vector
  app.parse(args);
  return cfg;
}

class TempToml {
 public:
  explicit TempToml(const std::string& body)
      : path_(std::filesystem::temp_directory_path() /
              ("resync_config_test_" + std::to_string(::getpid()) + "_" +
               std::to_string(counter_++) + ".toml")) {
    std::ofstream(path_) << body;
  }
  ~TempToml() { std::filesystem::remove(path_); }
  std::string path() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  std::filesystem::path path_;
};

// run_cli as the `resync` program: `resync train ARGS...`; returns its exit code. Bad flags are
// rejected before MPI starts, so this runs without mpirun.
int run_train(const std::vector<std::string>& args) {
  ::setenv("OPENBLAS_CORETYPE", "Haswell", 0);  // no re-exec of this test program
  std::vector<std::string> storage = {"resync", "train"};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  return run_cli(static_cast<int>(storage.size()), argv.data());
}

}  // namespace

TEST(ConfigFlags, ValidFloatValuesParse) {
  for (const auto& [flag, value] : kFloatFlags) {
    EXPECT_NO_THROW(parse({flag, value})) << flag;
  }
}

TEST(ConfigFlags, NonFiniteValuesAreRejectedOnEveryFloatFlag) {
  for (const auto& [flag, valid] : kFloatFlags) {
    for (const std::string& bad : kNonFinite) {
      try {
        parse({flag, bad});
        ADD_FAILURE() << flag << " " << bad << " was accepted";
      } catch (const CLI::ValidationError& e) {
        EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
        if (bad != "1e999") {
          EXPECT_NE(std::string(e.what()).find("finite"), std::string::npos) << e.what();
        }
      }
      // The same with '=' and as the only value of a TOML file (bare and quoted).
      EXPECT_THROW(parse({flag + "=" + bad}), CLI::ValidationError) << flag << "=" << bad;
      const std::string key = flag.substr(2);
      for (const std::string& toml : {key + " = " + bad + "\n", key + " = \"" + bad + "\"\n"}) {
        TempToml file(toml);
        EXPECT_THROW(parse({"--config", file.path()}), CLI::ValidationError) << toml;
      }
    }
  }
}

TEST(ConfigFlags, FloatOverflowOfAFloatFlagIsRejected) {
  // 1e39 is a finite double but overflows the float that holds --momentum.
  EXPECT_THROW(parse({"--momentum", "1e39"}), CLI::ValidationError);
  EXPECT_THROW(parse({"--weight-decay", "-1e39"}), CLI::ValidationError);
}

TEST(ConfigFlags, RunCliExitsTwoForNonFiniteFlags) {
  // Exit 2 (bad input) with one line on stderr, before MPI starts.
  for (const auto& [flag, valid] : kFloatFlags) {
    for (const std::string bad : {"nan", "inf"}) {
      EXPECT_EQ(run_train({flag, bad}), 2) << flag << " " << bad;
      TempToml file(flag.substr(2) + " = " + bad + "\n");
      EXPECT_EQ(run_train({"--config", file.path()}), 2) << "TOML " << flag << " " << bad;
    }
  }
}

TEST(ConfigFlags, ValidateForWorldRejectsNonFiniteConfigBuiltInCode) {
  TrainConfig cfg;
  EXPECT_NO_THROW(validate_for_world(cfg, 2));
  cfg.weight_decay = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(validate_for_world(cfg, 2), resync::InvalidArgument);
  cfg = TrainConfig{};
  cfg.stall_warning_s = std::numeric_limits<double>::infinity();
  EXPECT_THROW(validate_for_world(cfg, 2), resync::InvalidArgument);
}

TEST(ConfigDefaults, LearningRateDependsOnModeUnlessGiven) {
  EXPECT_EQ(default_lr("sync"), 0.05f);  // sync mode's default never changes
  EXPECT_EQ(parse({}).lr, kDefaultLrSync);
  EXPECT_EQ(parse({"--mode", "sync"}).lr, kDefaultLrSync);
  EXPECT_EQ(parse({"--mode", "async"}).lr, kDefaultLrAsync);
  EXPECT_EQ(parse({"--mode", "async", "--lr", "0.05"}).lr, 0.05f);  // given: kept
  EXPECT_EQ(parse({"--lr", "0.02"}).lr, 0.02f);
  EXPECT_EQ(parse({"--mode", "async", "--lr", "0.07"}).lr, 0.07f);
  // The other defaults are the same in both modes.
  const TrainConfig sync = parse({});
  const TrainConfig async = parse({"--mode", "async"});
  EXPECT_EQ(sync.momentum, async.momentum);
  EXPECT_EQ(sync.weight_decay, async.weight_decay);
}

TEST(ConfigDefaults, ConfigFileLearningRateAndModeCount) {
  {
    TempToml file("mode = \"async\"\n");
    EXPECT_EQ(parse({"--config", file.path()}).lr, kDefaultLrAsync);
  }
  {
    TempToml file("mode = \"async\"\nlr = 0.03\n");
    EXPECT_EQ(parse({"--config", file.path()}).lr, 0.03f);  // set in the file: kept
  }
  {
    TempToml file("lr = 0.03\n");
    EXPECT_EQ(parse({"--config", file.path(), "--mode", "async"}).lr, 0.03f);
  }
  {
    TempToml file("lr = 0.03\n");
    EXPECT_EQ(parse({"--config", file.path(), "--lr", "0.04"}).lr, 0.04f);  // flags win
  }
}

TEST(ConfigDefaults, HelpNamesBothDefaults) {
  TrainConfig cfg;
  CLI::App app;
  declare_train_flags(app, cfg);
  const std::string help = app.help();
  EXPECT_NE(help.find("default 0.05 with --mode sync, 0.02 with --mode async"), std::string::npos)
      << help;
}

namespace resync::runtime {
namespace {

// --optimizer adamw: its own learning rate and weight decay unless given; SGD's unchanged.
TEST(ConfigDefaults, OptimizerDefaultsDependOnTheOptimizerUnlessGiven) {
  const TrainConfig sgd = parse({});
  EXPECT_EQ(sgd.optimizer, "sgd");
  EXPECT_EQ(sgd.lr, kDefaultLrSync);
  EXPECT_EQ(sgd.weight_decay, 0.0f);
  const TrainConfig adamw = parse({"--optimizer", "adamw"});
  EXPECT_EQ(adamw.lr, kDefaultLrAdamW);
  EXPECT_EQ(adamw.weight_decay, kDefaultWeightDecayAdamW);
  EXPECT_EQ(adamw.beta1, 0.9f);
  EXPECT_EQ(adamw.beta2, 0.95f);
  EXPECT_EQ(adamw.eps, 1e-8f);
  EXPECT_EQ(parse({"--optimizer", "adamw", "--mode", "async"}).lr, kDefaultLrAdamW);
  EXPECT_EQ(parse({"--optimizer", "adamw", "--weight-decay", "0"}).weight_decay, 0.0f);
  EXPECT_EQ(parse({"--optimizer", "adamw", "--lr", "0.01"}).lr, 0.01f);
  TempToml file("optimizer = \"adamw\"\nbeta2 = 0.999\ngrad-clip = 1.5\nlr-schedule = \"cosine\"\n"
                "warmup-steps = 7\nmin-lr = 0.0001\n");
  const TrainConfig from_file = parse({"--config", file.path()});
  EXPECT_EQ(from_file.lr, kDefaultLrAdamW);
  EXPECT_EQ(from_file.beta2, 0.999f);
  EXPECT_EQ(from_file.grad_clip, 1.5f);
  EXPECT_EQ(from_file.lr_schedule, "cosine");
  EXPECT_EQ(from_file.warmup_steps, 7u);
  EXPECT_EQ(from_file.min_lr, 1e-4f);
}

TEST(ConfigFlags, OptimizerFlagsRejectBadValues) {
  for (const std::vector<std::string>& bad :
       {std::vector<std::string>{"--optimizer", "adam"}, {"--beta1", "1"}, {"--beta2", "-0.1"},
        {"--beta1", "nan"}, {"--eps", "0"}, {"--eps", "inf"}, {"--grad-clip", "-1"},
        {"--grad-clip", "nan"}, {"--lr-schedule", "step"}, {"--min-lr", "-1"}}) {
    EXPECT_THROW(parse(bad), CLI::ParseError) << bad[0] << " " << bad[1];
  }
  TrainConfig cfg;
  cfg.optimizer = "adamw";
  cfg.eps = 0;
  EXPECT_THROW(validate_for_world(cfg, 1), InvalidArgument);
  cfg = TrainConfig{};
  cfg.beta2 = 1.0f;
  EXPECT_THROW(validate_for_world(cfg, 1), InvalidArgument);
  cfg = TrainConfig{};
  cfg.optimizer = "lion";
  EXPECT_THROW(validate_for_world(cfg, 1), InvalidArgument);
  cfg = TrainConfig{};
  cfg.grad_clip = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(validate_for_world(cfg, 1), InvalidArgument);
}

}  // namespace
}  // namespace resync::runtime
