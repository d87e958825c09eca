// This process's place in MPI_COMM_WORLD, for the tests run under mpirun (tests/mpi_test_main.cpp
// initialises MPI).
#pragma once

#include <mpi.h>

namespace resync::mpi_test {

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

}  // namespace resync::mpi_test
