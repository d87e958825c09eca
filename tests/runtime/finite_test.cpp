// The non-finite checks of runtime/train/finite.h, and write_checkpoint refusing a diverged state.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <functional>
#include <filesystem>
#include <limits>
#include <type_traits>
#include <string>
#include <vector>

#include "base/error.h"
#include "runtime/io/checkpoint.h"
#include "runtime/train/finite.h"

using namespace resync::runtime;
using resync::NonFiniteError;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const NonFiniteError& e) {
    return e.what();
  }
  return "(no NonFiniteError)";
}

}  // namespace

TEST(Finite, AllFiniteAcceptsOrdinaryAndExtremeValues) {
  std::vector<float> v(669706, 0.5f);
  EXPECT_TRUE(all_finite(v));
  EXPECT_TRUE(all_finite({}));
  v[3] = std::numeric_limits<float>::max();
  v[4] = -std::numeric_limits<float>::max();
  v[5] = std::numeric_limits<float>::denorm_min();
  v[6] = -0.0f;
  EXPECT_TRUE(all_finite(v));
  EXPECT_EQ(first_non_finite(v), v.size());
}

TEST(Finite, FindsEveryKindAtEveryPosition) {
  // Every position of a length that is no multiple of a vector width, so the vector body and
  // the scalar tail both see one.
  for (const float bad : {kNaN, -kNaN, kInf, -kInf}) {
    for (size_t n : {1, 7, 33, 1001}) {
      for (size_t i = 0; i < n; ++i) {
        std::vector<float> v(n, 1.0f);
        v[i] = bad;
        ASSERT_FALSE(all_finite(v)) << "n " << n << " i " << i << " value " << bad;
        ASSERT_EQ(first_non_finite(v), i);
      }
    }
  }
}

TEST(Finite, InfAndMinusInfDoNotCancel) {
  std::vector<float> v = {kInf, -kInf, 1.0f};
  EXPECT_FALSE(all_finite(v));
  EXPECT_EQ(first_non_finite(v), 0u);
}

TEST(Finite, LossMessageNamesValueStepAndRank) {
  EXPECT_NO_THROW(check_finite_loss(2.3, 0, 0));
  EXPECT_NO_THROW(check_finite_loss(1e300, 0, 0));
  EXPECT_EQ(message_of([] { check_finite_loss(std::nan(""), 17, 2); }),
            "non-finite loss (nan) at step 17 on rank 2");
  EXPECT_EQ(message_of([] { check_finite_loss(HUGE_VAL, 3, 0); }),
            "non-finite loss (inf) at step 3 on rank 0");
  try {
    check_finite_loss(-HUGE_VAL, 42, 5);
    FAIL() << "no throw";
  } catch (const NonFiniteError& e) {
    EXPECT_EQ(e.step(), 42u);
    EXPECT_EQ(e.rank(), 5);
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);  // one line
  }
}

TEST(Finite, ValuesMessageNamesTheFirstBadValue) {
  std::vector<float> g(100, 0.25f);
  EXPECT_NO_THROW(check_finite_values(g, "gradient", 0, 1));
  g[40] = kInf;
  g[70] = kNaN;
  EXPECT_EQ(message_of([&] { check_finite_values(g, "gradient", 9, 3); }),
            "non-finite gradient (inf at index 40 of 100) at step 9 on rank 3");
}

TEST(Finite, NanIsShownWithoutSign) {
  EXPECT_EQ(message_of([] { check_finite_loss(-std::nan(""), 1, 0); }),
            "non-finite loss (nan) at step 1 on rank 0");
  std::vector<float> g = {1.0f, -kInf};
  EXPECT_EQ(message_of([&] { check_finite_values(g, "parameters", 4, 1); }),
            "non-finite parameters (-inf at index 1 of 2) at step 4 on rank 1");
}

TEST(Finite, SharedValuesAreReportedByOneRankOnly) {
  std::vector<float> sum(50, 1.0f);
  EXPECT_NO_THROW(check_finite_shared(sum, "summed gradient", 8, 2, 0));
  sum[10] = kNaN;
  for (int rank = 0; rank < 4; ++rank) {
    try {
      check_finite_shared(sum, "summed gradient", 8, rank, /*reporter=*/1);
      FAIL() << "no throw on rank " << rank;
    } catch (const NonFiniteError& e) {
      EXPECT_EQ(e.reported_by_peer(), rank != 1) << rank;
      EXPECT_EQ(e.step(), 8u);
      EXPECT_EQ(std::string(e.what()),
                "non-finite summed gradient (nan at index 10 of 50) at step 8 on rank " +
                    std::to_string(rank));
    }
  }
  // A local check always reports itself.
  try {
    check_finite_values(sum, "gradient", 8, 3);
  } catch (const NonFiniteError& e) {
    EXPECT_FALSE(e.reported_by_peer());
  }
}

TEST(Finite, ErrorsForAnotherRanksReport) {
  const NonFiniteError loss = non_finite_loss_error(std::nan(""), 6, 3);
  EXPECT_STREQ(loss.what(), "non-finite loss (nan) at step 6 on rank 3");
  EXPECT_FALSE(loss.reported_by_peer());
  const NonFiniteError grad = non_finite_values_error("gradient", HUGE_VAL, 7, 100, 6, 3, true);
  EXPECT_STREQ(grad.what(), "non-finite gradient (inf at index 7 of 100) at step 6 on rank 3");
  EXPECT_TRUE(grad.reported_by_peer());
}

TEST(Finite, IsAResyncError) {
  // main() maps it to exit 1 like any runtime failure, never to bad input (2).
  static_assert(std::is_base_of_v<resync::Error, NonFiniteError>);
  static_assert(!std::is_base_of_v<resync::InvalidArgument, NonFiniteError>);
}

TEST(Finite, WriteCheckpointRefusesNonFiniteStateAndWritesNothing) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("resync_finite_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  prepare_checkpoint_dir(dir.string());
  CheckpointMeta meta{.step = 12, .model = "mlp 4-2 (10 params)", .world_size = 2, .seed = 1,
                      .batch_size = 8};
  std::vector<float> params(10, 0.5f);
  std::vector<float> velocity(10, 0.0f);
  params[7] = kNaN;
  EXPECT_THROW(write_checkpoint(dir.string(), meta, params, velocity), NonFiniteError);
  params[7] = 0.5f;
  velocity[2] = -kInf;
  EXPECT_THROW(write_checkpoint(dir.string(), meta, params, velocity), NonFiniteError);
  EXPECT_TRUE(std::filesystem::is_empty(dir)) << "a file was written from a non-finite state";
  velocity[2] = 0.0f;
  const std::string path = write_checkpoint(dir.string(), meta, params, velocity);
  EXPECT_EQ(read_checkpoint(path).params, params);
  std::filesystem::remove_all(dir);
}
