#include "runtime/io/cli.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <thread>

#include <unistd.h>

#include "base/error.h"
#include "base/log.h"
#include "collectives/transport/mpi_session.h"
#include "collectives/transport/world.h"
#include "kernels/gemm.h"
#include "runtime/tools/bench.h"
#include "runtime/tools/generate.h"
#include "runtime/io/config.h"
#include "runtime/tools/info.h"
#include "runtime/tools/launch.h"
#include "runtime/train/rescue.h"
#include "runtime/train/train.h"
#include "runtime/train/train_common.h"

namespace resync::runtime {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitRuntime = 1;
constexpr int kExitBadInput = 2;

// The launcher's rank before MPI is up, so only one rank prints a flag error.
int launcher_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"}) {
    if (const char* v = std::getenv(var)) return std::atoi(v);
  }
  return 0;
}

// OpenBLAS picks its kernels when the library loads, from the CPU or OPENBLAS_CORETYPE. Version
// 0.3.21 (Debian bookworm) does not recognise recent Xeons and falls back to SSE3 kernels that
// are 3-4x slower. If the user did not choose, pick the right kernel set and restart this
// program once, before MPI starts (exec keeps the pid, so launchers do not notice).
void restart_with_fast_blas_if_needed(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  const std::string coretype = kernels::blas_recommended_coretype();
  if (coretype.empty()) return;
  ::setenv("OPENBLAS_CORETYPE", coretype.c_str(), 1);
  ::execv("/proc/self/exe", argv);
  // exec failed: carry on with the slow kernels; the training log repeats the advice.
  ::unsetenv("OPENBLAS_CORETYPE");
}

void print_error(int rank, const std::string& what) {
  std::fprintf(stderr, "resync: error%s: %s\n",
               rank >= 0 ? fmt::format(" (rank {})", rank).c_str() : "", what.c_str());
}

}  // namespace

int run_cli(int argc, char** argv) {
  restart_with_fast_blas_if_needed(argv);
  // Each subcommand is its own CLI11 app, so that a --config TOML file holds plain top-level
  // keys (CLI11 reads a subcommand's keys only from a [section]).
  const std::string command = argc >= 2 ? argv[1] : "";
  if (command == "bench") return bench_main(argc - 1, argv + 1);
  if (command == "launch") return launch_main(argc - 1, argv + 1);
  if (command == "generate") return generate_main(argc - 1, argv + 1);
  TrainConfig cfg;
  CLI::App app{"resync: data-parallel training on MPI clusters with a straggler-tolerant ring.\n"
               "Commands: train (under mpirun or srun), launch, bench, generate, info. See "
               "'resync train --help'."};
  app.name(command == "train" || command == "info" ? "resync " + command : "resync");
  if (command == "train") {
    declare_train_flags(app, cfg);
  } else if (command != "info") {
    app.add_option("command", "train, launch, bench, generate or info")
        ->required()
        ->check(CLI::IsMember({"train", "launch", "bench", "generate", "info"}));
  }
  try {
    const bool subcommand = command == "train" || command == "info";
    app.parse(subcommand ? argc - 1 : argc, subcommand ? argv + 1 : argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    if (launcher_rank() == 0) {
      print_error(-1, e.what());
    } else {
      // The launcher ends the job when the first rank exits: give rank 0 the time to print
      // the error, or the user may see nothing but the launcher's banner.
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
    return kExitBadInput;
  }

  int rank = -1;
  std::optional<collectives::MpiSession> mpi;  // outlives the handlers below
  // Past the agreed set-up, a failure of any kind on one rank ends the whole job.
  auto abort_if_training = [&](const std::exception& e) {
    if (!mpi || !mpi->setup_agreed()) return;
    print_error(rank, e.what());
    collectives::abort_world(kExitRuntime);
  };
  try {
    if (command == "info") {
      mpi.emplace(&argc, &argv);
      if (mpi->rank() == 0) std::fputs(build_info(*mpi).c_str(), stdout);
      return kExitOk;
    }
    log::init(-1, cfg.log_level);
    // Serialized: plain sync's overlapped exchange calls MPI from its communication thread while
    // the training thread computes (never both at once).
    mpi.emplace(&argc, &argv, collectives::ThreadLevel::kSerialized);
    rank = mpi->rank();
    log::init(rank, cfg.log_level);
    if (cfg.mode == "async") {
      train_async(cfg, *mpi);
    } else {
      train_sync(cfg, *mpi);
    }
    return kExitOk;
  } catch (const resync::InvalidArgument& e) {
    abort_if_training(e);
    // Set-up errors are agreed on: exactly one rank reports, every rank exits 2.
    if (!is_quiet_peer_failure(e)) print_error(-1, e.what());
    return kExitBadInput;
  } catch (const resync::DataError& e) {
    abort_if_training(e);
    print_error(-1, e.what());
    return kExitBadInput;
  } catch (const SetupDeviceError& e) {
    // No usable device, agreed on by every rank at set-up: one line, exit 1, no MPI abort.
    if (!is_quiet_peer_failure(e)) print_error(-1, e.what());
    return kExitRuntime;
  } catch (const NonFiniteError& e) {
    // A diverged run: the message names the step and the rank already. One rank reports it and
    // ends the whole job; a rank whose failure another rank reports (the same values, or told
    // it) waits quietly for that, and reports it itself only if the job is still running.
    if (e.reported_by_peer() && rank >= 0) {
      std::this_thread::sleep_for(std::chrono::seconds(10));
    }
    print_error(-1, e.what());
    if (rank >= 0) collectives::abort_world(kExitRuntime);
    return kExitRuntime;
  } catch (const CommError& e) {
    // A control or MPI call failed after set-up: a rank died, or rank 0. With a checkpoint
    // directory the rescue saves the state and exits to be restarted (runtime/train/rescue.h).
    if (mpi && mpi->setup_agreed()) rescue_if_armed(e.what());
    print_error(rank, e.what());
    if (rank >= 0) collectives::abort_world(kExitRuntime);
    return kExitRuntime;
  } catch (const std::exception& e) {
    // A runtime failure may leave other ranks waiting on this one: end the whole job.
    print_error(rank, e.what());
    if (rank >= 0) collectives::abort_world(kExitRuntime);
    return kExitRuntime;
  }
}

}  // namespace resync::runtime
