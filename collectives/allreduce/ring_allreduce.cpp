#include "collectives/allreduce/ring_allreduce.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <numeric>

#include "base/error.h"
#include "collectives/allreduce/float_sum.h"
#include "collectives/allreduce/participants.h"

namespace resync::collectives {

const char* phase_name(AllreducePhase phase) {
  switch (phase) {
    case AllreducePhase::kReduceScatter:
      return "reduce_scatter";
    case AllreducePhase::kAllGather:
      return "all_gather";
    case AllreducePhase::kWhole:
      return "allreduce";
  }
  return "?";
}

// The ring as two streams of segments. With participants in list order and `me` our position,
// step t < p-1 is reduce-scatter step t, step t >= p-1 is all-gather step t-(p-1):
//   receive stream, step t: chunk (me-t-1) [reduce-scatter], chunk (me-(t-p+1)) [all-gather]
//   send stream,    step t: chunk (me-t)   [reduce-scatter], chunk (me+1-(t-p+1)) [all-gather]
// so the chunk sent at step t+1 is the chunk received at step t, segment for segment: once
// received segment k of step t is reduced (or, in the all-gather, has arrived), segment k of
// send step t+1 may leave. Our left neighbour's send stream is our receive stream.
struct RingAllreduce::Plan {
  size_t n_elems;
  size_t seg_elems;
  int p;
  int me;
  int n_steps;  // 2(p-1), in each stream
  int left;     // world rank we receive from
  int right;    // world rank we send to

  int wrap(int c) const { return ((c % p) + p) % p; }
  size_t chunk_begin(int c) const {
    const size_t base = n_elems / p;
    const size_t rem = n_elems % p;
    return c * base + std::min<size_t>(c, rem);
  }
  size_t chunk_len(int c) const { return n_elems / p + (static_cast<size_t>(c) < n_elems % p); }
  size_t n_segments(int c) const { return (chunk_len(c) + seg_elems - 1) / seg_elems; }
  int recv_chunk(int t) const { return t < p - 1 ? wrap(me - t - 1) : wrap(me - (t - p + 1)); }
  int send_chunk(int t) const { return t < p - 1 ? wrap(me - t) : wrap(me + 1 - (t - p + 1)); }
};

namespace {

// Position in a stream: step t, segment k of that step, and the running index. Steps without
// segments (empty chunks, when n_elems < p) are skipped.
struct Cursor {
  int t = 0;
  size_t k = 0;
  size_t index = 0;

  template <typename Segments>
  void skip_empty(int n_steps, const Segments& segments) {
    while (t < n_steps && k >= segments(t)) {
      ++t;
      k = 0;
    }
  }
  template <typename Segments>
  void advance(int n_steps, const Segments& segments) {
    ++index;
    ++k;
    skip_empty(n_steps, segments);
  }
};

}  // namespace

RingAllreduce::RingAllreduce(Context& ctx, RingOptions options)
    : ctx_(ctx), options_(options), seg_elems_(std::max<size_t>(1, options.segment_bytes / 4)) {
  RESYNC_CHECK_ARG(options_.recv_depth >= 1 && options_.recv_depth <= 64,
                   fmt::format("ring recv_depth must be in 1..64, got {}", options_.recv_depth));
  RESYNC_CHECK_ARG(options_.max_sends_in_flight >= 1 && options_.max_sends_in_flight <= 64,
                   fmt::format("ring max_sends_in_flight must be in 1..64, got {}",
                               options_.max_sends_in_flight));
  recvs_.resize(options_.recv_depth);
  sends_.resize(options_.max_sends_in_flight);
  world_.resize(ctx.size());
  std::iota(world_.begin(), world_.end(), 0);
  recv_step_start_.reserve(2 * ctx.size() + 1);
  if (options_.max_elems > 0) {
    reserve_scratch(std::min(seg_elems_, (options_.max_elems + 1) / 2));
  }
}

void RingAllreduce::reserve_scratch(size_t slot_elems) {
  if (slot_elems <= slot_elems_) return;
  slot_elems_ = slot_elems;
  scratch_.assign(slot_elems_ * options_.recv_depth, 0.0f);
}

void RingAllreduce::allreduce_sum(std::span<float> data) {
  allreduce_sum(data, world_, ctx_.next_sequence());
}

void RingAllreduce::allreduce_sum(std::span<float> data, std::span<const int> participants) {
  allreduce_sum(data, participants, ctx_.next_sequence());
}

void RingAllreduce::allreduce_sum(std::span<float> data, std::span<const int> participants,
                                  uint64_t seq) {
  const int p = static_cast<int>(participants.size());
  const int me = position_in_participants(participants, ctx_.rank(), ctx_.size(), seq);
  if (p == 1 || data.empty()) return;

  const Plan plan{data.size(),
                  seg_elems_,
                  p,
                  me,
                  2 * (p - 1),
                  participants[(me + p - 1) % p],
                  participants[(me + 1) % p]};
  reserve_scratch(std::min(seg_elems_, plan.chunk_len(0)));
  try {
    run(plan, data, seq);
  } catch (...) {
    abandon_all();
    throw;
  }
}

void RingAllreduce::abandon_all() noexcept {
  for (Request& r : recvs_) r.reset();
  for (Request& r : sends_) r.reset();
}

void RingAllreduce::run(const Plan& plan, std::span<float> data, uint64_t seq) {
  Transport& transport = ctx_.transport();
  const Deadline deadline = ctx_.deadline();
  const size_t depth = recvs_.size();
  const size_t max_sends = sends_.size();
  const int n_steps = plan.n_steps;
  const int reduce_steps = plan.p - 1;
  const auto recv_segments = [&](int t) { return plan.n_segments(plan.recv_chunk(t)); };
  const auto send_segments = [&](int t) { return plan.n_segments(plan.send_chunk(t)); };
  const auto segment = [&](int chunk, size_t k) {
    const size_t offset = k * plan.seg_elems;
    return data.subspan(plan.chunk_begin(chunk) + offset,
                        std::min(plan.seg_elems, plan.chunk_len(chunk) - offset));
  };

  recv_step_start_.resize(n_steps + 1);  // within the capacity reserved for the world
  recv_step_start_[0] = 0;
  for (int t = 0; t < n_steps; ++t)
    recv_step_start_[t + 1] = recv_step_start_[t] + recv_segments(t);
  const size_t n_recvs = recv_step_start_[n_steps];
  // Send step 0 is our own chunk; send step t >= 1 repeats receive step t-1.
  const size_t n_own = plan.n_segments(plan.me);
  const size_t n_sends = n_own + recv_step_start_[n_steps - 1];

  Cursor posted;  // next receive to post
  Cursor done;    // next receive to complete and consume
  Cursor sent;    // next send to post
  posted.skip_empty(n_steps, recv_segments);
  done.skip_empty(n_steps, recv_segments);
  sent.skip_empty(n_steps, send_segments);
  size_t retired = 0;  // sends completed, in posting order

  // The reduce-scatter ends once every received reduce-scatter segment has been summed in;
  // all-gather traffic may already be under way (the streams overlap), but nothing is summed
  // after this point.
  ScopedPhase phase(observer_, {AllreducePhase::kReduceScatter, seq, plan.n_elems, plan.p});
  bool gathering = false;
  const auto note_phase = [&] {
    if (!gathering && done.t >= reduce_steps) {
      gathering = true;
      phase.next(AllreducePhase::kAllGather);
    }
  };
  note_phase();

  while (done.index < n_recvs || retired < n_sends) {
    bool progressed = false;

    // Post receives ahead of the one being consumed.
    while (posted.index < n_recvs && posted.index < done.index + depth) {
      const std::span<float> seg = segment(plan.recv_chunk(posted.t), posted.k);
      std::span<float> dst = seg;
      if (posted.t < reduce_steps) {
        dst = std::span(scratch_).subspan((posted.index % depth) * slot_elems_, seg.size());
      } else {
        // All-gather data lands in `data`: the reduce-scatter send of this chunk (send step
        // s) and everything before it must have left, or we would overwrite what it reads.
        const int s = posted.t - reduce_steps;
        if (retired < n_own + recv_step_start_[s]) break;
      }
      recvs_[posted.index % depth] =
          ctx_.irecv(plan.left, OpKind::kAllreduce, seq, std::as_writable_bytes(dst));
      posted.advance(n_steps, recv_segments);
      progressed = true;
    }

    while (retired < sent.index && transport.test(sends_[retired % max_sends])) {
      ++retired;
      progressed = true;
    }

    if (done.index < posted.index && transport.test(recvs_[done.index % depth])) {
      const std::span<float> seg = segment(plan.recv_chunk(done.t), done.k);
      const size_t n_got = recvs_[done.index % depth].transferred_bytes();
      if (n_got != seg.size_bytes()) {
        throw CommError(fmt::format(
            "ring all-reduce seq {}: rank {} got {} bytes from rank {} for a {}-byte segment; "
            "do all participants pass the same element count ({})?",
            seq, ctx_.rank(), n_got, plan.left, seg.size_bytes(), plan.n_elems));
      }
      if (done.t < reduce_steps) {
        add_into(seg, std::span<const float>(scratch_).subspan((done.index % depth) * slot_elems_,
                                                               seg.size()));
      }
      done.advance(n_steps, recv_segments);
      note_phase();
      progressed = true;
    }

    // A segment may leave once its data is final for this step: our own chunk at once, later
    // steps after the matching received segment has been consumed.
    while (sent.index < n_sends && sent.index - retired < max_sends &&
           (sent.index < n_own || sent.index - n_own < done.index)) {
      const std::span<const float> seg = segment(plan.send_chunk(sent.t), sent.k);
      sends_[sent.index % max_sends] =
          ctx_.isend(plan.right, OpKind::kAllreduce, seq, std::as_bytes(seg));
      sent.advance(n_steps, send_segments);
      progressed = true;
    }

    if (progressed) continue;
    // Nothing to do until the next receive or the oldest send completes.
    std::array<Request*, 2> waits{nullptr, nullptr};
    if (done.index < posted.index) waits[0] = &recvs_[done.index % depth];
    if (retired < sent.index) waits[1] = &sends_[retired % max_sends];
    transport.wait_any(waits, deadline);
  }
}

}  // namespace resync::collectives
