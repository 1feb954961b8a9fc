// Helpers shared by the CUDA kernels of the fused pyramid pooling module (pooling.cu, reduction.cu,
// upsample.cu).
//
// Each kernel file registers its kernels for the psp_native::<op> schemas (the public psp::<op>'s, declared
// by psp_kernels.dispatch.define) with TORCH_LIBRARY_IMPL(psp_native, CUDA, m); arguments, results, dtypes
// and memory formats are those of the op's reference (psp_kernels/reference.py). Layout conventions are the
// CPU kernels' (csrc/cpu/common.h):
//   - x [N, C, H, W] is read natively when NCHW-contiguous or channels_last (both have
//     stride(h) == W * stride(w), so pixel hw = h*W + w sits at hw * stride(w)); other strides are
//     made contiguous first.
//   - pooled [N, C, S] and branches [N, R, S] pack all bins of one (n, c) into one row of S = sum(b*b)
//     values, bin k at [offset_k, offset_k + b_k^2) in row-major (i, j) order.
//   - bn_input, mean, var and parameter gradients are in the accumulation dtype (at::opmath_type: double for
//     double, float for float/half/bfloat16).
//
// Determinism: no atomics anywhere. Every output element is written by exactly one thread, and every
// reduction runs in an order fixed by the code (sequential loops, fixed warp trees), never by timing.
//
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>

// Host-side bin geometry shared with the CPU backend: packed_bins, axis_segments, layout_of,
// kernel_layout, memory_format, acc_dtype, check_list.
#include "../cpu/common.h"

namespace psp::cuda {

using cpu::PackedBins;

// ----------------------------------------------------------------------------------------------
// Host helpers: argument checks, bins, strides, launches.
// ----------------------------------------------------------------------------------------------

// Per-bin data travels to the kernels by value in small fixed-size structs (no host-to-device copy,
// so every launch is CUDA-graph capturable): at most this many bins.
constexpr int kMaxBins = 8;

// Threads per block of the pooling and upsampling kernels.
constexpr int kThreads = 256;

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// A defined fp16/bf16/fp32/fp64 CUDA tensor of rank `dim` (on `device` when given).
inline void check_cuda(const at::Tensor& t, const char* name, int64_t dim,
                       const std::optional<at::Device>& device = std::nullopt) {
  TORCH_CHECK(t.defined(), "psp_kernels (CUDA): ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "psp_kernels (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "psp_kernels (CUDA): ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "psp_kernels (CUDA): ", name, " must be ", dim, "-D, got ", t.sizes());
  TORCH_CHECK(!device || t.device() == *device, "psp_kernels (CUDA): ", name, " must be on ", *device,
              " like the other inputs, got ", t.device());
}

// A packed tensor [N, X, S] whose last dim matches the bins.
inline void check_cuda_packed(const at::Tensor& t, const char* name, const PackedBins& pb,
                              const std::optional<at::Device>& device = std::nullopt) {
  check_cuda(t, name, 3, device);
  TORCH_CHECK(t.size(2) == pb.total, "psp_kernels (CUDA): ", name, " must have S = sum(b*b) = ", pb.total,
              " packed cells in dim 2, got ", t.sizes());
}

// psp::cpu::packed_bins (non-empty, sizes >= 1) limited to kMaxBins bins.
inline PackedBins cuda_bins(const std::vector<int64_t>& bins) {
  PackedBins pb = cpu::packed_bins(bins);
  TORCH_CHECK(pb.count() <= kMaxBins, "psp_kernels (CUDA): at most ", kMaxBins, " bins are supported, got ",
              pb.count());
  return pb;
}

// Strides of a 4-D tensor with stride(h) == W * stride(w): element (n, c, h, w) sits at
// n * n_ + c * c_ + (h * W + w) * hw.
struct FlatStrides {
  int64_t n;
  int64_t c;
  int64_t hw;
};

// Whether pixel (h, w) of t is addressable as (h*W + w) * stride(w) (size-1 dims may carry any stride).
inline bool has_flat_hw(const at::Tensor& t) {
  return t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

inline FlatStrides flat_strides(const at::Tensor& t) {
  TORCH_CHECK(has_flat_hw(t), "psp_kernels (CUDA): unsupported strides ", t.strides(), " for shape ",
              t.sizes(), " (need stride(h) == W * stride(w))");
  const int64_t hw = t.size(2) == 1 ? t.stride(3) : (t.size(3) == 1 ? t.stride(2) : t.stride(3));
  return {t.stride(0), t.stride(1), hw};
}

// True when the channel dim is the contiguous one (channels_last): kernels then give consecutive
// threads consecutive channels, otherwise consecutive pixels, so that accesses coalesce.
inline bool channels_fastest(const FlatStrides& s) { return s.c == 1 && s.hw != 1; }

__host__ __device__ inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels per block of the kernels that stream a [N, C, H, W] tensor: with channels_last one 32-byte
// sector of channels (consecutive threads read consecutive channels of a pixel); with NCHW about
// kThreads / W planes (consecutive threads read consecutive columns of a row).
inline int64_t tile_lanes(bool lanes_fastest, int64_t channels, int64_t width, int64_t element_size) {
  const int64_t lanes = lanes_fastest ? 32 / element_size : std::clamp<int64_t>(kThreads / width, 1, 32);
  return std::max<int64_t>(1, std::min(lanes, channels));
}

// One-dimensional grid of `blocks` blocks.
inline unsigned int grid_1d(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int>::max(),
              "psp_kernels (CUDA): problem too large for one launch (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

// Allows `kernel` to use `bytes` of dynamic shared memory (opting in above the 48 KiB default), or
// raises when the device cannot provide them.
template <typename Kernel>
void allow_dynamic_smem(Kernel* kernel, size_t bytes, const char* what) {
  constexpr size_t kDefault = 48 * 1024;
  if (bytes <= kDefault) return;
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "psp_kernels (CUDA): ", what, " needs ", bytes,
              " bytes of shared memory per block for these bins and sizes; the device allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// ----------------------------------------------------------------------------------------------
// Device helpers.
// ----------------------------------------------------------------------------------------------

// The block's dynamic shared memory as an array of T.
template <typename T>
__device__ inline T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char psp_dynamic_smem[];
  return reinterpret_cast<T*>(psp_dynamic_smem);
}

// Adaptive average pooling window of output cell i of b along an axis of `size`:
// [floor(i*size/b), ceil((i+1)*size/b)) (nn.AdaptiveAvgPool2d, psp::cpu::adaptive_window).
__host__ __device__ inline int window_start(int i, int b, int size) {
  return static_cast<int>((static_cast<int64_t>(i) * size) / b);
}
__host__ __device__ inline int window_end(int i, int b, int size) {
  return static_cast<int>(((static_cast<int64_t>(i) + 1) * size + b - 1) / b);
}

// Cells of b whose window contains position p: [first, last) (psp::cpu::cells_containing).
__host__ __device__ inline int first_cell_containing(int p, int b, int size) { return window_start(p, size, b); }
__host__ __device__ inline int end_cell_containing(int p, int b, int size) { return window_end(p, size, b); }

// Work item e of a block that owns `lanes` channels x `extent` positions (pixels or columns):
// consecutive items are consecutive channels when the channel dim is contiguous, else consecutive
// positions, so that a warp's accesses coalesce in both layouts.
struct Item {
  int lane;
  int pos;
};

__device__ inline Item split_item(int e, int lanes, int extent, bool lanes_fastest) {
  return lanes_fastest ? Item{e % lanes, e / lanes} : Item{e / extent, e % extent};
}

// 1-D bilinear tap, align_corners=True, as ATen upsample_bilinear2d and psp_kernels/triton/upsample.py
// `_taps`: src = o * scale (scale = (b-1)/(out-1) in the accumulation type, 0 when out == 1),
// i0 = min(int(src), b-1), i1 = i0 < b-1 ? i0+1 : i0, value = (1 - l1) * v[i0] + l1 * v[i1].
template <typename acc_t>
struct Tap {
  int i0;
  int i1;
  acc_t l1;
};

template <typename acc_t>
__device__ inline Tap<acc_t> bilinear_tap(int o, acc_t scale, int b) {
  const acc_t src = static_cast<acc_t>(o) * scale;
  const int i0 = min(static_cast<int>(src), b - 1);
  return {i0, i0 < b - 1 ? i0 + 1 : i0, src - static_cast<acc_t>(i0)};
}

// Sum over the 32 lanes of a warp in a fixed tree order; every lane gets the result. All 32 lanes
// must call it.
template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);
}

}  // namespace psp::cuda
