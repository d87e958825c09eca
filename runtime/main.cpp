// `resync`: the command-line program. Subcommands: train (under mpirun/srun), bench, generate,
// info.
// Exit codes: 0 done, 2 bad input (flags, config, data), 1 runtime failure.
#include "runtime/io/cli.h"

int main(int argc, char** argv) { return resync::runtime::run_cli(argc, argv); }
