// OverlapExchange: plain synchronous SGD's gradient exchange, overlapped with the backward pass
// (the bucket technique of PyTorch DDP and Horovod). As the backward pass finishes the
// gradients of the last layers, a communication thread all-reduces them in buckets while the
// earlier layers are still computing; the step then only waits for what is left.
//
// Only for plain sync (no backup workers, no timeout): every rank takes part in every step, so
// the members are known before the coordinator's order. The communication thread is the only
// one calling MPI while a step's buckets are in flight (MPI_THREAD_SERIALIZED); the training
// thread calls MPI again only after allreduce_sum() returned.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "collectives/allreduce/allreducer.h"
#include "runtime/train/step_executor.h"

namespace resync::runtime {

class OverlapExchange final : public GradientExchange {
 public:
  // A bucket holds whole layers and at least `bucket_elems` floats (the first one takes what is
  // left); buckets depend only on the layer layout, so every rank cuts the same ones.
  static constexpr size_t kMaxBuckets = 64;

  OverlapExchange(collectives::Allreducer& allreducer, std::span<float> grads, int world,
                  size_t bucket_elems);
  ~OverlapExchange() override;
  OverlapExchange(const OverlapExchange&) = delete;
  OverlapExchange& operator=(const OverlapExchange&) = delete;

  // Before the backward pass of a step whose all-reduce will have sequence `seq`
  // (StepExecutor's: step * kAttemptsPerStep).
  void begin_step(uint64_t seq);
  // The replica's GradientsFinalHook: gradients [first_final, n) are final.
  void gradients_final(size_t first_final);
  // Sends what is left and waits for every bucket of the step. `members` must be every rank;
  // rethrows the communication thread's error.
  void allreduce_sum(std::span<const int> members, uint64_t seq) override;

  // Buckets of the last step (for the log).
  size_t last_buckets() const { return last_buckets_; }

 private:
  struct Bucket {
    size_t begin = 0;
    size_t end = 0;
    uint64_t seq = 0;
  };
  void enqueue(size_t begin, size_t end);
  void run();

  collectives::Allreducer& allreducer_;
  std::span<float> grads_;
  std::vector<int> all_ranks_;
  size_t bucket_elems_;
  // Training thread only.
  uint64_t step_seq_ = 0;
  size_t pending_end_ = 0;  // gradients [.., pending_end_) not yet sent
  size_t n_buckets_ = 0;
  size_t last_buckets_ = 0;
  // Shared with the communication thread.
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Bucket> queue_;
  size_t queued_ = 0;
  size_t done_ = 0;
  uint64_t generation_ = 0;  // steps begun
  bool stopping_ = false;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace resync::runtime
