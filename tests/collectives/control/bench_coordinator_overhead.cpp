// Benchmark (not a test): does a live TCP coordinator thread cost rank 0 compute throughput?
// The main thread, pinned to CPU 0 like an MPI rank bound to a core, runs a cache-resident float
// multiply-add loop. Four control clients run in a helper process pinned to CPU 1 and report
// READY at a paced, modest rate (default 500 READY/s in total, and as many orders come back),
// so what is measured is the coordinator waiting and waking next to the computation.
//
// Part 1, as specified: ~2 s of compute alone, then ~2 s with the coordinator thread in this
// process serving the clients; the ratio per trial and its median over the trials.
// Part 2, because the shared development VM drifts (its compute rate moved by up to 1.7x within
// seconds, more than any effect we look for): the clients switch their traffic on and off every
// 100 ms for 4 s while the compute loop runs; comparing each "on" slice with the "off" slices
// around it cancels the drift. Done with the coordinator in this process (it shares CPU 0) and
// in the helper process (CPU 1): the quotient isolates the coordinator's cost on the compute
// core from any effect of activity on the other core.
//
// Usage: bench_coordinator_overhead [--trials N] [--seconds S] [--rate READY_PER_S]
#include <sched.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "base/log.h"
#include "collectives/control/tcp_control.h"

namespace {

using resync::collectives::TcpControlClient;
using resync::collectives::TcpControlServer;
using resync::collectives::TcpServerOptions;
using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC: the same clock in every process
using Ns = std::chrono::nanoseconds;

constexpr int kWorldSize = 4;
constexpr size_t kElems = 4096;  // 16 KiB: stays in L1
constexpr int kPassesPerCheck = 64;

bool pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof(set), &set) == 0;
}

// One chunk of the compute loop (~30-60 us). Never inlined: every measurement must run the
// very same machine code.
[[gnu::noinline]] void compute_chunk(std::vector<float>& a) {
  const float scale = 0.99999f;
  const float shift = 1e-5f;
  for (int rep = 0; rep < kPassesPerCheck; ++rep) {
    for (float& x : a) x = x * scale + shift;
  }
}

// Multiply-adds per second over `seconds`.
double compute_rate(double seconds, std::vector<float>& a) {
  uint64_t chunks = 0;
  const auto start = Clock::now();
  const auto stop = start + std::chrono::duration<double>(seconds);
  auto now = start;
  do {
    compute_chunk(a);
    ++chunks;
    now = Clock::now();
  } while (now < stop);
  const double elapsed = std::chrono::duration<double>(now - start).count();
  return static_cast<double>(chunks * kPassesPerCheck * kElems) / elapsed;
}

// When the helper's clients talk: continuously for `seconds`, or (slice > 0) only during the
// even-numbered slices of length `slice` starting at `t0`.
struct Traffic {
  double ready_per_s = 500;
  double seconds = 3;
  int64_t t0_ns = 0;  // steady_clock epoch
  int64_t slice_ns = 0;
  int n_slices = 0;
};

std::vector<Clock::time_point> send_times(const Traffic& traffic, Clock::time_point start) {
  const double steps_per_s = traffic.ready_per_s / kWorldSize;
  const auto gap = std::chrono::duration_cast<Ns>(std::chrono::duration<double>(1 / steps_per_s));
  std::vector<Clock::time_point> times;
  if (traffic.slice_ns == 0) {
    const auto n = static_cast<int64_t>(steps_per_s * traffic.seconds);
    for (int64_t j = 0; j < n; ++j) times.push_back(start + j * gap);
    return times;
  }
  const Clock::time_point t0{Ns(traffic.t0_ns)};
  for (int i = 0; i < traffic.n_slices; i += 2) {
    const auto begin = t0 + i * Ns(traffic.slice_ns);
    for (auto t = begin; t < begin + Ns(traffic.slice_ns); t += gap) times.push_back(t);
  }
  return times;
}

TcpServerOptions server_options() {
  TcpServerOptions options;
  options.coordinator.world_size = kWorldSize;
  options.advertise_host = "127.0.0.1";
  return options;
}

// Helper process: kWorldSize control clients following `traffic`; with endpoint "-" it also
// hosts the coordinator. Writes one byte to `ready_fd` once every client is connected.
int run_helper(std::string endpoint, const Traffic& traffic, int ready_fd) {
  resync::log::init(1, "warn");
  std::unique_ptr<TcpControlServer> server;
  if (endpoint == "-") {
    server = std::make_unique<TcpControlServer>(server_options());
    endpoint = server->endpoint();
  }
  std::vector<std::unique_ptr<TcpControlClient>> clients;
  for (int r = 0; r < kWorldSize; ++r) clients.push_back(TcpControlClient::connect(endpoint, r));
  const char go = 'g';
  if (::write(ready_fd, &go, 1) != 1) return 1;
  ::close(ready_fd);

  const auto times = send_times(traffic, Clock::now());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorldSize; ++r) {
    threads.emplace_back([&, r] {
      try {
        for (size_t t = 0; t < times.size(); ++t) {
          // Pacing only: this is load generation for a benchmark, not synchronisation.
          std::this_thread::sleep_until(times[t]);
          clients[static_cast<size_t>(r)]->ready(t);
        }
        clients[static_cast<size_t>(r)]->finish(times.size());
      } catch (const std::exception& e) {
        std::fprintf(stderr, "client rank %d: %s\n", r, e.what());
        failures.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  return failures.load() == 0 ? 0 : 1;
}

// The helper process and, if the coordinator is local, the server it talks to.
class Helper {
 public:
  Helper(bool coordinator_here, bool pin, const Traffic& traffic) {
    if (coordinator_here) server_ = std::make_unique<TcpControlServer>(server_options());
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("pipe failed");
    const std::vector<std::string> args = {"/proc/self/exe",
                                           "--helper",
                                           server_ ? server_->endpoint() : "-",
                                           std::to_string(traffic.ready_per_s),
                                           std::to_string(traffic.seconds),
                                           std::to_string(traffic.t0_ns),
                                           std::to_string(traffic.slice_ns),
                                           std::to_string(traffic.n_slices),
                                           std::to_string(fds[1])};
    std::vector<char*> argv;
    for (const std::string& s : args) argv.push_back(const_cast<char*>(s.c_str()));
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(fds[0]);
      if (pin) pin_to_cpu(1);
      ::execv("/proc/self/exe", argv.data());
      _exit(127);
    }
    ::close(fds[1]);
    char go = 0;
    const bool started = pid_ > 0 && ::read(fds[0], &go, 1) == 1;
    ::close(fds[0]);
    if (!started) throw std::runtime_error("the helper process did not start");
  }
  // Waits for the helper to finish its traffic.
  void join() {
    int status = 0;
    ::waitpid(pid_, &status, 0);
    server_.reset();
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      throw std::runtime_error("the helper process failed");
    }
  }

 private:
  std::unique_ptr<TcpControlServer> server_;
  pid_t pid_ = -1;
};

// CPU seconds of the whole process and of the calling thread: while the main thread computes,
// their difference is what the coordinator thread burnt, a figure the drift cannot touch.
double process_cpu_s() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

double thread_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Settings {
  int n_trials = 3;
  double seconds = 2.0;
  double ready_per_s = 500.0;
  bool pinned = false;
};

struct WithCoordinator {
  double rate = 0;
  double coordinator_cpu = 0;  // share of a core used by this process's other threads
};

WithCoordinator measure_with_coordinator(const Settings& s, std::vector<float>& a) {
  Traffic traffic;
  traffic.ready_per_s = s.ready_per_s;
  traffic.seconds = s.seconds + 1.0;
  Helper helper(/*coordinator_here=*/true, s.pinned, traffic);
  const double process0 = process_cpu_s();
  const double thread0 = thread_cpu_s();
  const auto wall0 = Clock::now();
  WithCoordinator m;
  m.rate = compute_rate(s.seconds, a);
  const double wall = std::chrono::duration<double>(Clock::now() - wall0).count();
  m.coordinator_cpu = ((process_cpu_s() - process0) - (thread_cpu_s() - thread0)) / wall;
  helper.join();
  return m;
}

// Part 2: median over "on" slices of rate(on) / mean(rate of the neighbouring "off" slices).
double sliced_on_off_ratio(bool coordinator_here, const Settings& s, std::vector<float>& a) {
  constexpr int kSlices = 40;
  constexpr auto kSlice = std::chrono::milliseconds(100);
  Traffic traffic;
  traffic.ready_per_s = s.ready_per_s;
  traffic.slice_ns = Ns(kSlice).count();
  traffic.n_slices = kSlices;
  const auto t0 = Clock::now() + std::chrono::milliseconds(300);
  traffic.t0_ns = Ns(t0.time_since_epoch()).count();
  Helper helper(coordinator_here, s.pinned, traffic);

  std::vector<uint64_t> chunks(kSlices, 0);
  while (Clock::now() < t0) compute_chunk(a);
  while (true) {
    const auto slice = (Clock::now() - t0) / kSlice;
    if (slice >= kSlices) break;
    compute_chunk(a);
    ++chunks[static_cast<size_t>(slice)];
  }
  helper.join();
  std::vector<double> ratios;
  for (int i = 2; i + 1 < kSlices; i += 2) {  // even = on; slice 0 skipped (start-up)
    const double off = 0.5 * static_cast<double>(chunks[static_cast<size_t>(i - 1)] +
                                                 chunks[static_cast<size_t>(i + 1)]);
    ratios.push_back(static_cast<double>(chunks[static_cast<size_t>(i)]) / off);
  }
  return median(ratios);
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--helper" && i + 7 < argc) {
      Traffic traffic;
      traffic.ready_per_s = std::atof(argv[i + 2]);
      traffic.seconds = std::atof(argv[i + 3]);
      traffic.t0_ns = std::atoll(argv[i + 4]);
      traffic.slice_ns = std::atoll(argv[i + 5]);
      traffic.n_slices = std::atoi(argv[i + 6]);
      return run_helper(argv[i + 1], traffic, std::atoi(argv[i + 7]));
    } else if (arg == "--trials" && i + 1 < argc) {
      s.n_trials = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--seconds" && i + 1 < argc) {
      s.seconds = std::atof(argv[++i]);
    } else if (arg == "--rate" && i + 1 < argc) {
      s.ready_per_s = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--trials N] [--seconds S] [--rate READY_PER_S]\n", argv[0]);
      return 2;
    }
  }
  resync::log::init(0, "warn");
  s.pinned = std::thread::hardware_concurrency() >= 2 && pin_to_cpu(0);  // threads inherit it
  std::printf(
      "coordinator overhead: compute on %s; %d control clients in a helper process%s; "
      "%.0f READY/s in total\n",
      s.pinned ? "CPU 0" : "an unpinned core", kWorldSize, s.pinned ? " on CPU 1" : "",
      s.ready_per_s);

  std::vector<float> a(kElems, 1.0f);
  compute_rate(0.3, a);  // warm up caches and clocks
  try {
    std::printf("\npart 1: %.1f s alone, %.1f s with the coordinator thread in this process\n",
                s.seconds, s.seconds);
    std::printf("%-7s %14s %20s %8s %18s\n", "trial", "alone GFMA/s", "with coord. GFMA/s", "ratio",
                "coord. thread CPU");
    std::vector<double> ratios, cpu;
    for (int trial = 0; trial < s.n_trials; ++trial) {
      // Odd trials measure "alone" second, so a drift biases neither side.
      double alone = 0;
      if (trial % 2 == 0) alone = compute_rate(s.seconds, a);
      const WithCoordinator with = measure_with_coordinator(s, a);
      if (trial % 2 == 1) alone = compute_rate(s.seconds, a);
      ratios.push_back(with.rate / alone);
      cpu.push_back(with.coordinator_cpu);
      std::printf("%-7d %14.3f %20.3f %8.4f %17.2f%%\n", trial + 1, alone / 1e9, with.rate / 1e9,
                  ratios.back(), 100 * cpu.back());
      std::fflush(stdout);
    }
    std::printf("%-7s %14s %20s %8.4f %17.2f%%\n", "median", "", "", median(ratios),
                100 * median(cpu));

    std::printf("\npart 2: traffic on/off every 100 ms for 4 s; rate(on) / rate(off)\n");
    std::printf("%-7s %22s %22s %10s\n", "trial", "coordinator on CPU 0", "coordinator on CPU 1",
                "quotient");
    std::vector<double> quotients;
    for (int trial = 0; trial < s.n_trials; ++trial) {
      const double local = sliced_on_off_ratio(/*coordinator_here=*/true, s, a);
      const double remote = sliced_on_off_ratio(/*coordinator_here=*/false, s, a);
      quotients.push_back(local / remote);
      std::printf("%-7d %22.4f %22.4f %10.4f\n", trial + 1, local, remote, quotients.back());
      std::fflush(stdout);
    }
    std::printf("%-7s %22s %22s %10.4f\n", "median", "", "", median(quotients));
    std::printf(
        "\ncompute with the coordinator / without: part 1 %.4f, part 2 %.4f "
        "(target >= 0.97); the coordinator thread used %.2f%% of a core\n",
        median(ratios), median(quotients), 100 * median(cpu));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "benchmark failed: %s\n", e.what());
    return 1;
  }
  float checksum = 0;
  for (float x : a) checksum += x;
  std::printf("(checksum %g)\n", static_cast<double>(checksum));
  return 0;
}
