// `resync launch`: runs a training job and relaunches it after a death, in the spirit of
// torchrun's elastic agent (README, "Dead ranks: save and relaunch").
//
//   resync launch [--max-restarts K] [--min-ranks M] [--checkpoint-dir DIR] --
//       mpirun -np N ... resync train ...      (or: srun -n N ... resync train ...)
//
// The job exits with kExitRestart (75) after a death, or its launcher reports a rank killed by
// a signal (exit > 128): the launcher runs it again with --resume from the checkpoint directory,
// with N ranks, or, with --min-ranks M < N, when a relaunch dies again before making progress
// (its slots may be gone), with one rank fewer down to M. Exit 0 ends it; bad input (exit 2)
// and any other failure are never retried.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace resync::runtime {

// Entry point of `resync launch ...`; argv[0] is "launch". Never starts MPI itself.
int launch_main(int argc, char** argv);

// How an attempt of the job ended, from its wait status.
enum class JobEnd { kDone, kBadInput, kDeath, kFailure };
JobEnd classify_job_end(int wait_status);

// The command's rank count (-np/-n/--np/--ntasks N, -n=N, --ntasks=N before the program's
// "train"), and the same command with `ranks` instead. nullopt: the command names none.
std::optional<int> command_ranks(const std::vector<std::string>& cmd);
std::vector<std::string> with_ranks(const std::vector<std::string>& cmd, int ranks);

// The value of a train flag given as "--flag V" or "--flag=V" after "train", if any.
std::optional<std::string> train_flag(const std::vector<std::string>& cmd, const std::string& flag);

}  // namespace resync::runtime
