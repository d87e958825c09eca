#include "runtime/io/config.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>

#include "base/error.h"
#include "base/log.h"
#include "models/model.h"
#include "runtime/train/inject_delay.h"

namespace resync::runtime {
namespace {

// CLI11 validator for spdlog level names.
CLI::Validator log_level_validator() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        return log::valid_level(value) ? std::string()
                                       : "must be one of trace, debug, info, warn, error, off";
      },
      "LEVEL");
}

CLI::Validator data_validator() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        if (value == "fashion-mnist" || value == "synthetic" || value == "bible-kjv") return {};
        if (value.rfind("idx:", 0) == 0 && value.size() > 4) return {};
        if (value.rfind("text:", 0) == 0 && value.size() > 5) return {};
        return "must be fashion-mnist, synthetic, idx:DIR, text:FILE or bible-kjv";
      },
      "DATA");
}

CLI::Validator inject_delay_validator() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        try {
          parse_delay_spec(value);
        } catch (const InvalidArgument& e) {
          return e.what();
        }
        return {};
      },
      "SPEC");
}

// CLI11 validator: the value must be a finite number of type T (CLI::Range lets NaN through,
// since every comparison with it is false, and a NaN or infinite learning rate, momentum, decay
// or time would train to a NaN loss or never end). Checked before the range, so the message
// says what is wrong. Every floating-point flag carries it.
template <typename T>
CLI::Validator finite_number() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        T v{};
        if (!CLI::detail::lexical_cast(value, v)) return "'" + value + "' is not a number";
        if (!std::isfinite(v)) return "must be a finite number, got '" + value + "'";
        return {};
      },
      "");
}

}  // namespace

float default_lr(const std::string& mode, const std::string& optimizer) {
  if (optimizer == "adamw") return kDefaultLrAdamW;
  return mode == "async" ? kDefaultLrAsync : kDefaultLrSync;
}

float default_weight_decay(const std::string& optimizer) {
  return optimizer == "adamw" ? kDefaultWeightDecayAdamW : kDefaultWeightDecaySgd;
}

void declare_train_flags(CLI::App& app, TrainConfig& cfg) {
  app.set_config("--config", "", "Read flags from a TOML file (keys are the long flag names)");
  app.allow_config_extras(CLI::config_extras_mode::error);  // a misspelt key is an error

  app.add_option("--model", cfg.model, "Model: mlp, cnn, gpt or a registered one")
      ->capture_default_str()
      ->check(CLI::IsMember(models::model_names()));  // built-ins and registered models
  app.add_option("--hidden", cfg.hidden, "Hidden layer sizes of the mlp, comma separated")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 16));
  CLI::Option* data =
      app.add_option("--data", cfg.data,
                     "Data: fashion-mnist, idx:DIR (MNIST-format files), synthetic, text:FILE "
                     "(bytes of any file) or bible-kjv (default of --model gpt)")
          ->capture_default_str()
          ->check(data_validator());
  app.add_option("--n-layer", cfg.n_layer, "gpt: transformer blocks")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{64}));
  app.add_option("--n-head", cfg.n_head, "gpt: attention heads (dividing --n-embd)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{64}));
  app.add_option("--n-embd", cfg.n_embd, "gpt: width of the residual stream")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{4096}));
  app.add_option("--context", cfg.context, "Text data: tokens per sample (the gpt's sequence length)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{4096}));
  app.add_option("--synthetic-train", cfg.synthetic_train, "Training samples of --data synthetic")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{10'000'000}));
  app.add_option("--synthetic-test", cfg.synthetic_test, "Test samples of --data synthetic")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{10'000'000}));

  app.add_option("--epochs", cfg.epochs, "Passes over each rank's shard")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{100'000}));
  app.add_option("--steps", cfg.steps, "Total steps (overrides --epochs when > 0)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{0}, size_t{1'000'000'000}));
  app.add_option("--batch-size", cfg.batch_size, "Mini-batch size per rank")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{65536}));
  app.add_option("--optimizer", cfg.optimizer,
                 "sgd (momentum, L2 weight decay) or adamw (PyTorch's AdamW: bias correction, "
                 "decoupled weight decay)")
      ->capture_default_str()
      ->check(CLI::IsMember({"sgd", "adamw"}));
  // The learning rate's default depends on --mode (each async gradient is its own update, see
  // TrainConfig::lr) and --optimizer; it applies only when neither the command line nor
  // --config sets --lr. The weight decay's default depends on --optimizer the same way.
  CLI::Option* lr = app.add_option(
                           "--lr", cfg.lr,
                           fmt::format("Learning rate (sgd: default {} with --mode sync, {} with "
                                       "--mode async; adamw: default {})",
                                       kDefaultLrSync, kDefaultLrAsync, kDefaultLrAdamW))
                        ->check(finite_number<float>())
                        ->check(CLI::Range(0.0f, 100.0f));
  app.add_option("--momentum", cfg.momentum, "SGD momentum in [0, 1)")
      ->capture_default_str()
      ->check(finite_number<float>())
      ->check(CLI::Range(0.0f, 0.999999f));
  app.add_option("--beta1", cfg.beta1, "AdamW: decay of the first moment, in [0, 1)")
      ->capture_default_str()
      ->check(finite_number<float>())
      ->check(CLI::Range(0.0f, 0.999999f));
  app.add_option("--beta2", cfg.beta2, "AdamW: decay of the second moment, in [0, 1)")
      ->capture_default_str()
      ->check(finite_number<float>())
      ->check(CLI::Range(0.0f, 0.999999f));
  app.add_option("--eps", cfg.eps, "AdamW: added to the root of the second moment, > 0")
      ->capture_default_str()
      ->check(finite_number<float>())
      ->check(CLI::Range(1e-30f, 1.0f));
  CLI::Option* weight_decay =
      app.add_option("--weight-decay", cfg.weight_decay,
                     fmt::format("Weight decay: sgd adds wd * p to the gradient (default {}), "
                                 "adamw decays p by lr * wd (default {})",
                                 kDefaultWeightDecaySgd, kDefaultWeightDecayAdamW))
          ->check(finite_number<float>())
          ->check(CLI::Range(0.0f, 1.0f));
  // One final callback (a second would replace the first): the defaults that depend on others.
  app.final_callback([lr, weight_decay, data, &cfg] {
    if (lr->count() == 0) cfg.lr = default_lr(cfg.mode, cfg.optimizer);
    if (weight_decay->count() == 0) cfg.weight_decay = default_weight_decay(cfg.optimizer);
    if (data->count() == 0 && cfg.model == "gpt") cfg.data = "bible-kjv";
  });
  app.add_option("--grad-clip", cfg.grad_clip,
                 "Clip the averaged gradient to this L2 norm (0 = off; async mode: each worker "
                 "clips its own gradient)")
      ->capture_default_str()
      ->check(finite_number<float>())
      ->check(CLI::Range(0.0f, 1e30f));
  app.add_option("--lr-schedule", cfg.lr_schedule,
                 "After the warm-up: constant, or cosine (from --lr down to --min-lr at the last "
                 "step)")
      ->capture_default_str()
      ->check(CLI::IsMember({"constant", "cosine"}));
  app.add_option("--warmup-steps", cfg.warmup_steps,
                 "Raise the learning rate linearly over the first N steps (0 = none)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{0}, size_t{1'000'000'000}));
  app.add_option("--min-lr", cfg.min_lr, "Learning rate at the end of --lr-schedule cosine")
      ->capture_default_str()
      ->check(finite_number<float>())
      ->check(CLI::Range(0.0f, 100.0f));
  app.add_option("--seed", cfg.seed, "Seed of initialisation, shuffling and injected delays")
      ->capture_default_str();
  app.add_option("--threads", cfg.threads, "BLAS threads per rank")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));

  app.add_option("--backup-workers", cfg.backup_workers,
                 "Backup workers b: a step closes when the first W-b gradients are ready")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--straggler-timeout-ms", cfg.straggler_timeout_ms,
                 "Close a step this long after its first READY (0 = no timeout)")
      ->capture_default_str()
      ->check(finite_number<double>())
      ->check(CLI::Range(0.0, 3.6e6));
  app.add_option("--min-quorum", cfg.min_quorum,
                 "Fewest ranks a timed-out step may close with")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--stall-warning-s", cfg.stall_warning_s,
                 "Log the missing ranks when no step closes for this long")
      ->capture_default_str()
      ->check(finite_number<double>())
      ->check(CLI::Range(0.001, 1e6));
  app.add_option("--stall-abort-s", cfg.stall_abort_s,
                 "Abort the job when no step closes for this long (0 = never)")
      ->capture_default_str()
      ->check(finite_number<double>())
      ->check(CLI::Range(0.0, 1e6));
  app.add_option("--coordinator-timeout-s", cfg.coordinator_timeout_s,
                 "With --checkpoint-dir: no heartbeat from rank 0's coordinator for this long "
                 "counts as rank 0 frozen (save, exit 75 to be restarted)")
      ->capture_default_str()
      ->check(finite_number<double>())
      ->check(CLI::Range(0.1, 1e6));
  app.add_option("--inject-delay", cfg.inject_delay,
                 "Straggler injection before READY: none | fixed:RANK:MS | "
                 "random:P:lognormal:MEDIAN_MS:SIGMA | random:P:pareto:SCALE_MS:ALPHA | "
                 "one:lognormal:MEDIAN_MS:SIGMA | one:pareto:SCALE_MS:ALPHA")
      ->capture_default_str()
      ->check(inject_delay_validator());

  app.add_option("--early-catch-up", cfg.early_catch_up,
                 "Late ranks get the state from a rank waiting for the open step at once, "
                 "instead of at that step's close (true/false; false is for comparisons)")
      ->capture_default_str();
  app.add_option("--mode", cfg.mode,
                 "sync: ring all-reduce; async: parameter servers (ranks 0..ps-1)")
      ->capture_default_str()
      ->check(CLI::IsMember({"sync", "async"}));
  app.add_option("--ps", cfg.ps, "Async mode: number of parameter-server ranks")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--max-staleness", cfg.max_staleness,
                 "Async mode: drop gradients computed more than K versions ago (-1 = no bound)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 1 << 30));
  app.add_option("--device", cfg.device, "Where each rank computes: cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--collective", cfg.collective,
                 "Gradient all-reduce: ring (resync, straggler-tolerant) or nccl "
                 "(--device cuda, plain sync only)")
      ->capture_default_str()
      ->check(CLI::IsMember({"ring", "nccl"}));

  app.add_option("--segment-kib", cfg.segment_kib, "Ring all-reduce segment size in KiB")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 20));
  app.add_option("--overlap", cfg.overlap,
                 "Plain sync on the CPU: all-reduce gradients in buckets during the backward "
                 "pass: on, off, or auto (on when the ranks span several nodes)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "on", "off"}));
  app.add_option("--bucket-kib", cfg.bucket_kib, "Smallest overlap bucket in KiB (whole layers)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{4}, size_t{1} << 22));

  app.add_option("--ring-timeout-ms", cfg.ring_timeout_ms,
                 "With backup workers or a timeout: an all-reduce or catch-up that stalls this "
                 "long is repaired without the unresponsive rank")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{10}, int64_t{3'600'000}));

  app.add_option("--checkpoint-dir", cfg.checkpoint_dir,
                 "Directory for checkpoints (written by rank 0; also on SIGTERM/SIGUSR1)");
  app.add_option("--checkpoint-every", cfg.checkpoint_every,
                 "Write a checkpoint every N steps (0 = only on preemption and at the end)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{0}, size_t{1'000'000'000}));
  app.add_option("--checkpoint-keep", cfg.checkpoint_keep, "Keep the newest K checkpoints")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1'000'000}));
  app.add_flag("--resume", cfg.resume,
               "Continue from the newest valid checkpoint in --checkpoint-dir (if any)");

  app.add_option("--metrics", cfg.metrics, "Write JSON Lines metrics to this file (rank 0)");
  app.add_option("--metrics-every", cfg.metrics_every, "Write every k-th step record")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1'000'000}));
  app.add_option("--log-level", cfg.log_level, "trace, debug, info, warn, error, off")
      ->capture_default_str()
      ->check(log_level_validator());
  app.add_option("--timeline", cfg.timeline,
                 "Write a Chrome-trace timeline per rank to FILE.rank<N>.json");
  app.add_option("--progress", cfg.progress,
                 "Rank 0's progress: auto (live line on a terminal, else plain lines), live "
                 "(always the live line; under mpirun, whose output is never a terminal), line, "
                 "off")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "live", "line", "off"}));
  app.add_option("--progress-every-s", cfg.progress_every_s,
                 "Seconds between plain progress lines (batch logs)")
      ->capture_default_str()
      ->check(finite_number<double>())
      ->check(CLI::Range(0.1, 1e6));
}

void validate_for_world(const TrainConfig& cfg, int world_size) {
  // The flags' validators reject NaN and inf already; a config built in code gets here too.
  const std::pair<const char*, double> reals[] = {
      {"--lr", cfg.lr},
      {"--momentum", cfg.momentum},
      {"--weight-decay", cfg.weight_decay},
      {"--beta1", cfg.beta1},
      {"--beta2", cfg.beta2},
      {"--eps", cfg.eps},
      {"--grad-clip", cfg.grad_clip},
      {"--min-lr", cfg.min_lr},
      {"--straggler-timeout-ms", cfg.straggler_timeout_ms},
      {"--stall-warning-s", cfg.stall_warning_s},
      {"--stall-abort-s", cfg.stall_abort_s},
      {"--coordinator-timeout-s", cfg.coordinator_timeout_s},
      {"--progress-every-s", cfg.progress_every_s}};
  for (const auto& [flag, value] : reals) {
    if (!std::isfinite(value)) {
      throw InvalidArgument(fmt::format("{}: must be a finite number, got {}", flag, value));
    }
  }
  if (cfg.optimizer != "sgd" && cfg.optimizer != "adamw") {
    throw InvalidArgument(fmt::format("--optimizer: unknown optimizer '{}' (sgd, adamw)",
                                      cfg.optimizer));
  }
  if (cfg.lr_schedule != "constant" && cfg.lr_schedule != "cosine") {
    throw InvalidArgument(fmt::format("--lr-schedule: unknown schedule '{}' (constant, cosine)",
                                      cfg.lr_schedule));
  }
  for (const auto& [flag, beta] : {std::pair{"--beta1", cfg.beta1}, {"--beta2", cfg.beta2}}) {
    if (beta < 0 || beta >= 1) {
      throw InvalidArgument(fmt::format("{}: must be in [0, 1), got {}", flag, beta));
    }
  }
  if (!(cfg.eps > 0)) throw InvalidArgument(fmt::format("--eps: must be > 0, got {}", cfg.eps));
  if (cfg.grad_clip < 0 || cfg.min_lr < 0) {
    throw InvalidArgument("--grad-clip and --min-lr must not be negative");
  }
  if (cfg.backup_workers >= world_size) {
    throw InvalidArgument(fmt::format(
        "--backup-workers {} must be smaller than the number of ranks ({})", cfg.backup_workers,
        world_size));
  }
  if (cfg.min_quorum > world_size) {
    throw InvalidArgument(fmt::format("--min-quorum {} exceeds the number of ranks ({})",
                                      cfg.min_quorum, world_size));
  }
  if (cfg.mode == "async") {
    if (cfg.ps >= world_size) {
      throw InvalidArgument(fmt::format(
          "--ps {} leaves no worker: async mode needs more ranks than servers ({} ranks)",
          cfg.ps, world_size));
    }
    if (cfg.backup_workers > 0 || cfg.straggler_timeout_ms > 0) {
      throw InvalidArgument(
          "--backup-workers and --straggler-timeout-ms apply to --mode sync only");
    }
    if (cfg.device != "cpu") throw InvalidArgument("--mode async runs on --device cpu only");
  }
  if (cfg.collective == "nccl" && cfg.device != "cuda") {
    throw InvalidArgument("--collective nccl needs --device cuda");
  }
  if (cfg.collective == "nccl" && (cfg.backup_workers > 0 || cfg.straggler_timeout_ms > 0)) {
    throw InvalidArgument(
        "--collective nccl waits for every rank; use --collective ring with --backup-workers "
        "or --straggler-timeout-ms");
  }
  if ((cfg.checkpoint_every > 0 || cfg.resume) && cfg.checkpoint_dir.empty()) {
    throw InvalidArgument("--checkpoint-every and --resume need --checkpoint-dir");
  }
  if (cfg.model == "gpt" && cfg.n_embd % cfg.n_head != 0) {
    throw InvalidArgument(
        fmt::format("--n-head {} must divide --n-embd {}", cfg.n_head, cfg.n_embd));
  }
  const DelaySpec spec = parse_delay_spec(cfg.inject_delay);
  if (spec.kind == DelayKind::kFixedRank && spec.rank >= world_size) {
    throw InvalidArgument(fmt::format("--inject-delay names rank {} but there are only {} ranks",
                                      spec.rank, world_size));
  }
}

std::string describe(const TrainConfig& c) {
  return fmt::format(
      "model={} hidden={} n-layer={} n-head={} n-embd={} context={} data={} epochs={} steps={} "
      "batch-size={} optimizer={} lr={} "
      "momentum={} beta1={} beta2={} eps={} weight-decay={} grad-clip={} lr-schedule={} "
      "warmup-steps={} min-lr={} seed={} threads={} backup-workers={} straggler-timeout-ms={} "
      "min-quorum={} stall-warning-s={} stall-abort-s={} coordinator-timeout-s={} "
      "inject-delay={} early-catch-up={} "
      "segment-kib={} overlap={} bucket-kib={} "
      "ring-timeout-ms={} mode={} ps={} max-staleness={} device={} collective={} "
      "checkpoint-dir={} checkpoint-every={} checkpoint-keep={} resume={} metrics={} "
      "metrics-every={} log-level={} timeline={} progress={} progress-every-s={}",
      c.model, fmt::join(c.hidden, ","), c.n_layer, c.n_head, c.n_embd, c.context, c.data,
      c.epochs, c.steps, c.batch_size, c.optimizer,
      c.lr, c.momentum, c.beta1, c.beta2, c.eps, c.weight_decay, c.grad_clip, c.lr_schedule,
      c.warmup_steps, c.min_lr, c.seed, c.threads, c.backup_workers, c.straggler_timeout_ms,
      c.min_quorum, c.stall_warning_s, c.stall_abort_s, c.coordinator_timeout_s, c.inject_delay,
      c.early_catch_up,
      c.segment_kib, c.overlap, c.bucket_kib,
      c.ring_timeout_ms, c.mode, c.ps, c.max_staleness, c.device, c.collective,
      c.checkpoint_dir.empty() ? "-" : c.checkpoint_dir, c.checkpoint_every, c.checkpoint_keep,
      c.resume, c.metrics.empty() ? "-" : c.metrics, c.metrics_every, c.log_level,
      c.timeline.empty() ? "-" : c.timeline, c.progress, c.progress_every_s);
}

}  // namespace resync::runtime
