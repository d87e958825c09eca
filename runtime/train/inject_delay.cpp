#include "runtime/train/inject_delay.h"

#include <fmt/format.h>

#include <cmath>
#include <sstream>
#include <vector>

#include "base/error.h"
#include "base/random.h"

namespace resync::runtime {
namespace {

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  std::string part;
  while (std::getline(in, part, sep)) parts.push_back(part);
  return parts;
}

double number(const std::string& text, const std::string& what, const std::string& spec) {
  try {
    size_t used = 0;
    double v = std::stod(text, &used);
    if (used == text.size() && std::isfinite(v)) return v;
  } catch (const std::exception&) {
  }
  throw InvalidArgument(fmt::format("--inject-delay '{}': {} '{}' is not a number", spec, what, text));
}

void require(bool ok, const std::string& spec, const std::string& why) {
  if (!ok) throw InvalidArgument(fmt::format("--inject-delay '{}': {}", spec, why));
}

// Parses "lognormal:MEDIAN:SIGMA" or "pareto:SCALE:ALPHA" starting at parts[i].
void parse_distribution(const std::vector<std::string>& parts, size_t i, const std::string& spec,
                        DelaySpec& out) {
  require(parts.size() == i + 3, spec, "expected DIST:X:Y with DIST lognormal or pareto");
  out.a = number(parts[i + 1], "delay", spec);
  out.b = number(parts[i + 2], "shape", spec);
  if (parts[i] == "lognormal") {
    out.dist = DelayDistribution::kLogNormal;
    require(out.a > 0 && out.b >= 0, spec, "lognormal needs MEDIAN_MS > 0 and SIGMA >= 0");
  } else if (parts[i] == "pareto") {
    out.dist = DelayDistribution::kPareto;
    require(out.a > 0 && out.b > 0, spec, "pareto needs SCALE_MS > 0 and ALPHA > 0");
  } else {
    require(false, spec, "unknown distribution '" + parts[i] + "' (lognormal or pareto)");
  }
}

double draw(const DelaySpec& spec, SplitMix64& rng) {
  switch (spec.dist) {
    case DelayDistribution::kConstant:
      return spec.a;
    case DelayDistribution::kLogNormal:
      return spec.a * std::exp(spec.b * rng.normal());
    case DelayDistribution::kPareto: {
      double u = 1.0 - rng.uniform();  // (0, 1]
      return spec.a / std::pow(u, 1.0 / spec.b);
    }
  }
  return 0;
}

constexpr double kMaxDelayMs = 600'000;  // a heavy tail must not freeze an experiment for hours

}  // namespace

DelaySpec parse_delay_spec(const std::string& text) {
  DelaySpec spec;
  if (text.empty() || text == "none") return spec;
  const std::vector<std::string> parts = split(text, ':');
  if (parts[0] == "fixed") {
    require(parts.size() == 3, text, "expected fixed:RANK:MS");
    double rank = number(parts[1], "rank", text);
    require(rank >= 0 && rank == std::floor(rank), text, "RANK must be a whole number >= 0");
    spec.kind = DelayKind::kFixedRank;
    spec.rank = static_cast<int>(rank);
    spec.dist = DelayDistribution::kConstant;
    spec.a = number(parts[2], "delay", text);
    require(spec.a >= 0, text, "MS must be >= 0");
  } else if (parts[0] == "random") {
    require(parts.size() >= 2, text, "expected random:P:DIST:X:Y");
    spec.kind = DelayKind::kRandomEach;
    spec.probability = number(parts[1], "probability", text);
    require(spec.probability >= 0 && spec.probability <= 1, text, "P must be in [0, 1]");
    parse_distribution(parts, 2, text, spec);
  } else if (parts[0] == "one") {
    spec.kind = DelayKind::kOneRandom;
    parse_distribution(parts, 1, text, spec);
  } else {
    require(false, text, "unknown kind '" + parts[0] + "' (none, fixed, random or one)");
  }
  return spec;
}

double injected_delay_ms(const DelaySpec& spec, uint64_t seed, uint64_t step, int rank, int world) {
  double ms = 0;
  switch (spec.kind) {
    case DelayKind::kNone:
      return 0;
    case DelayKind::kFixedRank:
      return rank == spec.rank ? spec.a : 0;
    case DelayKind::kRandomEach: {
      SplitMix64 rng(mix_seed(seed, step, static_cast<uint64_t>(rank) + 1));
      if (rng.uniform() >= spec.probability) return 0;
      ms = draw(spec, rng);
      break;
    }
    case DelayKind::kOneRandom: {
      SplitMix64 pick(mix_seed(seed, step, 0xC0FFEE));
      if (static_cast<int>(pick.below(static_cast<uint64_t>(world))) != rank) return 0;
      ms = draw(spec, pick);
      break;
    }
  }
  return std::min(ms, kMaxDelayMs);
}

}  // namespace resync::runtime
