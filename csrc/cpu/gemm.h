// Fixed-order GEMM shared by the CPU kernels (reduction.cpp, head.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace psp::cpu {

// ---------------------------------------------------------------------------------------------
// Small fixed-order GEMM: out[i, j] = sum_k A(i, k) * B(k, j) for i < I, j < J, with
// A(i, k) = a[i * si + k * sk], B rows ldb apart and out rows ldo apart. Every out element is
// accumulated from 0 over k ascending (acc += a * b, no reassociation), so its bits depend neither
// on the tiling nor on the thread count. Register tiles: R rows x NV 16-byte SIMD vectors (GCC /
// Clang vector extension); leftover columns (< one vector) use the same arithmetic in scalars. Serial:
// callers parallelise over their own output tiles (reduction.cpp, head.cpp).
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct Simd {
  typedef acc_t type __attribute__((vector_size(16)));
  static constexpr int64_t lanes = 16 / static_cast<int64_t>(sizeof(acc_t));
};

template <typename acc_t, int R, int NV>
inline void gemm_tile(int64_t K, const acc_t* a, int64_t si, int64_t sk, const acc_t* b, int64_t ldb,
                      acc_t* out, int64_t ldo) {
  using V = typename Simd<acc_t>::type;
  constexpr int64_t L = Simd<acc_t>::lanes;
  V acc[R][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + k * ldb + v * L, sizeof(V));
    for (int i = 0; i < R; ++i) {
      const acc_t coef = a[i * si + k * sk];
      for (int v = 0; v < NV; ++v) acc[i][v] += coef * bv[v];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < NV; ++v) std::memcpy(out + i * ldo + v * L, &acc[i][v], sizeof(V));
  }
}

// R rows of out, all J columns.
template <typename acc_t, int R>
inline void gemm_rows(int64_t J, int64_t K, const acc_t* a, int64_t si, int64_t sk, const acc_t* b,
                      int64_t ldb, acc_t* out, int64_t ldo) {
  constexpr int64_t L = Simd<acc_t>::lanes;
  int64_t j = 0;
  for (; j + 2 * L <= J; j += 2 * L) gemm_tile<acc_t, R, 2>(K, a, si, sk, b + j, ldb, out + j, ldo);
  if (j + L <= J) {
    gemm_tile<acc_t, R, 1>(K, a, si, sk, b + j, ldb, out + j, ldo);
    j += L;
  }
  for (; j < J; ++j) {
    for (int i = 0; i < R; ++i) {
      acc_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += a[i * si + k * sk] * b[k * ldb + j];
      out[i * ldo + j] = s;
    }
  }
}

template <typename acc_t>
void gemm_fixed_order(int64_t I, int64_t J, int64_t K, const acc_t* a, int64_t si, int64_t sk, const acc_t* b,
                      int64_t ldb, acc_t* out, int64_t ldo) {
  constexpr int R = 4;
  int64_t i = 0;
  for (; i + R <= I; i += R) gemm_rows<acc_t, R>(J, K, a + i * si, si, sk, b, ldb, out + i * ldo, ldo);
  for (; i < I; ++i) gemm_rows<acc_t, 1>(J, K, a + i * si, si, sk, b, ldb, out + i * ldo, ldo);
}

}  // namespace psp::cpu
