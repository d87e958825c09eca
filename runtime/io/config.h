// runtime/io: what goes in and out of a run: the configuration (this header, cli.h), the data
// sets (dataset.h, idx.h) and checkpoints (checkpoint.h).
//
// TrainConfig: every knob of `resync train`, declared once (flag, default, validation, help)
// in config.cpp, settable from the command line or a TOML file given with --config.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace resync::runtime {

// Default learning rates per --mode, used when --lr is given neither on the command line nor in
// the --config file. In async mode every gradient is its own update (3 workers make 3 updates
// where sync mode makes one averaged update) and staleness adds momentum, so sync mode's rate
// is too large there (README, "Asynchronous mode").
inline constexpr float kDefaultLrSync = 0.05f;
inline constexpr float kDefaultLrAsync = 0.02f;
// AdamW's step is about lr per parameter whatever the gradient's scale: one default for both
// modes (PyTorch's). Its decoupled weight decay defaults to PyTorch's too; SGD's to none.
inline constexpr float kDefaultLrAdamW = 1e-3f;
inline constexpr float kDefaultWeightDecaySgd = 0.0f;
inline constexpr float kDefaultWeightDecayAdamW = 0.01f;

struct TrainConfig {
  // Model and data.
  std::string model = "mlp";
  std::vector<size_t> hidden = {512, 512};
  // fashion-mnist | idx:DIR | synthetic | text:FILE | bible-kjv; empty: the model's default
  // (bible-kjv for gpt, fashion-mnist otherwise), resolved when the flags are parsed.
  std::string data = "fashion-mnist";
  // gpt (models/gpt.h): blocks, heads, width, and the sequence length of the text windows.
  size_t n_layer = 4;
  size_t n_head = 4;
  size_t n_embd = 128;
  size_t context = 128;
  size_t synthetic_train = 12000;      // samples in the synthetic training set
  size_t synthetic_test = 2000;
  // Schedule and optimizer.
  size_t epochs = 1;
  size_t steps = 0;  // if > 0, overrides --epochs
  size_t batch_size = 64;  // per rank
  std::string optimizer = "sgd";  // sgd | adamw
  float lr = kDefaultLrSync;  // the command line: default_lr(mode, optimizer) unless --lr is given
  float momentum = 0.9f;      // SGD
  float beta1 = 0.9f;         // AdamW
  float beta2 = 0.95f;
  float eps = 1e-8f;
  // The command line: default_weight_decay(optimizer) unless --weight-decay is given.
  float weight_decay = kDefaultWeightDecaySgd;
  float grad_clip = 0.0f;  // largest L2 norm of the averaged gradient; 0 = no clipping
  std::string lr_schedule = "constant";  // constant | cosine (after the warm-up)
  size_t warmup_steps = 0;
  float min_lr = 0.0f;  // where the cosine schedule ends
  uint64_t seed = 1;
  int threads = 1;  // BLAS threads per rank
  // Straggler tolerance (see docs/DESIGN.md, "The life of a step").
  int backup_workers = 0;
  double straggler_timeout_ms = 0;  // 0 = no timeout
  int min_quorum = 1;  // fewest ranks a timed-out step may close with
  double stall_warning_s = 60;
  double stall_abort_s = 0;  // 0 = never abort
  double coordinator_timeout_s = 10;  // rank 0 silent this long: save and exit to restart
  std::string inject_delay = "none";
  bool early_catch_up = true;  // serve late ranks while the next step is open (docs/DESIGN.md)
  // Mode: synchronous ring, or asynchronous parameter servers (docs/DESIGN.md, "Asynchronous mode").
  std::string mode = "sync";  // sync | async
  int ps = 1;                 // async: ranks 0..ps-1 are parameter servers
  int max_staleness = -1;     // async: drop gradients staler than this (-1 = no bound)
  // Device and collectives.
  std::string device = "cpu";        // cpu | cuda
  std::string collective = "ring";   // ring | nccl (plain sync on cuda only)
  size_t segment_kib = 512;
  // Plain sync: all-reduce in buckets during the backward pass (OverlapExchange).
  std::string overlap = "auto";  // auto | on | off
  size_t bucket_kib = 1024;
  int64_t ring_timeout_ms = 2000;  // with backup workers/timeout: give up on a frozen peer
  // Checkpoints and preemption.
  std::string checkpoint_dir;  // empty = no checkpoints
  size_t checkpoint_every = 0;  // steps; 0 = only on preemption and at the end
  size_t checkpoint_keep = 3;   // newest checkpoints kept
  bool resume = false;          // continue from the newest valid checkpoint in checkpoint_dir
  // Outputs.
  std::string metrics;  // JSON Lines file written by rank 0; empty = none
  size_t metrics_every = 1;
  std::string log_level = "info";
  bool eval_every_epoch = true;
  std::string timeline;     // Chrome-trace JSON per rank (FILE.rank<N>.json); empty = none
  std::string progress = "auto";  // auto (a live line on a terminal) | live | line | off
  double progress_every_s = 30;   // interval of the plain progress line (not a terminal)
};

// The learning rate of `mode` ("sync" or "async") and `optimizer` ("sgd" or "adamw") when --lr
// is not given, and the weight decay of `optimizer` when --weight-decay is not given.
float default_lr(const std::string& mode, const std::string& optimizer = "sgd");
float default_weight_decay(const std::string& optimizer);

// Declares the `train` flags on `app` (a CLI11 subcommand), bound to `cfg`, with --config.
void declare_train_flags(CLI::App& app, TrainConfig& cfg);

// Checks what needs the world size, and that every floating-point setting is finite (also for a
// TrainConfig built in code); throws resync::InvalidArgument naming the flag.
void validate_for_world(const TrainConfig& cfg, int world_size);

// One line per setting, for rank 0's start-up log.
std::string describe(const TrainConfig& cfg);

}  // namespace resync::runtime
