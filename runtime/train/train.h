// runtime/train: the training loops and what they run: the synchronous loop (train_sync.cpp)
// feeding the step protocol's StepExecutor (step_executor.h), its set-up (sync_setup.h) and rank
// 0's duties between steps (rank_zero_duties.h); the asynchronous loop (train_async.cpp); the
// Replica on each device (replica.h), the optimizer, injected delays, preemption signals and the
// non-finite checks.
//
// The training entry points of `resync train`: synchronous data-parallel SGD with the
// straggler-tolerant ring all-reduce.
#pragma once

#include <exception>
#include <string>

#include "runtime/io/config.h"
#include "runtime/observe/metrics.h"

namespace resync::collectives {
class MpiSession;
}

namespace resync::runtime {

// Runs training on every rank of the session's world. Returns rank 0's summary (every rank
// gets the same summary values). Throws InvalidArgument/DataError for bad input, Error otherwise.
SummaryRecord train_sync(const TrainConfig& cfg, collectives::MpiSession& mpi);

// Asynchronous parameter-server training (--mode async): ranks 0..ps-1 serve parameter shards,
// the others push gradients and pull fresh parameters without waiting for each other. Same
// contract as train_sync.
SummaryRecord train_async(const TrainConfig& cfg, collectives::MpiSession& mpi);

// True for the error a rank raises when its own set-up worked but another rank's failed: that
// rank reports the problem, this one should exit with code 2 without repeating it.
bool is_quiet_peer_failure(const std::exception& e);

}  // namespace resync::runtime
