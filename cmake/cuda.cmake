# CUDA backend configuration, included from the top-level CMakeLists.txt after its find_package
# calls. Reads RESYNC_CUDA (AUTO|ON|OFF) and sets RESYNC_WITH_CUDA (ON/OFF) for the directories
# below; when ON, the CUDA language is enabled and these targets exist:
#   CUDA::cudart_static, CUDA::cublas  (FindCUDAToolkit)   resync::nccl  (NCCL, found here)
# AUTO turns the backend on when nvcc, cuBLAS and NCCL are all found; ON fails the configure
# naming what is missing; OFF never looks. The core (resync_base, CPU kernels) never needs any of
# it: everything CUDA lives in targets that exist only when RESYNC_WITH_CUDA is ON.

# Hopper and Ampere as native code, Turing (the oldest architecture CUDA 13 targets) too, and
# compute_90 PTX that the driver JIT-compiles on newer GPUs (Blackwell). Ada and sm_86 run the
# sm_80 code. Override with -DCMAKE_CUDA_ARCHITECTURES=... or the CUDAARCHS environment variable.
set(RESYNC_CUDA_DEFAULT_ARCHITECTURES "75-real;80-real;90-real;90-virtual")

string(TOUPPER "${RESYNC_CUDA}" _resync_cuda_mode)
if(NOT _resync_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "RESYNC_CUDA must be AUTO, ON or OFF, got '${RESYNC_CUDA}'")
endif()

set(RESYNC_WITH_CUDA OFF)
set(_resync_cuda_missing "")

if(_resync_cuda_mode STREQUAL "OFF")
  message(STATUS "CUDA backend: off (RESYNC_CUDA=OFF)")
else()
  # 1. The compiler. Host code of .cu files must be compiled by the same C++ compiler as the rest.
  if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER AND NOT DEFINED ENV{CUDAHOSTCXX})
    set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}" CACHE FILEPATH "Host compiler of nvcc")
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    list(APPEND _resync_cuda_missing "the CUDA compiler nvcc (searched on PATH and in CUDACXX)")
  else()
    # 2. The toolkit libraries, from the toolkit that holds this nvcc (not another one on PATH).
    if(NOT DEFINED CUDAToolkit_ROOT AND NOT DEFINED ENV{CUDAToolkit_ROOT})
      get_filename_component(_resync_nvcc_real "${CMAKE_CUDA_COMPILER}" REALPATH)
      get_filename_component(_resync_nvcc_bin "${_resync_nvcc_real}" DIRECTORY)
      get_filename_component(CUDAToolkit_ROOT "${_resync_nvcc_bin}" DIRECTORY)
    endif()
    find_package(CUDAToolkit QUIET)
    if(NOT CUDAToolkit_FOUND)
      list(APPEND _resync_cuda_missing "the CUDA toolkit libraries (FindCUDAToolkit failed)")
    elseif(CUDAToolkit_VERSION VERSION_LESS 12.0)
      # The kernels are C++20, which nvcc supports from CUDA 12 on.
      list(APPEND _resync_cuda_missing "CUDA >= 12 (found ${CUDAToolkit_VERSION})")
    else()
      foreach(_resync_lib IN ITEMS cudart_static cublas)
        if(NOT TARGET CUDA::${_resync_lib})
          list(APPEND _resync_cuda_missing "lib${_resync_lib} (CUDA::${_resync_lib})")
        endif()
      endforeach()
    endif()
  endif()

  # 3. NCCL: beside the toolkit (as on the development machines), under NCCL_HOME, or system-wide.
  #    Not looked for without a toolkit, whose absence is then the one thing reported.
  if(NOT _resync_cuda_missing)
    find_path(RESYNC_NCCL_INCLUDE_DIR nccl.h
              HINTS ${CUDAToolkit_INCLUDE_DIRS} $ENV{NCCL_HOME} $ENV{NCCL_ROOT}
              PATH_SUFFIXES include
              DOC "Directory holding nccl.h")
    find_library(RESYNC_NCCL_LIBRARY nccl
                 HINTS ${CUDAToolkit_LIBRARY_DIR} $ENV{NCCL_HOME} $ENV{NCCL_ROOT}
                 PATH_SUFFIXES lib lib64
                 DOC "The NCCL shared library")
    if(NOT RESYNC_NCCL_INCLUDE_DIR OR NOT RESYNC_NCCL_LIBRARY)
      list(APPEND _resync_cuda_missing
           "NCCL (nccl.h and libnccl, searched beside the toolkit, in NCCL_HOME and system paths)")
    else()
      file(STRINGS "${RESYNC_NCCL_INCLUDE_DIR}/nccl.h" _resync_nccl_defs
           REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) ")
      string(REGEX REPLACE ".*NCCL_MAJOR ([0-9]+).*NCCL_MINOR ([0-9]+).*NCCL_PATCH ([0-9]+).*"
                           "\\1.\\2.\\3" RESYNC_NCCL_VERSION "${_resync_nccl_defs}")
    endif()
  endif()

  if(_resync_cuda_missing)
    list(JOIN _resync_cuda_missing ", " _resync_cuda_missing_text)
    if(_resync_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR "RESYNC_CUDA=ON but the CUDA backend cannot be built: missing "
                          "${_resync_cuda_missing_text}. Install them or configure with "
                          "-DRESYNC_CUDA=AUTO or OFF.")
    endif()
    message(STATUS "CUDA backend: off (RESYNC_CUDA=AUTO, missing ${_resync_cuda_missing_text})")
  else()
    set(RESYNC_WITH_CUDA ON)
  endif()
endif()

# Visible to the directories below, and in the cache for scripts that read CMakeCache.txt.
set(RESYNC_WITH_CUDA ${RESYNC_WITH_CUDA} CACHE INTERNAL "Whether the CUDA backend is built")

if(RESYNC_WITH_CUDA)
  # Must be decided before enable_language(CUDA), which would otherwise pick nvcc's default.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES "${RESYNC_CUDA_DEFAULT_ARCHITECTURES}" CACHE STRING
        "CUDA architectures to build for (CMake syntax: NN-real, NN-virtual, NN)")
  endif()
  enable_language(CUDA)
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    # CMake before 3.26 does not know nvcc's C++20 flag (nvcc 12+ has it), and without a CUDA
    # standard of their own .cu files inherit CXX_STANDARD 20 and fail to generate.
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
    list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_EXTENSIONS OFF)
  # The runtime is linked statically and libcuda is never linked: the driver is loaded at the
  # first CUDA call, so the same binaries start on machines without a driver (calls then report
  # cudaErrorInsufficientDriver) and no stub library is needed at run time.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)

  # Host flags given with add_compile_options (-Wall -Wextra -Wshadow, sanitizers) reach .cu
  # files too: CMake runs nvcc with -forward-unknown-to-host-compiler.

  add_library(resync::nccl UNKNOWN IMPORTED)
  set_target_properties(resync::nccl PROPERTIES
                        IMPORTED_LOCATION "${RESYNC_NCCL_LIBRARY}"
                        INTERFACE_INCLUDE_DIRECTORIES "${RESYNC_NCCL_INCLUDE_DIR}")

  message(STATUS "CUDA backend: on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, toolkit "
                 "${CUDAToolkit_VERSION} at ${CUDAToolkit_LIBRARY_DIR}, NCCL "
                 "${RESYNC_NCCL_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
endif()
