#include "runtime/train/overlap_exchange.h"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "base/error.h"

namespace resync::runtime {

OverlapExchange::OverlapExchange(collectives::Allreducer& allreducer, std::span<float> grads,
                                 int world, size_t bucket_elems)
    : allreducer_(allreducer),
      grads_(grads),
      all_ranks_(static_cast<size_t>(world)),
      bucket_elems_(std::max<size_t>(1, bucket_elems)) {
  std::iota(all_ranks_.begin(), all_ranks_.end(), 0);
  queue_.reserve(kMaxBuckets);
  thread_ = std::thread([this] { run(); });
}

OverlapExchange::~OverlapExchange() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void OverlapExchange::begin_step(uint64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  RESYNC_CHECK(done_ == queued_, "overlap: a step began with buckets still in flight");
  queue_.clear();
  queued_ = done_ = 0;
  ++generation_;
  step_seq_ = seq;
  pending_end_ = grads_.size();
  n_buckets_ = 0;
}

void OverlapExchange::gradients_final(size_t first_final) {
  // The last bucket (the first layers) is sent by allreduce_sum; keep one place for it.
  if (pending_end_ - std::min(first_final, pending_end_) < bucket_elems_ ||
      n_buckets_ + 1 >= kMaxBuckets) {
    return;
  }
  enqueue(first_final, pending_end_);
  pending_end_ = first_final;
}

void OverlapExchange::enqueue(size_t begin, size_t end) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Bucket k of the step: its own sequence, the same on every rank.
    queue_.push_back({begin, end, step_seq_ * kMaxBuckets + n_buckets_});
    ++queued_;
  }
  ++n_buckets_;
  cv_.notify_all();
}

void OverlapExchange::allreduce_sum(std::span<const int> members, uint64_t seq) {
  RESYNC_CHECK(seq == step_seq_, fmt::format("overlap: all-reduce of sequence {} in a step begun "
                                             "with {}",
                                             seq, step_seq_));
  if (!std::equal(members.begin(), members.end(), all_ranks_.begin(), all_ranks_.end())) {
    throw CommError("overlap: a plain-sync step without every rank (the buckets already ran "
                    "over all of them)");
  }
  if (pending_end_ > 0) enqueue(0, pending_end_);
  pending_end_ = 0;
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return done_ == queued_; });
  last_buckets_ = queued_;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void OverlapExchange::run() {
  size_t next = 0;
  uint64_t generation = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] {
      return stopping_ || generation != generation_ || next < queue_.size();
    });
    if (generation != generation_) {  // a new step cleared the queue
      generation = generation_;
      next = 0;
    }
    if (next >= queue_.size()) {
      if (stopping_) return;
      continue;
    }
    const Bucket bucket = queue_[next++];
    const bool failed = error_ != nullptr;
    lock.unlock();
    std::exception_ptr error;
    if (!failed) {  // after a failure the step is lost: count the rest as done, run nothing
      try {
        allreducer_.allreduce_sum(grads_.subspan(bucket.begin, bucket.end - bucket.begin),
                                  all_ranks_, bucket.seq);
      } catch (...) {
        error = std::current_exception();
      }
    }
    lock.lock();
    if (error && !error_) error_ = error;
    ++done_;
    if (done_ == queued_) cv_.notify_all();
  }
}

}  // namespace resync::runtime
