// Helpers shared by the C++ CPU kernels (csrc/cpu/*.cpp): packed bins, adaptive windows, bilinear taps,
// layouts, argument checks and parallel grain sizes.
//
// Each kernel file registers its kernels for the psp_native::<op> schemas (declared in Python by
// psp_kernels.dispatch.define, the same schemas as the public psp::<op>) with
// TORCH_LIBRARY_IMPL(psp_native, CPU, m); arguments, results, dtypes and memory formats are those of the
// op's reference (psp_kernels/reference.py). Layout conventions (psp_kernels/geometry.py):
//   - x [N, C, H, W] is read natively when NCHW-contiguous or channels_last (NHWC); any other
//     strides are made contiguous first (see `kernel_layout`).
//   - pooled [N, C, S] and branches [N, R, S] pack all bins of one (n, c) into one row of
//     S = sum(b*b) values; bin k occupies [offset_k, offset_k + b_k^2) in row-major (i, j) order.
//   - bn_input, mean, var and all parameter gradients are in the accumulation dtype
//     (at::opmath_type: double for double, float for float/half/bfloat16).
//
// Determinism: every kernel partitions its *outputs* over at::parallel_for tasks; each output
// element is produced by exactly one task with a reduction order fixed by the loop nest, so results
// are bitwise identical for any thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace psp::cpu {

// ----------------------------------------------------------------------------------------------
// Packed bin layout.
// ----------------------------------------------------------------------------------------------

// Bin sizes with their offsets inside a packed row; `total` is S = sum(b*b).
struct PackedBins {
  std::vector<int64_t> sizes;
  std::vector<int64_t> offsets;
  int64_t total = 0;
  int64_t sum_sizes = 0;  // sum(b): number of adaptive windows of all bins along one axis
  int64_t count() const { return static_cast<int64_t>(sizes.size()); }
};

// Validates bins (non-empty, every size >= 1) and computes the packed offsets.
inline PackedBins packed_bins(const std::vector<int64_t>& bins) {
  TORCH_CHECK(!bins.empty(), "psp_kernels: bins must not be empty");
  PackedBins p;
  for (int64_t b : bins) {
    TORCH_CHECK(b >= 1, "psp_kernels: bin sizes must be >= 1, got ", b);
    p.sizes.push_back(b);
    p.offsets.push_back(p.total);
    p.total += b * b;
    p.sum_sizes += b;
  }
  return p;
}

// ----------------------------------------------------------------------------------------------
// Adaptive average pooling windows (nn.AdaptiveAvgPool2d / ATen start_index, end_index).
// ----------------------------------------------------------------------------------------------

// Half-open range [start, end).
struct Range {
  int64_t start;
  int64_t end;
  int64_t size() const { return end - start; }
};

// Input window of output cell i of b along an axis of `size`: [floor(i*size/b), ceil((i+1)*size/b)).
// Windows overlap when size % b != 0 and repeat inputs when size < b.
inline Range adaptive_window(int64_t i, int64_t b, int64_t size) {
  return {(i * size) / b, ((i + 1) * size + b - 1) / b};
}

// Cells of b whose window contains input position p: i is in the set iff
// floor(i*size/b) <= p < ceil((i+1)*size/b), i.e. floor(p*b/size) <= i < ceil((p+1)*b/size) -- the
// same formula with the roles of b and size swapped. Always non-empty and contiguous.
inline Range cells_containing(int64_t p, int64_t b, int64_t size) {
  return adaptive_window(p, size, b);
}

// Elementary segments of one axis for a set of bins: the coarsest partition of [0, size) in which
// every adaptive window of every bin is a union of whole segments (boundaries = all window starts
// and ends). Inside one segment each position lies in the same cells of every bin, so pooling sums
// a segment once, and the pooling gradient is constant over it.
//   bounds[s] .. bounds[s+1]   segment s (nseg() of them)
//   win_segs[woff[k] + i]      window of cell i of bin k as a range of segments
//   win_len[woff[k] + i]       its length in positions
//   seg_cells[k * nseg() + s]  cells of bin k whose window contains segment s
struct AxisSegments {
  std::vector<int64_t> bounds;
  std::vector<Range> win_segs;
  std::vector<int64_t> win_len;
  std::vector<Range> seg_cells;
  std::vector<int64_t> woff;
  int64_t nseg() const { return static_cast<int64_t>(bounds.size()) - 1; }
};

inline AxisSegments axis_segments(const PackedBins& pb, int64_t size) {
  TORCH_CHECK(size >= 1, "psp_kernels: spatial size must be >= 1, got ", size);
  AxisSegments t;
  std::vector<Range> windows;
  for (int64_t k = 0; k < pb.count(); ++k) {
    t.woff.push_back(static_cast<int64_t>(windows.size()));
    for (int64_t i = 0; i < pb.sizes[k]; ++i) windows.push_back(adaptive_window(i, pb.sizes[k], size));
  }
  for (const Range& w : windows) {
    t.bounds.push_back(w.start);
    t.bounds.push_back(w.end);
  }
  std::sort(t.bounds.begin(), t.bounds.end());
  t.bounds.erase(std::unique(t.bounds.begin(), t.bounds.end()), t.bounds.end());
  TORCH_CHECK(t.bounds.front() == 0 && t.bounds.back() == size, "psp_kernels: bin windows must cover [0, ",
              size, ")");
  auto seg_index = [&](int64_t pos) {
    return static_cast<int64_t>(std::lower_bound(t.bounds.begin(), t.bounds.end(), pos) - t.bounds.begin());
  };
  for (const Range& w : windows) {
    t.win_segs.push_back({seg_index(w.start), seg_index(w.end)});
    t.win_len.push_back(w.size());
  }
  for (int64_t k = 0; k < pb.count(); ++k) {
    for (int64_t s = 0; s < t.nseg(); ++s) t.seg_cells.push_back(cells_containing(t.bounds[s], pb.sizes[k], size));
  }
  return t;
}

// ----------------------------------------------------------------------------------------------
// Bilinear taps, align_corners=True (ATen upsample_bilinear2d, computed in the accumulation type).
// ----------------------------------------------------------------------------------------------

// value(o) = l0 * v[i0] + l1 * v[i1].
template <typename acc_t>
struct Tap {
  int64_t i0;
  int64_t i1;
  acc_t l0;
  acc_t l1;
};

// Source coordinate o * (in-1)/(out-1) (0 when out == 1), i0 = floor (clamped), i1 = min(i0+1, in-1);
// identity taps when out == in, as ATen.
template <typename acc_t>
std::vector<Tap<acc_t>> bilinear_taps(int64_t out_size, int64_t in_size) {
  TORCH_CHECK(out_size >= 1 && in_size >= 1, "psp_kernels: bilinear sizes must be >= 1, got out=",
              out_size, " in=", in_size);
  std::vector<Tap<acc_t>> taps(out_size);
  const acc_t scale =
      out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1) : acc_t(0);
  for (int64_t o = 0; o < out_size; ++o) {
    if (out_size == in_size) {
      taps[o] = {o, o, acc_t(1), acc_t(0)};
      continue;
    }
    const acc_t src = scale * static_cast<acc_t>(o);
    const int64_t i0 = std::min(static_cast<int64_t>(src), in_size - 1);
    const int64_t i1 = i0 < in_size - 1 ? i0 + 1 : i0;
    const acc_t l1 = std::min(std::max(src - static_cast<acc_t>(i0), acc_t(0)), acc_t(1));
    taps[o] = {i0, i1, acc_t(1) - l1, l1};
  }
  return taps;
}

// ----------------------------------------------------------------------------------------------
// Layout, dtype and parallelism helpers.
// ----------------------------------------------------------------------------------------------

// Accumulation dtype of a tensor dtype (fp64 for fp64, fp32 otherwise).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

enum class Layout { NCHW, NHWC };

// psp_kernels.geometry.is_channels_last: NHWC only if not also NCHW-contiguous.
inline Layout layout_of(const at::Tensor& t) {
  return (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ? Layout::NHWC
                                                                                 : Layout::NCHW;
}

// The tensor as a kernel reads it: itself when NCHW-contiguous or channels_last, else a contiguous copy.
inline at::Tensor kernel_layout(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

inline at::MemoryFormat memory_format(Layout l) {
  return l == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A floating CPU tensor of rank `dim`.
inline void check_input(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), "psp_kernels: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "psp_kernels: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "psp_kernels: ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "psp_kernels: ", name, " must be ", dim, "-D, got ", t.sizes());
}

// A packed tensor [N, C, S] whose last dim matches the bins.
inline void check_packed(const at::Tensor& t, const char* name, const PackedBins& pb) {
  check_input(t, name, 3);
  TORCH_CHECK(t.size(2) == pb.total, "psp_kernels: ", name, " must have S = sum(b*b) = ", pb.total,
              " packed cells in dim 2, got ", t.sizes());
}

// One tensor per bin.
inline void check_list(const std::vector<at::Tensor>& ts, const char* name, const PackedBins& pb) {
  TORCH_CHECK(static_cast<int64_t>(ts.size()) == pb.count(), "psp_kernels: ", name,
              " must hold one tensor per bin (", pb.count(), "), got ", ts.size());
}

// Minimum elements of work per parallel task, so that small problems stay on one thread.
constexpr int64_t kTaskWork = 32768;

// Grain size (in items) for at::parallel_for when each item costs `work_per_item` elements.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_item));
}

// dst[0:n] += src[0:n] (lanes of one cell / pixel; vectorisable, fixed order per lane).
template <typename acc_t>
inline void add_into(acc_t* dst, const acc_t* src, int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] += src[e];
}

// dst[0:n] += a * src[0:n].
template <typename acc_t>
inline void add_scaled(acc_t* dst, acc_t a, const acc_t* src, int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] += a * src[e];
}

// Channel block of the channels_last kernels: one task owns this many contiguous channels.
constexpr int64_t kChannelBlock = 64;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace psp::cpu
