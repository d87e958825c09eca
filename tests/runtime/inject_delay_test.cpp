// Straggler injection specs and their seeded delays.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "base/error.h"
#include "runtime/train/inject_delay.h"

using namespace resync::runtime;

TEST(InjectDelay, ParsesEveryKind) {
  EXPECT_EQ(parse_delay_spec("none").kind, DelayKind::kNone);
  DelaySpec f = parse_delay_spec("fixed:2:150");
  EXPECT_EQ(f.kind, DelayKind::kFixedRank);
  EXPECT_EQ(f.rank, 2);
  EXPECT_DOUBLE_EQ(f.a, 150);
  DelaySpec r = parse_delay_spec("random:0.25:lognormal:40:1.5");
  EXPECT_EQ(r.kind, DelayKind::kRandomEach);
  EXPECT_DOUBLE_EQ(r.probability, 0.25);
  EXPECT_EQ(r.dist, DelayDistribution::kLogNormal);
  DelaySpec o = parse_delay_spec("one:pareto:10:1.2");
  EXPECT_EQ(o.kind, DelayKind::kOneRandom);
  EXPECT_EQ(o.dist, DelayDistribution::kPareto);
}

TEST(InjectDelay, RejectsBadSpecs) {
  for (const char* bad : {"fixed", "fixed:x:10", "fixed:-1:10", "fixed:1:-5", "fixed:1.5:3",
                          "random:2:lognormal:1:1", "random:0.5:gauss:1:1", "one:pareto:0:1",
                          "one:pareto:5:0", "one:lognormal:5", "sometimes", "random:0.5"}) {
    EXPECT_THROW(parse_delay_spec(bad), resync::InvalidArgument) << bad;
  }
}

TEST(InjectDelay, FixedRankOnly) {
  DelaySpec s = parse_delay_spec("fixed:1:30");
  for (uint64_t step = 0; step < 5; ++step) {
    EXPECT_EQ(injected_delay_ms(s, 1, step, 0, 3), 0);
    EXPECT_EQ(injected_delay_ms(s, 1, step, 1, 3), 30);
  }
}

TEST(InjectDelay, OneRandomRankPerStepSeededAndHeavyTailed) {
  DelaySpec s = parse_delay_spec("one:lognormal:20:1.0");
  std::vector<double> delays;
  for (uint64_t step = 0; step < 2000; ++step) {
    int delayed = 0;
    for (int r = 0; r < 4; ++r) {
      double d = injected_delay_ms(s, 9, step, r, 4);
      EXPECT_EQ(d, injected_delay_ms(s, 9, step, r, 4));  // repeatable
      if (d > 0) {
        ++delayed;
        delays.push_back(d);
      }
    }
    EXPECT_EQ(delayed, 1) << "step " << step;
  }
  std::sort(delays.begin(), delays.end());
  const double median = delays[delays.size() / 2];
  EXPECT_NEAR(median, 20.0, 3.0);
  EXPECT_GT(delays[delays.size() * 99 / 100], 3 * median);  // a heavy tail
}

TEST(InjectDelay, RandomEachHitsAboutProbability) {
  DelaySpec s = parse_delay_spec("random:0.1:pareto:5:2");
  int hits = 0;
  for (uint64_t step = 0; step < 5000; ++step) {
    double d = injected_delay_ms(s, 3, step, 2, 4);
    if (d > 0) {
      ++hits;
      EXPECT_GE(d, 5.0);
    }
  }
  EXPECT_NEAR(hits / 5000.0, 0.1, 0.02);
}
