// runtime/tools: the other subcommands of `resync`: `bench allreduce`, `bench step` and `info`.
//
// `resync bench ...`: benchmarks users run to judge resync on their machine.
#pragma once

namespace resync::runtime {

// Entry point of `resync bench SUBCOMMAND [flags]`; argv[0] is "bench". Returns the exit code
// (0 ok, 1 a benchmark found a wrong result or failed, 2 bad flags).
int bench_main(int argc, char** argv);

}  // namespace resync::runtime
