// The CUDA lines of `resync info`: runtime and driver versions, visible devices, cuBLAS and NCCL
// versions, or why there is no device. Compiles with and without the CUDA backend.
#pragma once

#include <string>

namespace resync::runtime {

// One or more lines, the first starting "CUDA:", without a trailing newline. "CUDA:    not built"
// when resync was configured without CUDA. Never throws and needs no driver: a missing driver or
// device is reported as "no CUDA device available (<reason>)".
std::string cuda_info();

}  // namespace resync::runtime
