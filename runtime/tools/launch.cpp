// `resync launch`: fork/exec the job, wait, classify, relaunch with --resume.
#include "runtime/tools/launch.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "runtime/io/checkpoint.h"
#include "runtime/train/async_checkpoint.h"
#include "runtime/train/rescue.h"

namespace resync::runtime {

namespace {

constexpr int kExitBadInput = 2;

volatile sig_atomic_t g_child = 0;
volatile sig_atomic_t g_signalled = 0;  // SIGINT/SIGTERM reached the launcher: no more restarts

void forward_signal(int sig) {
  // SIGUSR1 asks the job for a checkpoint and a clean stop (Slurm's time limit or preemption,
  // see scripts/slurm/train.sbatch): passed on, and not a reason to stop relaunching.
  if (sig != SIGUSR1) g_signalled = sig;
  if (g_child > 0) ::kill(static_cast<pid_t>(g_child), sig);
}

void say(const std::string& line) { std::fprintf(stderr, "resync launch: %s\n", line.c_str()); }

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// --events FILE: one JSON line per attempt start and end, for benchmarks (scripts/bench/chaos).
class EventLog {
 public:
  explicit EventLog(const std::string& path) {
    if (!path.empty()) file_ = std::fopen(path.c_str(), "a");
  }
  ~EventLog() {
    if (file_ != nullptr) std::fclose(file_);
  }
  bool failed(const std::string& path) const { return !path.empty() && file_ == nullptr; }
  void write(const std::string& line) {
    if (file_ == nullptr) return;
    std::fprintf(file_, "%s\n", line.c_str());
    std::fflush(file_);
  }

 private:
  std::FILE* file_ = nullptr;
};

// Index of the "train" argument (the program's subcommand), or cmd.size().
size_t train_index(const std::vector<std::string>& cmd) {
  for (size_t i = 1; i < cmd.size(); ++i) {
    if (cmd[i] == "train") return i;
  }
  return cmd.size();
}

bool has_train_flag(const std::vector<std::string>& cmd, const std::string& flag) {
  const size_t t = train_index(cmd);
  return std::any_of(cmd.begin() + static_cast<std::ptrdiff_t>(std::min(t, cmd.size())), cmd.end(),
                     [&](const std::string& a) { return a == flag; });
}

// The newest checkpoint's step: of a synchronous run, or of shard 0 of an asynchronous one.
std::optional<uint64_t> newest_step(const std::string& dir) {
  std::optional<uint64_t> newest;
  for (const std::string& d : {dir, server_checkpoint_dir(dir, 0)}) {
    try {
      const std::vector<CheckpointFile> files = list_checkpoints(d);
      if (!files.empty()) newest = std::max(newest.value_or(0), files.back().step);
    } catch (const std::exception&) {
    }
  }
  return newest;
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status)) return fmt::format("killed by signal {}", WTERMSIG(status));
  const int code = WEXITSTATUS(status);
  if (code > 128) return fmt::format("exit {}: a rank was killed by signal {}", code, code - 128);
  if (code == kExitRestart) return fmt::format("exit {}: a rank died, the state was saved", code);
  return fmt::format("exit {}", code);
}

// Runs `cmd`, forwarding SIGINT/SIGTERM to it; returns its wait status.
int run_job(const std::vector<std::string>& cmd) {
  std::vector<char*> argv;
  for (const std::string& a : cmd) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::signal(SIGUSR1, SIG_DFL);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "resync launch: error: cannot run %s: %s\n", argv[0],
                 std::strerror(errno));
    ::_exit(127);
  }
  g_child = pid;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error(fmt::format("waitpid: {}", std::strerror(errno)));
  }
  g_child = 0;
  return status;
}

std::string default_checkpoint_dir() {
  if (const char* job = std::getenv("SLURM_JOB_ID")) {
    return fmt::format("resync-checkpoints/slurm-{}", job);
  }
  const std::time_t now = std::time(nullptr);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", std::localtime(&now));
  return fmt::format("resync-checkpoints/{}", stamp);
}

}  // namespace

JobEnd classify_job_end(int status) {
  if (WIFSIGNALED(status)) return JobEnd::kDeath;
  const int code = WEXITSTATUS(status);
  if (code == 0) return JobEnd::kDone;
  if (code == kExitBadInput) return JobEnd::kBadInput;
  if (code == kExitRestart || code > 128) return JobEnd::kDeath;
  return JobEnd::kFailure;
}

namespace {

// Where the launcher's part of the command (before "train") gives the rank count: the argument
// holding the number, and the text before the number in it ("" for "-np N", "--ntasks=" ...).
struct RanksArg {
  size_t index;
  std::string prefix;
};

std::optional<RanksArg> find_ranks_arg(const std::vector<std::string>& cmd) {
  const size_t t = train_index(cmd);
  for (size_t i = 0; i < t; ++i) {
    const std::string& a = cmd[i];
    if ((a == "-np" || a == "-n" || a == "--np" || a == "--ntasks") && i + 1 < t) {
      return RanksArg{i + 1, ""};
    }
    for (const char* prefix : {"--ntasks=", "-n="}) {
      if (a.starts_with(prefix)) return RanksArg{i, prefix};
    }
  }
  return std::nullopt;
}

}  // namespace

std::optional<int> command_ranks(const std::vector<std::string>& cmd) {
  const std::optional<RanksArg> arg = find_ranks_arg(cmd);
  if (!arg) return std::nullopt;
  try {
    return std::stoi(cmd[arg->index].substr(arg->prefix.size()));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::vector<std::string> with_ranks(const std::vector<std::string>& cmd, int ranks) {
  std::vector<std::string> out = cmd;
  if (const std::optional<RanksArg> arg = find_ranks_arg(cmd)) {
    out[arg->index] = arg->prefix + std::to_string(ranks);
  }
  return out;
}

std::optional<std::string> train_flag(const std::vector<std::string>& cmd,
                                      const std::string& flag) {
  for (size_t i = train_index(cmd); i < cmd.size(); ++i) {
    if (cmd[i] == flag && i + 1 < cmd.size()) return cmd[i + 1];
    if (cmd[i].starts_with(flag + "=")) return cmd[i].substr(flag.size() + 1);
  }
  return std::nullopt;
}

int launch_main(int argc, char** argv) {
  int max_restarts = 3;
  int min_ranks = 0;  // 0: the job's own rank count (never fewer)
  std::string checkpoint_dir;
  std::string events_path;
  CLI::App app{
      "resync launch: run a training job and relaunch it with --resume after a rank "
      "died.\nUsage: resync launch [flags] -- mpirun -np N ... resync train ..."};
  app.name("resync launch");
  app.add_option("--max-restarts", max_restarts, "Give up after this many relaunches")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000));
  app.add_option("--min-ranks", min_ranks,
                 "When a rank dies again before the job made progress (its slot may be gone), "
                 "relaunch with one rank fewer, down to this many (default: never fewer)")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--checkpoint-dir", checkpoint_dir,
                 "Where the job's checkpoints go (default: the job's own --checkpoint-dir, else "
                 "resync-checkpoints/<slurm job id or time>)");
  app.add_option("--events", events_path,
                 "Append a JSON line per attempt start and end (times, exit status) to this file");
  std::vector<std::string> cmd;
  app.add_option("command", cmd, "The job: everything after --")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    say(fmt::format("error: {}", e.what()));
    return kExitBadInput;
  }
  if (train_index(cmd) == cmd.size()) {
    say("error: the command must run 'resync train' (e.g. -- mpirun -np 4 resync train ...)");
    return kExitBadInput;
  }
  if (const auto own = train_flag(cmd, "--checkpoint-dir")) {
    if (!checkpoint_dir.empty() && *own != checkpoint_dir) {
      say(fmt::format("error: --checkpoint-dir {} here but {} in the train command", checkpoint_dir,
                      *own));
      return kExitBadInput;
    }
    checkpoint_dir = *own;
  } else {
    if (checkpoint_dir.empty()) checkpoint_dir = default_checkpoint_dir();
    cmd.push_back("--checkpoint-dir");
    cmd.push_back(checkpoint_dir);
  }
  const std::optional<int> first_ranks = command_ranks(cmd);
  if (min_ranks == 0) min_ranks = first_ranks.value_or(1);
  if (first_ranks && min_ranks > *first_ranks) {
    say(fmt::format("error: --min-ranks {} is more than the job's {} ranks", min_ranks,
                    *first_ranks));
    return kExitBadInput;
  }
  EventLog events(events_path);
  if (events.failed(events_path)) {
    say(fmt::format("error: --events {}: cannot open the file ({})", events_path,
                    std::strerror(errno)));
    return kExitBadInput;
  }
  say(fmt::format("checkpoints in {}; up to {} restart{}", checkpoint_dir, max_restarts,
                  max_restarts == 1 ? "" : "s"));

  struct sigaction sa {};
  sa.sa_handler = forward_signal;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGUSR1, &sa, nullptr);

  int ranks = first_ranks.value_or(0);
  for (int restarts = 0;; ++restarts) {
    std::vector<std::string> attempt = cmd;
    if (restarts > 0) {
      if (first_ranks) attempt = with_ranks(cmd, ranks);
      if (!has_train_flag(attempt, "--resume")) attempt.push_back("--resume");
    }
    const std::optional<uint64_t> before = newest_step(checkpoint_dir);
    const auto t0 = std::chrono::steady_clock::now();
    events.write(fmt::format(R"({{"event":"start","attempt":{},"ranks":{},"time":{:.3f}}})",
                             restarts, ranks, unix_now()));
    const int status = run_job(attempt);
    events.write(fmt::format(R"({{"event":"end","attempt":{},"status":"{}","time":{:.3f}}})",
                             restarts, describe_status(status), unix_now()));
    const double took =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const JobEnd end = classify_job_end(status);
    if (end == JobEnd::kDone) {
      say(fmt::format("the job finished after {} restart{}", restarts, restarts == 1 ? "" : "s"));
      return 0;
    }
    if (g_signalled != 0) {
      say(fmt::format("stopped by signal {} ({}); not restarting", int(g_signalled),
                      describe_status(status)));
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (end == JobEnd::kBadInput) {
      say("error: the job rejected its input (exit 2); not restarting");
      return kExitBadInput;
    }
    const std::optional<uint64_t> after = newest_step(checkpoint_dir);
    const bool progress = after && (!before || *after > *before);
    if (end == JobEnd::kFailure) {
      say(
          fmt::format("error: the job failed ({}) after {:.1f} s, which is not a death; not "
                      "restarting",
                      describe_status(status), took));
      return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    if (restarts >= max_restarts) {
      say(fmt::format("error: giving up after {} restart{}: the job ended again ({})", restarts,
                      restarts == 1 ? "" : "s", describe_status(status)));
      return 1;
    }
    std::string how = fmt::format("{} ranks", ranks);
    if (!progress && restarts > 0 && first_ranks && ranks > min_ranks) {
      // A relaunch died again before any progress: its slots may be gone. Fewer ranks: the
      // learning rate stays (the gradient is an average over the ranks), each rank's shard of
      // the data grows to 1/ranks of it.
      --ranks;
      how = fmt::format(
          "{} ranks (one fewer: the relaunch died before making progress; the "
          "learning rate stays, each rank reads 1/{} of the data)",
          ranks, ranks);
    } else if (!first_ranks) {
      how = "the same ranks";
    }
    say(fmt::format(
        "the job ended ({}) after {:.1f} s; newest checkpoint: {}; relaunching with "
        "--resume on {} (restart {} of {})",
        describe_status(status), took, after ? fmt::format("step {}", *after) : std::string("none"),
        how, restarts + 1, max_restarts));
  }
}

}  // namespace resync::runtime
