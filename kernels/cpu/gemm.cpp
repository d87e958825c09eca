#include "kernels/gemm.h"

#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <climits>

#include "base/error.h"

namespace resync::kernels {
namespace {

int to_blas_int(size_t v, const char* what) {
  RESYNC_CHECK_ARG(v <= static_cast<size_t>(INT_MAX),
                   fmt::format("gemm: {} = {} exceeds the BLAS int range", what, v));
  return static_cast<int>(v);
}

CBLAS_TRANSPOSE to_cblas(Transpose t) { return t == Transpose::kYes ? CblasTrans : CblasNoTrans; }

// k == 0: the product is empty, C = beta * C (BLAS would reject lda == 0 here).
void scale_c(size_t m, size_t n, float beta, float* c, size_t ldc) {
  for (size_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(row, row + n, 0.0f);
    } else {
      for (size_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

}  // namespace

void gemm(Transpose ta, Transpose tb, size_t m, size_t n, size_t k, float alpha, const float* a,
          size_t lda, const float* b, size_t ldb, float beta, float* c, size_t ldc) {
  // Row length of each matrix as stored, which its leading dimension must cover. Past the early
  // returns below every such length is >= 1, as BLAS requires.
  const size_t a_cols = ta == Transpose::kNo ? k : m;
  const size_t b_cols = tb == Transpose::kNo ? n : k;
  RESYNC_CHECK_ARG(lda >= a_cols,
                   fmt::format("gemm: lda = {} < stored row length {} of A", lda, a_cols));
  RESYNC_CHECK_ARG(ldb >= b_cols,
                   fmt::format("gemm: ldb = {} < stored row length {} of B", ldb, b_cols));
  RESYNC_CHECK_ARG(ldc >= n, fmt::format("gemm: ldc = {} < row length {} of C", ldc, n));
  if (m == 0 || n == 0) return;
  RESYNC_CHECK_ARG(c != nullptr, "gemm: C is null");
  if (k == 0) {
    scale_c(m, n, beta, c, ldc);
    return;
  }
  RESYNC_CHECK_ARG(a != nullptr && b != nullptr, "gemm: A or B is null");
  cblas_sgemm(CblasRowMajor, to_cblas(ta), to_cblas(tb), to_blas_int(m, "m"), to_blas_int(n, "n"),
              to_blas_int(k, "k"), alpha, a, to_blas_int(lda, "lda"), b, to_blas_int(ldb, "ldb"),
              beta, c, to_blas_int(ldc, "ldc"));
}

void set_blas_threads(int n) {
  RESYNC_CHECK_ARG(n >= 1, fmt::format("BLAS threads must be >= 1, got {}", n));
  openblas_set_num_threads(n);
}

int blas_threads() { return openblas_get_num_threads(); }

std::string blas_version() {
  const char* config = openblas_get_config();
  std::string s = config != nullptr ? config : OPENBLAS_VERSION;
  const auto first = s.find_first_not_of(' ');
  const auto last = s.find_last_not_of(' ');
  return first == std::string::npos ? s : s.substr(first, last - first + 1);
}

std::string blas_core() {
  const char* name = openblas_get_corename();
  return name != nullptr ? name : "unknown";
}

std::string blas_recommended_coretype() {
#if defined(__x86_64__) || defined(__i386__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return {};
  std::string core = blas_core();
  std::transform(core.begin(), core.end(), core.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  // OpenBLAS 0.3.x x86-64 kernel sets that use AVX2/FMA or AVX-512.
  for (const char* fast : {"haswell", "skylakex", "cooperlake", "sapphirerapids", "zen"}) {
    if (core == fast) return {};
  }
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return avx512 ? "SkylakeX" : "Haswell";
#else
  return {};
#endif
}

std::string blas_core_advice() {
  const std::string recommended = blas_recommended_coretype();
  if (recommended.empty()) return {};
  return fmt::format(
      "OpenBLAS selected its '{}' kernels although this CPU supports {}; GEMM runs several times "
      "slower. Export OPENBLAS_CORETYPE={} before starting the job.",
      blas_core(), recommended == "SkylakeX" ? "AVX-512" : "AVX2/FMA", recommended);
}

}  // namespace resync::kernels
