// Every bin's 1x1 reduction conv + BatchNorm + ReLU on the packed pooled tensor on CUDA
// (psp::reduction_conv_bn_relu) and its gradient. Same math as csrc/cpu/reduction.cpp and
// psp_kernels/reference.py.
//
// Per bin k (bb = b_k^2, M_k = N*bb rows, row m = n*bb + s) the packed tensors are GEMM operands without
// any copy: P_k[m, c] = pooled[n, c, off_k + s] and Z_k[m, r] = bn_input[n, r, off_k + s]. The GEMMs are tiny
// ([M_k, C] x [C, R]); one tiled kernel body (shared-memory tiles, register blocking, FMAs in the
// accumulation type, K ascending: no split-K, no atomics) serves all three, gridded over
// (bin, i tile, j tile):
//   forward  Z_k     = P_k @ W_k^T    (i = m, j = r, K = C)
//   dgrad    dP_k    = dZ_k @ W_k     (i = m, j = c, K = R)
//   wgrad    dW_k^T  = P_k^T @ dZ_k   (i = c, j = r, K = M_k)
// i is always the output's contiguous index, so consecutive threads store consecutive elements.
// BatchNorm statistics (two-pass: mean, then centered variance) and the BN + ReLU backward run one warp
// per (bin, channel) over its M_k values: a fixed per-lane order, then a fixed warp tree.
//
// Launches: the forward in eval 1 (the GEMM's epilogue applies BN + ReLU with the running statistics
// and copies them to mean/var), in training 2 (GEMM -> bn_input; statistics, BN, ReLU); the backward 3
// (BN backward -> dz; dgrad; wgrad). Per-bin weights and BN parameters reach the
// kernels as pointers in by-value structs (no stacking, no host-to-device copy).
#include "common.cuh"
#include "../bn_affine.h"

namespace psp::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Per-bin arguments (by value)
// ---------------------------------------------------------------------------------------------

// Bin sizes and packed offsets, passed to the per-channel kernels by value.
struct BinTable {
  int nb;
  int size[kMaxBins];
  int offset[kMaxBins];
};

BinTable bin_table(const PackedBins& pb) {
  BinTable t{};
  t.nb = static_cast<int>(pb.count());
  for (int k = 0; k < t.nb; ++k) {
    t.size[k] = static_cast<int>(pb.sizes[k]);
    t.offset[k] = static_cast<int>(pb.offsets[k]);
  }
  return t;
}

// Weights W_k [R, C] row-major, all of one dtype w_t.
template <typename w_t>
struct WeightPtrs {
  const w_t* p[kMaxBins];
};

enum class ParamType : uint8_t { kHalf, kBFloat16, kFloat, kDouble };

// A per-bin vector of R BatchNorm values in any kernel dtype.
struct Param {
  const void* data;
  ParamType type;
};

struct BnParams {
  Param bn_weight[kMaxBins];
  Param bn_bias[kMaxBins];
  Param mean[kMaxBins];  // running statistics (eval forward only)
  Param var[kMaxBins];
};

template <typename acc_t>
__device__ inline acc_t load_param(const Param& p, int i) {
  switch (p.type) {
    case ParamType::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p.data)[i]));
    case ParamType::kBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p.data)[i]));
    case ParamType::kFloat:
      return static_cast<acc_t>(static_cast<const float*>(p.data)[i]);
    default:
      return static_cast<acc_t>(static_cast<const double*>(p.data)[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Tiled GEMM: out[i, j] = sum_k A(i, k) B(k, j), one block per kBI x kBJ output tile
// ---------------------------------------------------------------------------------------------

constexpr int kBI = 32;   // tile rows (i)
constexpr int kBJ = 64;   // tile columns (j)
constexpr int kBK = 32;   // K step
constexpr int kTI = 2;    // outputs per thread along i
constexpr int kTJ = 4;    // outputs per thread along j
constexpr int kNI = kBI / kTI;  // threads along i
constexpr int kNJ = kBJ / kTJ;  // threads along j
constexpr int kGemmThreads = kNI * kNJ;
constexpr int kALoads = kBI * kBK / kGemmThreads;
constexpr int kBLoads = kBK * kBJ / kGemmThreads;
static_assert(kALoads * kGemmThreads == kBI * kBK && kBLoads * kGemmThreads == kBK * kBJ, "tile shape");

// Bin k of a packed [N, X, S] tensor as the matrix [M_k, X]: (m, x) at (n*X + x)*S + off + s.
template <typename T>
struct PackedMatrix {
  const T* data;
  int64_t X;
  int S;
  int off;
  int bb;
  static constexpr bool kRowsContiguous = true;  // consecutive m of one image are adjacent
  __device__ T at(int m, int x) const {
    const int n = m / bb;
    return data[(n * X + x) * S + off + (m - n * bb)];
  }
};

// A row-major matrix with leading dimension ld.
template <typename T>
struct RowMajor {
  const T* data;
  int64_t ld;
  static constexpr bool kRowsContiguous = false;
  __device__ T at(int r, int c) const { return data[r * ld + c]; }
};

// Operand (first, second) of a GEMM: M(first, second), or M(second, first) when transposed.
// kFirstContiguous: consecutive first indices are adjacent in memory (decides the tile load order).
template <class M, bool kTransposed>
struct Operand {
  M m;
  static constexpr bool kFirstContiguous = M::kRowsContiguous != kTransposed;
  __device__ auto operator()(int first, int second) const {
    if constexpr (kTransposed) {
      return m.at(second, first);
    } else {
      return m.at(first, second);
    }
  }
};

// acc[x][y] = sum over k ascending of A(i, k) * B(k, j) for the thread's outputs
// i = i0 + ti + x*kNI, j = j0 + tj + y*kNJ (ti = threadIdx.x % kNI, tj = threadIdx.x / kNI); A is I x K,
// B is K x J, out-of-range entries read as 0. The next K step's tiles are fetched into registers while
// the current one is multiplied from shared memory.
template <typename acc_t, class A, class B>
__device__ void gemm_tile(const A& a, const B& b, int i0, int j0, int I, int J, int K, acc_t (&acc)[kTI][kTJ]) {
  __shared__ acc_t As[kBK][kBI + 1];
  __shared__ acc_t Bs[kBK][kBJ + 1];
  const int tid = threadIdx.x, ti = tid % kNI, tj = tid / kNI;
  acc_t ra[kALoads], rb[kBLoads];
  // Tile coordinates of load slot e, ordered so that consecutive threads read adjacent elements.
  auto a_slot = [](int e, int& ii, int& kk) {
    if constexpr (A::kFirstContiguous) {
      ii = e % kBI, kk = e / kBI;
    } else {
      kk = e % kBK, ii = e / kBK;
    }
  };
  auto b_slot = [](int e, int& kk, int& jj) {
    if constexpr (B::kFirstContiguous) {
      kk = e % kBK, jj = e / kBK;
    } else {
      jj = e % kBJ, kk = e / kBJ;
    }
  };
  auto fetch = [&](int k0) {
#pragma unroll
    for (int u = 0; u < kALoads; ++u) {
      int ii, kk;
      a_slot(tid + u * kGemmThreads, ii, kk);
      ra[u] = (i0 + ii < I && k0 + kk < K) ? static_cast<acc_t>(a(i0 + ii, k0 + kk)) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kBLoads; ++u) {
      int kk, jj;
      b_slot(tid + u * kGemmThreads, kk, jj);
      rb[u] = (k0 + kk < K && j0 + jj < J) ? static_cast<acc_t>(b(k0 + kk, j0 + jj)) : acc_t(0);
    }
  };
#pragma unroll
  for (int x = 0; x < kTI; ++x) {
#pragma unroll
    for (int y = 0; y < kTJ; ++y) acc[x][y] = acc_t(0);
  }
  fetch(0);
  for (int k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int u = 0; u < kALoads; ++u) {
      int ii, kk;
      a_slot(tid + u * kGemmThreads, ii, kk);
      As[kk][ii] = ra[u];
    }
#pragma unroll
    for (int u = 0; u < kBLoads; ++u) {
      int kk, jj;
      b_slot(tid + u * kGemmThreads, kk, jj);
      Bs[kk][jj] = rb[u];
    }
    __syncthreads();
    if (k0 + kBK < K) fetch(k0 + kBK);
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t av[kTI], bv[kTJ];
#pragma unroll
      for (int x = 0; x < kTI; ++x) av[x] = As[kk][ti + x * kNI];
#pragma unroll
      for (int y = 0; y < kTJ; ++y) bv[y] = Bs[kk][tj + y * kNJ];
#pragma unroll
      for (int x = 0; x < kTI; ++x) {
#pragma unroll
        for (int y = 0; y < kTJ; ++y) acc[x][y] += av[x] * bv[y];
      }
    }
    __syncthreads();
  }
}

// Grid over (bin, i tile, j tile): bin k owns blocks [first_tile[k], first_tile[k+1]), i tiles fastest.
struct BinGrid {
  int nb;
  int size[kMaxBins];
  int offset[kMaxBins];
  int first_tile[kMaxBins + 1];
  int i_tiles[kMaxBins];
};

// i extent per bin: M_k = N*b*b rows when rows_i, else `extent_i`; j extent `extent_j`.
BinGrid bin_grid(const PackedBins& pb, int64_t N, bool rows_i, int64_t extent_i, int64_t extent_j) {
  BinGrid g{};
  g.nb = static_cast<int>(pb.count());
  int64_t total = 0;
  for (int k = 0; k < g.nb; ++k) {
    const int64_t i_tiles = div_up(rows_i ? N * pb.sizes[k] * pb.sizes[k] : extent_i, kBI);
    g.size[k] = static_cast<int>(pb.sizes[k]);
    g.offset[k] = static_cast<int>(pb.offsets[k]);
    g.i_tiles[k] = static_cast<int>(i_tiles);
    g.first_tile[k] = static_cast<int>(total);
    total += i_tiles * div_up(extent_j, kBJ);
    TORCH_CHECK(total <= std::numeric_limits<int>::max(), "psp_kernels (CUDA): reduction too large");
  }
  g.first_tile[g.nb] = static_cast<int>(total);
  return g;
}

struct Tile {
  int k;
  int i0;
  int j0;
};

__device__ inline Tile tile_of(const BinGrid& g) {
  const int block = blockIdx.x;
  int k = 0;
  while (k + 1 < g.nb && block >= g.first_tile[k + 1]) ++k;
  const int t = block - g.first_tile[k];
  return {k, (t % g.i_tiles[k]) * kBI, (t / g.i_tiles[k]) * kBJ};
}

// Packed index of row m of channel x (of X) of bin (off, bb): (n*X + x)*S + off + s.
__device__ inline int64_t packed_index(int m, int x, int64_t X, int S, int off, int bb) {
  const int n = m / bb;
  return (n * X + x) * S + off + (m - n * bb);
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Forward GEMM. Block = (bin k, tile of 32 rows m, tile of 64 channels r): z = P_k @ W_k^T. In eval the
// epilogue also writes out = relu(BN(z)) with the running statistics, and the blocks of the first row
// tile copy those statistics to mean/var (each (k, r) by one thread).
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kGemmThreads)
    reduction_forward_kernel(const scalar_t* __restrict__ pooled, const __grid_constant__ WeightPtrs<w_t> w,
                           const __grid_constant__ BnParams bn, const __grid_constant__ BinGrid grid, int N, int C,
                           int R, int S, double eps, bool training, at::opmath_type<scalar_t>* __restrict__ z,
                           scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ mean,
                           at::opmath_type<scalar_t>* __restrict__ var) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tile tile = tile_of(grid);
  const int k = tile.k, bb = grid.size[k] * grid.size[k], off = grid.offset[k], M = N * bb;
  acc_t acc[kTI][kTJ];
  gemm_tile<acc_t>(Operand<PackedMatrix<scalar_t>, false>{{pooled, C, S, off, bb}},
                   Operand<RowMajor<w_t>, true>{{w.p[k], C}}, tile.i0, tile.j0, M, R, C, acc);
  const int ti = threadIdx.x % kNI, tj = threadIdx.x / kNI;
#pragma unroll
  for (int y = 0; y < kTJ; ++y) {
    const int r = tile.j0 + tj + y * kNJ;
    if (r >= R) continue;
    BnAffine<acc_t> affine{};
    if (!training) {
      const acc_t mu = load_param<acc_t>(bn.mean[k], r), va = load_param<acc_t>(bn.var[k], r);
      affine = bn_affine(load_param<acc_t>(bn.bn_weight[k], r), load_param<acc_t>(bn.bn_bias[k], r), mu, va, eps);
      if (tile.i0 == 0 && ti == 0) {
        mean[k * R + r] = mu;
        var[k * R + r] = va;
      }
    }
#pragma unroll
    for (int x = 0; x < kTI; ++x) {
      const int m = tile.i0 + ti + x * kNI;
      if (m >= M) continue;
      const int64_t i = packed_index(m, r, R, S, off, bb);
      z[i] = acc[x][y];
      if (!training) out[i] = static_cast<scalar_t>(relu(acc[x][y] * affine.scale + affine.shift));
    }
  }
}

// Channels per block of the per-channel (warp) kernels.
constexpr int kWarps = 8;

// Batch statistics + BN + ReLU (training). Block = (bin k, kWarps channels), one warp per channel r:
// lane l visits rows m = l, l + 32, ... of Z_k[:, r]; mean = sum / M, var = sum (z - mean)^2 / M
// (biased, two passes), then out = relu(BN(z)).
template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32)
    reduction_stats_kernel(const at::opmath_type<scalar_t>* __restrict__ z, const __grid_constant__ BnParams bn,
                         const __grid_constant__ BinTable bins, int N, int R, int S, double eps,
                         scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ mean,
                         at::opmath_type<scalar_t>* __restrict__ var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int rblocks = static_cast<int>(div_up(R, kWarps));
  const int k = blockIdx.x / rblocks, r = (blockIdx.x % rblocks) * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= R) return;  // the whole warp
  const int bb = bins.size[k] * bins.size[k], off = bins.offset[k], M = N * bb;
  acc_t sum = 0;
  for (int m = lane; m < M; m += 32) sum += z[packed_index(m, r, R, S, off, bb)];
  const acc_t mu = warp_sum(sum) / static_cast<acc_t>(M);
  acc_t sq = 0;
  for (int m = lane; m < M; m += 32) {
    const acc_t d = z[packed_index(m, r, R, S, off, bb)] - mu;
    sq += d * d;
  }
  const acc_t va = warp_sum(sq) / static_cast<acc_t>(M);
  const BnAffine<acc_t> affine =
      bn_affine(load_param<acc_t>(bn.bn_weight[k], r), load_param<acc_t>(bn.bn_bias[k], r), mu, va, eps);
  for (int m = lane; m < M; m += 32) {
    const int64_t i = packed_index(m, r, R, S, off, bb);
    out[i] = static_cast<scalar_t>(relu(z[i] * affine.scale + affine.shift));
  }
  if (lane == 0) {
    mean[k * R + r] = mu;
    var[k * R + r] = va;
  }
}

// BN + ReLU backward. Block = (bin k, kWarps channels), one warp per channel r: pass 1 reduces
// dbn_bias = sum g and dbn_weight = sum g * xhat (g = grad_out where BN(z) > 0, else 0), pass 2 writes
// dz = bn_weight*invstd * (g - dbn_bias/M - xhat * dbn_weight/M) in training (through the batch statistics),
// bn_weight*invstd * g in eval.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32)
    reduction_bn_backward_kernel(const scalar_t* __restrict__ grad_out, const at::opmath_type<scalar_t>* __restrict__ z,
                               const at::opmath_type<scalar_t>* __restrict__ mean,
                               const at::opmath_type<scalar_t>* __restrict__ var, const __grid_constant__ BnParams bn,
                               const __grid_constant__ BinTable bins, int N, int R, int S, double eps, bool training,
                               at::opmath_type<scalar_t>* __restrict__ dz,
                               at::opmath_type<scalar_t>* __restrict__ dbn_weight,
                               at::opmath_type<scalar_t>* __restrict__ dbn_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int rblocks = static_cast<int>(div_up(R, kWarps));
  const int k = blockIdx.x / rblocks, r = (blockIdx.x % rblocks) * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= R) return;  // the whole warp
  const int bb = bins.size[k] * bins.size[k], off = bins.offset[k], M = N * bb;
  const acc_t mu = mean[k * R + r], bn_weight = load_param<acc_t>(bn.bn_weight[k], r);
  const BnAffine<acc_t> affine = bn_affine(bn_weight, load_param<acc_t>(bn.bn_bias[k], r), mu, var[k * R + r], eps);
  auto masked_grad = [&](int64_t i) {
    return z[i] * affine.scale + affine.shift > acc_t(0) ? static_cast<acc_t>(grad_out[i]) : acc_t(0);
  };
  acc_t sg = 0, sgx = 0;
  for (int m = lane; m < M; m += 32) {
    const int64_t i = packed_index(m, r, R, S, off, bb);
    const acc_t g = masked_grad(i);
    sg += g;
    sgx += g * ((z[i] - mu) * affine.invstd);
  }
  const acc_t sum_g = warp_sum(sg), sum_gx = warp_sum(sgx);
  if (lane == 0) {
    dbn_bias[k * R + r] = sum_g;
    dbn_weight[k * R + r] = sum_gx;
  }
  const acc_t gi = bn_weight * affine.invstd;
  const acc_t mean_g = sum_g / static_cast<acc_t>(M), mean_gx = sum_gx / static_cast<acc_t>(M);
  for (int m = lane; m < M; m += 32) {
    const int64_t i = packed_index(m, r, R, S, off, bb);
    const acc_t g = masked_grad(i);
    dz[i] = training ? gi * (g - mean_g - (z[i] - mu) * affine.invstd * mean_gx) : g * gi;
  }
}

// dgrad. Block = (bin k, tile of 32 rows m, tile of 64 input channels c): grad_pooled = dZ_k @ W_k.
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kGemmThreads)
    reduction_dgrad_kernel(const at::opmath_type<scalar_t>* __restrict__ dz, const __grid_constant__ WeightPtrs<w_t> w,
                         const __grid_constant__ BinGrid grid, int N, int C, int R, int S,
                         scalar_t* __restrict__ grad_pooled) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tile tile = tile_of(grid);
  const int k = tile.k, bb = grid.size[k] * grid.size[k], off = grid.offset[k], M = N * bb;
  acc_t acc[kTI][kTJ];
  gemm_tile<acc_t>(Operand<PackedMatrix<acc_t>, false>{{dz, R, S, off, bb}}, Operand<RowMajor<w_t>, false>{{w.p[k], C}},
                   tile.i0, tile.j0, M, C, R, acc);
  const int ti = threadIdx.x % kNI, tj = threadIdx.x / kNI;
#pragma unroll
  for (int x = 0; x < kTI; ++x) {
    const int m = tile.i0 + ti + x * kNI;
    if (m >= M) continue;
#pragma unroll
    for (int y = 0; y < kTJ; ++y) {
      const int c = tile.j0 + tj + y * kNJ;
      if (c < C) grad_pooled[packed_index(m, c, C, S, off, bb)] = static_cast<scalar_t>(acc[x][y]);
    }
  }
}

// wgrad. Block = (bin k, tile of 32 input channels c, tile of 64 output channels r):
// grad_W_k[r, c] = sum over m ascending of dZ_k[m, r] P_k[m, c] (all M_k rows in one block).
template <typename scalar_t>
__global__ void __launch_bounds__(kGemmThreads)
    reduction_wgrad_kernel(const at::opmath_type<scalar_t>* __restrict__ dz, const scalar_t* __restrict__ pooled,
                         const __grid_constant__ BinGrid grid, int N, int C, int R, int S,
                         at::opmath_type<scalar_t>* __restrict__ grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tile tile = tile_of(grid);
  const int k = tile.k, bb = grid.size[k] * grid.size[k], off = grid.offset[k], M = N * bb;
  acc_t acc[kTI][kTJ];
  gemm_tile<acc_t>(Operand<PackedMatrix<scalar_t>, true>{{pooled, C, S, off, bb}},
                   Operand<PackedMatrix<acc_t>, false>{{dz, R, S, off, bb}}, tile.i0, tile.j0, C, R, M, acc);
  const int ti = threadIdx.x % kNI, tj = threadIdx.x / kNI;
#pragma unroll
  for (int y = 0; y < kTJ; ++y) {
    const int r = tile.j0 + tj + y * kNJ;
    if (r >= R) continue;
#pragma unroll
    for (int x = 0; x < kTI; ++x) {
      const int c = tile.i0 + ti + x * kNI;
      if (c < C) grad_w[(static_cast<int64_t>(k) * R + r) * C + c] = acc[x][y];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

ParamType param_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return ParamType::kHalf;
    case at::kBFloat16:
      return ParamType::kBFloat16;
    case at::kFloat:
      return ParamType::kFloat;
    default:
      return ParamType::kDouble;
  }
}

// Fills out[k] with bin k's vector of R values (checked: one CUDA tensor per bin on `device`, R elements,
// a kernel dtype). Non-contiguous vectors are made contiguous; `keep` holds the tensors for the launch.
void param_ptrs(const std::vector<at::Tensor>& ts, const char* name, const PackedBins& pb, int64_t R,
                const at::Device& device, Param* out, std::vector<at::Tensor>& keep) {
  cpu::check_list(ts, name, pb);
  for (int64_t k = 0; k < pb.count(); ++k) {
    const at::Tensor& t = ts[k];
    TORCH_CHECK(t.defined() && t.numel() == R, "psp_kernels (CUDA): every ", name, "[k] must have ", R,
                " elements, got ", t.defined() ? t.sizes() : at::IntArrayRef{});
    TORCH_CHECK(t.is_cuda() && t.device() == device && is_kernel_dtype(t.scalar_type()), "psp_kernels (CUDA): ",
                name, "[k] must be a floating CUDA tensor on ", device, ", got ", t.scalar_type(), " on ", t.device());
    keep.push_back(t.contiguous());
    out[k] = {keep.back().const_data_ptr(), param_type(t.scalar_type())};
  }
}

// The conv weights as row-major [R, C] matrices of one dtype: pooled's dtype when every weight has it
// (e.g. pure bf16), else the accumulation dtype (e.g. fp32 master weights with bf16 activations;
// weights in any other dtype are converted once).
struct Weights {
  std::vector<at::Tensor> mats;
  at::ScalarType dtype;
  int64_t R;
};

Weights prepare_weights(const std::vector<at::Tensor>& weights, const PackedBins& pb, const at::Tensor& pooled) {
  cpu::check_list(weights, "conv_weights", pb);
  const int64_t C = pooled.size(1);
  const int64_t R = weights[0].defined() && weights[0].dim() == 4 ? weights[0].size(0) : -1;
  bool all_pooled_dtype = true;
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.defined() && w.dim() == 4 && w.size(0) == R && w.size(1) == C && w.size(2) == 1 && w.size(3) == 1,
                "psp_kernels (CUDA): conv_weights[k] must be [R, C, 1, 1] with C = ", C, " and one R, got ",
                w.defined() ? w.sizes() : at::IntArrayRef{});
    TORCH_CHECK(w.is_cuda() && w.device() == pooled.device() && is_kernel_dtype(w.scalar_type()),
                "psp_kernels (CUDA): conv_weights[k] must be a floating CUDA tensor on ", pooled.device(), ", got ",
                w.scalar_type(), " on ", w.device());
    all_pooled_dtype = all_pooled_dtype && w.scalar_type() == pooled.scalar_type();
  }
  Weights out{{}, all_pooled_dtype ? pooled.scalar_type() : cpu::acc_dtype(pooled.scalar_type()), R};
  for (const at::Tensor& w : weights) out.mats.push_back(w.to(out.dtype).contiguous());
  return out;
}

template <typename w_t>
WeightPtrs<w_t> weight_ptrs(const Weights& weights) {
  WeightPtrs<w_t> p{};
  for (size_t k = 0; k < weights.mats.size(); ++k) p.p[k] = weights.mats[k].const_data_ptr<w_t>();
  return p;
}

// Calls f(w_t{}) with w_t the C++ type of the prepared weights: scalar_t or its accumulation type.
template <typename scalar_t, typename F>
void with_weight_type(const Weights& weights, F&& f) {
  if (weights.dtype == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else {
    f(at::opmath_type<scalar_t>{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduction_conv_bn_relu(
    const at::Tensor& pooled_in, const std::vector<at::Tensor>& conv_weights, const std::vector<at::Tensor>& bn_weights,
    const std::vector<at::Tensor>& bn_biases, const std::vector<at::Tensor>& running_means,
    const std::vector<at::Tensor>& running_vars, const std::vector<int64_t>& bins, bool training, double eps) {
  const at::NoGradGuard no_grad;  // explicit gradients: the ATen ops used here must not record autograd
  const PackedBins pb = cuda_bins(bins);
  check_cuda_packed(pooled_in, "pooled", pb);
  const c10::cuda::CUDAGuard guard(pooled_in.device());
  const at::Tensor pooled = pooled_in.contiguous();
  const int64_t N = pooled.size(0), C = pooled.size(1), S = pb.total, nb = pb.count();
  const Weights wts = prepare_weights(conv_weights, pb, pooled);
  const int64_t R = wts.R;
  std::vector<at::Tensor> keep;
  BnParams bn{};
  param_ptrs(bn_weights, "bn_weights", pb, R, pooled.device(), bn.bn_weight, keep);
  param_ptrs(bn_biases, "bn_biases", pb, R, pooled.device(), bn.bn_bias, keep);
  if (!training) {
    param_ptrs(running_means, "running_means", pb, R, pooled.device(), bn.mean, keep);
    param_ptrs(running_vars, "running_vars", pb, R, pooled.device(), bn.var, keep);
  }
  const auto acc_opts =
      pooled.options().dtype(cpu::acc_dtype(pooled.scalar_type())).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({N, R, S}, pooled.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor z = at::empty({N, R, S}, acc_opts);
  at::Tensor mean = at::empty({nb, R}, acc_opts);
  at::Tensor var = at::empty({nb, R}, acc_opts);
  if (z.numel() == 0) {  // no rows or channels: statistics of nothing (NaN), or the running ones
    if (training) {
      mean.fill_(std::numeric_limits<double>::quiet_NaN());
      var.fill_(std::numeric_limits<double>::quiet_NaN());
    } else if (R > 0) {
      for (int64_t k = 0; k < nb; ++k) {
        mean[k].copy_(running_means[k].reshape({R}));
        var[k].copy_(running_vars[k].reshape({R}));
      }
    }
    return {out, z, mean, var};
  }
  const BinGrid grid = bin_grid(pb, N, true, 0, R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "psp_cuda_reduction_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    with_weight_type<scalar_t>(wts, [&](auto tag) {
      using w_t = decltype(tag);
      reduction_forward_kernel<scalar_t, w_t><<<grid_1d(grid.first_tile[grid.nb]), kGemmThreads, 0, stream>>>(
          pooled.const_data_ptr<scalar_t>(), weight_ptrs<w_t>(wts), bn, grid, static_cast<int>(N),
          static_cast<int>(C), static_cast<int>(R), static_cast<int>(S), eps, training, z.data_ptr<acc_t>(),
          out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (training) {
      reduction_stats_kernel<scalar_t><<<grid_1d(nb * div_up(R, kWarps)), kWarps * 32, 0, stream>>>(
          z.const_data_ptr<acc_t>(), bn, bin_table(pb), static_cast<int>(N), static_cast<int>(R),
          static_cast<int>(S), eps, out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, z, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduction_conv_bn_relu_backward(
    const at::Tensor& grad_out_in, const at::Tensor& pooled_in, const at::Tensor& z_in,
    const std::vector<at::Tensor>& conv_weights, const std::vector<at::Tensor>& bn_weights,
    const std::vector<at::Tensor>& bn_biases, const at::Tensor& mean_in, const at::Tensor& var_in,
    const std::vector<int64_t>& bins, bool training, double eps) {
  const at::NoGradGuard no_grad;  // explicit gradients: the ATen ops used here must not record autograd
  const PackedBins pb = cuda_bins(bins);
  check_cuda_packed(pooled_in, "pooled", pb);
  const at::Device device = pooled_in.device();
  check_cuda_packed(grad_out_in, "grad_out", pb, device);
  check_cuda_packed(z_in, "bn_input", pb, device);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor pooled = pooled_in.contiguous();
  const int64_t N = pooled.size(0), C = pooled.size(1), S = pb.total, nb = pb.count();
  const Weights wts = prepare_weights(conv_weights, pb, pooled);
  const int64_t R = wts.R;
  const at::ScalarType acc = cpu::acc_dtype(pooled.scalar_type());
  TORCH_CHECK(grad_out_in.size(0) == N && grad_out_in.size(1) == R && z_in.size(0) == N && z_in.size(1) == R,
              "psp_kernels (CUDA): grad_out and bn_input must be [N, R, S] = [", N, ", ", R, ", ", S, "], got ",
              grad_out_in.sizes(), " and ", z_in.sizes());
  TORCH_CHECK(z_in.scalar_type() == acc, "psp_kernels (CUDA): bn_input must be in the accumulation dtype ", acc,
              ", got ",
              z_in.scalar_type());
  TORCH_CHECK(grad_out_in.scalar_type() == pooled.scalar_type(), "psp_kernels (CUDA): grad_out must have pooled's ",
              "dtype ", pooled.scalar_type(), ", got ", grad_out_in.scalar_type());
  TORCH_CHECK(mean_in.defined() && var_in.defined() && mean_in.numel() == nb * R && var_in.numel() == nb * R,
              "psp_kernels (CUDA): mean and var must be [", nb, ", ", R, "]");
  check_cuda(mean_in, "mean", mean_in.dim(), device);
  check_cuda(var_in, "var", var_in.dim(), device);
  std::vector<at::Tensor> keep;
  BnParams bn{};
  param_ptrs(bn_weights, "bn_weights", pb, R, device, bn.bn_weight, keep);
  param_ptrs(bn_biases, "bn_biases", pb, R, device, bn.bn_bias, keep);
  const at::Tensor mean = mean_in.to(acc).contiguous(), var = var_in.to(acc).contiguous();
  const at::Tensor go = grad_out_in.contiguous(), z = z_in.contiguous();

  const auto acc_opts = pooled.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dz = at::empty({N, R, S}, acc_opts);
  at::Tensor dbn_weight = at::empty({nb, R}, acc_opts);
  at::Tensor dbn_bias = at::empty({nb, R}, acc_opts);
  at::Tensor gw = at::empty({nb, R, C}, acc_opts);
  at::Tensor grad_pooled = at::empty({N, C, S}, pooled.options().memory_format(at::MemoryFormat::Contiguous));
  if (dz.numel() == 0) {  // no rows or channels: every gradient is an empty sum
    for (at::Tensor* t : {&dbn_weight, &dbn_bias, &gw, &grad_pooled}) t->zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "psp_cuda_reduction_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      reduction_bn_backward_kernel<scalar_t><<<grid_1d(nb * div_up(R, kWarps)), kWarps * 32, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), z.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
          var.const_data_ptr<acc_t>(), bn, bin_table(pb), static_cast<int>(N), static_cast<int>(R),
          static_cast<int>(S), eps, training, dz.data_ptr<acc_t>(), dbn_weight.data_ptr<acc_t>(),
          dbn_bias.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (C > 0) {
        const BinGrid dgrad = bin_grid(pb, N, true, 0, C);
        with_weight_type<scalar_t>(wts, [&](auto tag) {
          using w_t = decltype(tag);
          reduction_dgrad_kernel<scalar_t, w_t><<<grid_1d(dgrad.first_tile[dgrad.nb]), kGemmThreads, 0, stream>>>(
              dz.const_data_ptr<acc_t>(), weight_ptrs<w_t>(wts), dgrad, static_cast<int>(N), static_cast<int>(C),
              static_cast<int>(R), static_cast<int>(S), grad_pooled.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        const BinGrid wgrad = bin_grid(pb, N, false, C, R);
        reduction_wgrad_kernel<scalar_t><<<grid_1d(wgrad.first_tile[wgrad.nb]), kGemmThreads, 0, stream>>>(
            dz.const_data_ptr<acc_t>(), pooled.const_data_ptr<scalar_t>(), wgrad, static_cast<int>(N),
            static_cast<int>(C), static_cast<int>(R), static_cast<int>(S), gw.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return {grad_pooled, gw, dbn_weight, dbn_bias};
}

}  // namespace psp::cuda

TORCH_LIBRARY_IMPL(psp_native, CUDA, m) {
  m.impl("reduction_conv_bn_relu", &psp::cuda::reduction_conv_bn_relu);
  m.impl("reduction_conv_bn_relu_backward", &psp::cuda::reduction_conv_bn_relu_backward);
}
