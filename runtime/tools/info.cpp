#include "runtime/tools/info.h"

#include <CLI/Version.hpp>
#include <fmt/format.h>
#include <spdlog/version.h>
#include <zlib.h>

#include "collectives/transport/mpi_session.h"
#include "kernels/gemm.h"
#include "runtime/tools/device_info.h"

#ifndef RESYNC_VERSION
#define RESYNC_VERSION "unknown"
#endif

namespace resync::runtime {

std::string build_info(const collectives::MpiSession& mpi) {
  std::string out;
  out += fmt::format("resync {}\n", RESYNC_VERSION);
  out += fmt::format("MPI:     {} (world size {}, thread level {})\n", mpi.library_version(),
                     mpi.size(), mpi.provided_level_name());
  out += fmt::format("BLAS:    {}\n", kernels::blas_version());
  out += fmt::format("spdlog:  {}.{}.{}\n", SPDLOG_VER_MAJOR, SPDLOG_VER_MINOR, SPDLOG_VER_PATCH);
  out += fmt::format("fmt:     {}.{}.{}\n", FMT_VERSION / 10000, FMT_VERSION / 100 % 100,
                     FMT_VERSION % 100);
  out += fmt::format("CLI11:   {}\n", CLI11_VERSION);
  out += fmt::format("zlib:    {}\n", zlibVersion());
  out += cuda_info() + "\n";
  return out;
}

}  // namespace resync::runtime
