// `resync info`: what this build of resync runs on.
#pragma once

#include <string>

namespace resync::collectives {
class MpiSession;
}

namespace resync::runtime {

// Multi-line report: resync version, MPI library and thread level, BLAS, spdlog, fmt, CLI11,
// zlib, CUDA.
std::string build_info(const collectives::MpiSession& mpi);

}  // namespace resync::runtime
