// Fixed-order GEMM shared by the CPU kernels (reduction.cpp, head.cpp).
#pragma once

#include "isa.h"

#include <cstdint>
#include <cstring>

namespace psp::cpu {

// ---------------------------------------------------------------------------------------------
// Small fixed-order GEMM: out[i, j] = sum_k A(i, k) * B(k, j) for i < I, j < J, with
// A(i, k) = a[i * si + k * sk], B rows ldb apart and out rows ldo apart. Every out element is
// accumulated from 0 over k ascending (acc = acc + a * b: a rounded product, then a rounded add; the
// extension is built with -ffp-contract=off, so no FMA), so its bits depend neither on the tiling, nor
// on the thread count, nor on the vector width. Register tiles: R rows x NV SIMD vectors of VB bytes
// (GCC / Clang vector extension); columns left over at one width go to the next narrower one, the last
// (< one 16-byte vector) to scalars with the same arithmetic. Serial: callers parallelise over their own
// output tiles (reduction.cpp, head.cpp).
//
// Runtime CPU dispatch: the same code is compiled three times, for AVX-512 (64-byte vectors), AVX2
// (32-byte) and the x86-64 baseline (16-byte SSE2), as functions with GCC's target attribute; the first
// call picks the widest the CPU has (isa.h: cpu_vector_bytes), as ATen's CPU_CAPABILITY dispatch does.
// ---------------------------------------------------------------------------------------------

template <typename acc_t, int VB>
struct Simd {
  typedef acc_t type __attribute__((vector_size(VB)));
  static constexpr int64_t lanes = VB / static_cast<int64_t>(sizeof(acc_t));
};

#define PSP_GEMM_INLINE inline __attribute__((always_inline))

template <typename acc_t, int VB, int R, int NV>
PSP_GEMM_INLINE void gemm_tile(int64_t K, const acc_t* a, int64_t si, int64_t sk, const acc_t* b, int64_t ldb,
                               acc_t* out, int64_t ldo) {
  using V = typename Simd<acc_t, VB>::type;
  constexpr int64_t L = Simd<acc_t, VB>::lanes;
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

// R rows of out, columns [j, J): vectors of VB bytes (two at a time, then one), the rest narrower.
template <typename acc_t, int VB, int R>
PSP_GEMM_INLINE void gemm_rows(int64_t j, int64_t J, int64_t K, const acc_t* a, int64_t si, int64_t sk,
                               const acc_t* b, int64_t ldb, acc_t* out, int64_t ldo) {
  constexpr int64_t L = Simd<acc_t, VB>::lanes;
  for (; j + 2 * L <= J; j += 2 * L) gemm_tile<acc_t, VB, R, 2>(K, a, si, sk, b + j, ldb, out + j, ldo);
  if (j + L <= J) {
    gemm_tile<acc_t, VB, R, 1>(K, a, si, sk, b + j, ldb, out + j, ldo);
    j += L;
  }
  if constexpr (VB > 16) {
    gemm_rows<acc_t, VB / 2, R>(j, J, K, a, si, sk, b, ldb, out, ldo);
  } else {
    for (; j < J; ++j) {
      for (int i = 0; i < R; ++i) {
        acc_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += a[i * si + k * sk] * b[k * ldb + j];
        out[i * ldo + j] = s;
      }
    }
  }
}

template <typename acc_t, int VB>
PSP_GEMM_INLINE void gemm_all(int64_t I, int64_t J, int64_t K, const acc_t* a, int64_t si, int64_t sk,
                              const acc_t* b, int64_t ldb, acc_t* out, int64_t ldo) {
  constexpr int R = 4;
  int64_t i = 0;
  for (; i + R <= I; i += R) gemm_rows<acc_t, VB, R>(0, J, K, a + i * si, si, sk, b, ldb, out + i * ldo, ldo);
  for (; i < I; ++i) gemm_rows<acc_t, VB, 1>(0, J, K, a + i * si, si, sk, b, ldb, out + i * ldo, ldo);
}

#ifdef PSP_CPU_X86_VARIANTS
template <typename acc_t>
__attribute__((target("avx512f"))) void gemm_avx512(int64_t I, int64_t J, int64_t K, const acc_t* a, int64_t si,
                                                    int64_t sk, const acc_t* b, int64_t ldb, acc_t* out,
                                                    int64_t ldo) {
  gemm_all<acc_t, 64>(I, J, K, a, si, sk, b, ldb, out, ldo);
}

template <typename acc_t>
__attribute__((target("avx2"))) void gemm_avx2(int64_t I, int64_t J, int64_t K, const acc_t* a, int64_t si,
                                               int64_t sk, const acc_t* b, int64_t ldb, acc_t* out, int64_t ldo) {
  gemm_all<acc_t, 32>(I, J, K, a, si, sk, b, ldb, out, ldo);
}

#endif

template <typename acc_t>
void gemm_baseline(int64_t I, int64_t J, int64_t K, const acc_t* a, int64_t si, int64_t sk, const acc_t* b,
                   int64_t ldb, acc_t* out, int64_t ldo) {
  gemm_all<acc_t, 16>(I, J, K, a, si, sk, b, ldb, out, ldo);
}

template <typename acc_t>
void gemm_fixed_order(int64_t I, int64_t J, int64_t K, const acc_t* a, int64_t si, int64_t sk, const acc_t* b,
                      int64_t ldb, acc_t* out, int64_t ldo) {
#ifdef PSP_CPU_X86_VARIANTS
  switch (cpu_vector_bytes()) {
    case 64: return gemm_avx512<acc_t>(I, J, K, a, si, sk, b, ldb, out, ldo);
    case 32: return gemm_avx2<acc_t>(I, J, K, a, si, sk, b, ldb, out, ldo);
  }
#endif
  gemm_baseline<acc_t>(I, J, K, a, si, sk, b, ldb, out, ldo);
}

}  // namespace psp::cpu
