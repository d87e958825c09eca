// Straggler injection for experiments (--inject-delay): which rank sleeps how long before
// sending READY at a step. A pure function of (spec, seed, step, rank), so runs repeat exactly
// and every rank could compute every other rank's delay.
#pragma once

#include <cstdint>
#include <string>

namespace resync::runtime {

enum class DelayKind { kNone, kFixedRank, kRandomEach, kOneRandom };
enum class DelayDistribution { kConstant, kLogNormal, kPareto };

struct DelaySpec {
  DelayKind kind = DelayKind::kNone;
  int rank = -1;             // kFixedRank
  double probability = 0;    // kRandomEach: chance per rank per step
  DelayDistribution dist = DelayDistribution::kConstant;
  double a = 0;              // constant: ms; lognormal: median ms; pareto: scale (minimum) ms
  double b = 0;              // lognormal: sigma; pareto: shape alpha
};

// Parses none | fixed:RANK:MS | random:P:lognormal:MEDIAN_MS:SIGMA | random:P:pareto:SCALE_MS:ALPHA
// | one:lognormal:MEDIAN_MS:SIGMA | one:pareto:SCALE_MS:ALPHA. Throws InvalidArgument.
DelaySpec parse_delay_spec(const std::string& text);

// Milliseconds rank `rank` of `world` sleeps before READY at `step`.
double injected_delay_ms(const DelaySpec& spec, uint64_t seed, uint64_t step, int rank, int world);

}  // namespace resync::runtime
