#include "collectives/transport/mpi_session.h"

#include <fmt/format.h>
#include <mpi.h>

#include <cstdio>
#include <cstring>

#include "base/error.h"

namespace resync {
namespace detail {

[[noreturn]] [[gnu::cold]] void mpi_check_failed(int code, const char* expr, const char* file,
                                                 int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) {
    std::snprintf(text, sizeof(text), "unknown MPI error");
  }
  int error_class = 0;
  if (MPI_Error_class(code, &error_class) != MPI_SUCCESS) error_class = code;
  check_failed(CheckKind::kMpi, expr, file, line,
               fmt::format("MPI error {} (class {}): {}", code, error_class, text));
}

}  // namespace detail

namespace collectives {

namespace {

int to_mpi_level(ThreadLevel level) {
  switch (level) {
    case ThreadLevel::kSingle:
      return MPI_THREAD_SINGLE;
    case ThreadLevel::kFunneled:
      return MPI_THREAD_FUNNELED;
    case ThreadLevel::kSerialized:
      return MPI_THREAD_SERIALIZED;
    case ThreadLevel::kMultiple:
      return MPI_THREAD_MULTIPLE;
  }
  return MPI_THREAD_MULTIPLE;
}

ThreadLevel from_mpi_level(int level) {
  if (level >= MPI_THREAD_MULTIPLE) return ThreadLevel::kMultiple;
  if (level >= MPI_THREAD_SERIALIZED) return ThreadLevel::kSerialized;
  if (level >= MPI_THREAD_FUNNELED) return ThreadLevel::kFunneled;
  return ThreadLevel::kSingle;
}

}  // namespace

const char* thread_level_name(ThreadLevel level) {
  switch (level) {
    case ThreadLevel::kSingle:
      return "MPI_THREAD_SINGLE";
    case ThreadLevel::kFunneled:
      return "MPI_THREAD_FUNNELED";
    case ThreadLevel::kSerialized:
      return "MPI_THREAD_SERIALIZED";
    case ThreadLevel::kMultiple:
      return "MPI_THREAD_MULTIPLE";
  }
  return "?";
}

MpiSession::MpiSession(int* argc, char*** argv, ThreadLevel required) {
  int initialized = 0;
  RESYNC_CHECK_MPI(MPI_Initialized(&initialized));
  int provided = MPI_THREAD_SINGLE;
  if (initialized != 0) {
    RESYNC_CHECK_MPI(MPI_Query_thread(&provided));
  } else {
    // Errors before MPI_Init returns are fatal by the MPI standard; nothing to check here.
    MPI_Init_thread(argc, argv, to_mpi_level(required), &provided);
    owns_ = true;
  }
  provided_ = from_mpi_level(provided);
  RESYNC_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  RESYNC_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &size_));
  set_process_rank(rank_);
  if (provided < to_mpi_level(required)) {
    if (owns_) MPI_Finalize();
    owns_ = false;
    throw CommError(fmt::format(
        "the MPI library provides thread level {} but resync needs {}; use an MPI build with "
        "thread support",
        thread_level_name(provided_), thread_level_name(required)));
  }

  char version[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int len = 0;
  RESYNC_CHECK_MPI(MPI_Get_library_version(version, &len));
  library_version_.assign(version, std::strcspn(version, "\n"));
  char host[MPI_MAX_PROCESSOR_NAME] = {};
  RESYNC_CHECK_MPI(MPI_Get_processor_name(host, &len));
  processor_name_.assign(host, len);

  MPI_Comm node = MPI_COMM_NULL;
  RESYNC_CHECK_MPI(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  RESYNC_CHECK_MPI(MPI_Comm_rank(node, &node_local_rank_));
  RESYNC_CHECK_MPI(MPI_Comm_size(node, &node_local_size_));
  RESYNC_CHECK_MPI(MPI_Comm_free(&node));
}

MpiSession::~MpiSession() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized == 0) MPI_Finalize();
}

}  // namespace collectives
}  // namespace resync
