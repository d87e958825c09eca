// The `resync` command line (train, bench, info) as a library call, so that a program of its own
// can register models (models::register_model) and then behave exactly like `resync`.
#pragma once

namespace resync::runtime {

// Parses argv like the `resync` program and runs the subcommand; returns its exit code: 0 done,
// 2 bad input (flags, config, data), 1 runtime failure. Never throws. Call it from main() and
// return what it returns; it initialises and finalises MPI itself. It may re-execute the
// program once before MPI starts (to pick fast BLAS kernels), so argv must be main()'s own.
int run_cli(int argc, char** argv);

}  // namespace resync::runtime
