// Multi-bin adaptive average pooling on CUDA: psp::multibin_avg_pool / multibin_avg_pool_with_concat (one
// read of x for all bins, optionally copying x into the concat buffer in the same read) and
// multibin_avg_pool_backward / multibin_avg_pool_backward_add (a gather, optionally adding the pass-through
// gradient in the same write).
//
// Same algorithm and per-element summation order as csrc/cpu/pooling.cpp. Both axes are cut into
// elementary segments (psp::cpu::axis_segments): every adaptive window [floor(i*H/b), ceil((i+1)*H/b))
// of every bin is a run of whole segments, so the plane is a grid of blocks (row segment a x column
// segment s), each x element lies in exactly one block, and
//   forward:  block sums are formed once (rows of a segment summed per column, then the columns of
//             each column segment), and every pooled cell is the sum of the blocks of its window
//             (column segments first, then row segments) divided by the window area;
//   backward: grad_x is constant on a block: the value is gathered once per block from the cells
//             containing it (g / area) and written to every element of the block.
// When every bin divides the largest bin L and L divides H and W (bins 1, 2, 3, 6 at 60x60 or 90x90)
// the segments are the L x L fine cells -- the nested fast path: each fine cell is summed once and
// every coarser cell is a sum of fine cells. Otherwise (windows that overlap when H % b != 0, or repeat
// rows when H < b) the same kernels run on the non-uniform segments; there is no slower general path.
//
// Parallel decomposition (both kernels): one block per (n, tile of `lanes` channels); it owns every
// output of those channels. NCHW tiles hold kThreads / W planes and give consecutive threads
// consecutive columns; channels_last tiles hold one 32-byte sector of channels and give consecutive
// threads consecutive channels. Per-element arithmetic is identical in both layouts (bitwise equal
// results) and independent of the launch shape.
#include "common.cuh"

namespace psp::cuda {
namespace {

// Limits of the by-value geometry tables (kernel parameters, no host-to-device copy).
constexpr int kMaxSegments = 64;  // elementary segments per axis (the default bins need <= 17)
constexpr int kMaxWindows = 64;   // sum of the bin sizes

// Elementary segments of one axis: segment a is [bound[a], bound[a+1]); the window of global window
// index e (bin k, cell i: e = woff_k + i) is the segment range [win_lo[e], win_hi[e]).
struct AxisTable {
  int nseg;
  int bound[kMaxSegments + 1];
  int win_lo[kMaxWindows];
  int win_hi[kMaxWindows];
};

struct PoolGeometry {
  int nb;
  int S;  // packed cells
  int H;
  int W;
  int size[kMaxBins];
  int offset[kMaxBins];
  int woff[kMaxBins];  // first global window index of bin k (same along both axes)
  AxisTable rows;
  AxisTable cols;
};

AxisTable axis_table(const cpu::AxisSegments& a, const char* axis) {
  TORCH_CHECK(a.nseg() <= kMaxSegments, "psp_kernels (CUDA): the bins cut the ", axis, " axis into ", a.nseg(),
              " elementary segments; at most ", kMaxSegments, " are supported");
  AxisTable t{};
  t.nseg = static_cast<int>(a.nseg());
  for (int s = 0; s <= t.nseg; ++s) t.bound[s] = static_cast<int>(a.bounds[s]);
  for (size_t e = 0; e < a.win_segs.size(); ++e) {
    t.win_lo[e] = static_cast<int>(a.win_segs[e].start);
    t.win_hi[e] = static_cast<int>(a.win_segs[e].end);
  }
  return t;
}

PoolGeometry pool_geometry(const PackedBins& pb, int64_t height, int64_t width) {
  TORCH_CHECK(pb.sum_sizes <= kMaxWindows, "psp_kernels (CUDA): the bin sizes may sum to at most ", kMaxWindows,
              ", got ", pb.sum_sizes);
  TORCH_CHECK(height <= std::numeric_limits<int>::max() / 2 && width <= std::numeric_limits<int>::max() / 2,
              "psp_kernels (CUDA): spatial size too large: ", height, "x", width);
  PoolGeometry g{};
  g.nb = static_cast<int>(pb.count());
  g.S = static_cast<int>(pb.total);
  g.H = static_cast<int>(height);
  g.W = static_cast<int>(width);
  const cpu::AxisSegments rows = cpu::axis_segments(pb, height);
  const cpu::AxisSegments cols = cpu::axis_segments(pb, width);
  for (int k = 0; k < g.nb; ++k) {
    g.size[k] = static_cast<int>(pb.sizes[k]);
    g.offset[k] = static_cast<int>(pb.offsets[k]);
    g.woff[k] = static_cast<int>(rows.woff[k]);
  }
  g.rows = axis_table(rows, "H");
  g.cols = axis_table(cols, "W");
  return g;
}

// The window of packed cell q as segment ranges, and its area.
struct CellWindow {
  int a_lo, a_hi;  // row segments
  int s_lo, s_hi;  // column segments
  int area;
};

__device__ inline CellWindow cell_window(const PoolGeometry& g, int q) {
  int k = 0;
  while (k + 1 < g.nb && q >= g.offset[k + 1]) ++k;
  const int b = g.size[k], i = (q - g.offset[k]) / b, j = (q - g.offset[k]) % b;
  const int er = g.woff[k] + i, ec = g.woff[k] + j;
  CellWindow c{g.rows.win_lo[er], g.rows.win_hi[er], g.cols.win_lo[ec], g.cols.win_hi[ec], 0};
  c.area = (g.rows.bound[c.a_hi] - g.rows.bound[c.a_lo]) * (g.cols.bound[c.s_hi] - g.cols.bound[c.s_lo]);
  return c;
}

// Pooled cell q from one channel's block sums blocks[a * nsw + s] (psp::cpu blocks_to_cells order:
// per row segment the column-segment sum, then those sums over the row segments).
template <typename acc_t>
__device__ inline acc_t cell_from_blocks(const PoolGeometry& g, const acc_t* blocks, int q) {
  const CellWindow c = cell_window(g, q);
  const int nsw = g.cols.nseg;
  acc_t acc = 0;
  for (int a = c.a_lo; a < c.a_hi; ++a) {
    acc_t t = 0;
    for (int s = c.s_lo; s < c.s_hi; ++s) t += blocks[a * nsw + s];
    acc += t;
  }
  return acc / static_cast<acc_t>(c.area);
}

// Gradient value of block (a, s) from one channel's gs[q] = g[q] / area[q] (psp::cpu cells_to_blocks
// order: per bin and column cell, the sum over the row cells, then those sums over bins and columns).
template <typename acc_t>
__device__ inline acc_t block_from_cells(const PoolGeometry& g, const acc_t* gs, int a, int s) {
  const int ph = g.rows.bound[a], pw = g.cols.bound[s];
  acc_t acc = 0;
  for (int k = 0; k < g.nb; ++k) {
    const int b = g.size[k];
    const int i_lo = first_cell_containing(ph, b, g.H), i_hi = end_cell_containing(ph, b, g.H);
    const int j_lo = first_cell_containing(pw, b, g.W), j_hi = end_cell_containing(pw, b, g.W);
    const acc_t* cells = gs + g.offset[k];
    for (int j = j_lo; j < j_hi; ++j) {
      acc_t t = 0;
      for (int i = i_lo; i < i_hi; ++i) t += cells[i * b + j];
      acc += t;
    }
  }
  return acc;
}

// Segment of position p (bound[a] <= p < bound[a + 1]), by binary search.
__device__ inline int segment_of(const AxisTable& t, int p) {
  int lo = 0, hi = t.nseg;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (t.bound[mid] <= p) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Forward. Block = (n, channels [c0, c0 + nl)). For each row segment a: (1) item (channel, column w)
// sums x over the rows of a into colsum (reading x exactly once over all a, and copying each element
// into concat when asked), (2) item (channel, column segment s) sums colsum over s into blocks[a][s].
// Finally item (channel, packed cell q) forms cell q from the blocks. Shared memory:
// colsum [lanes][W], blocks [lanes][nseg_h * nseg_w] in acc_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pool_forward_kernel(const scalar_t* __restrict__ x, FlatStrides xs, scalar_t* __restrict__ out,
                        scalar_t* __restrict__ concat, FlatStrides cs, int C, int lanes, bool lanes_fastest,
                        const __grid_constant__ PoolGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int tiles = static_cast<int>(div_up(C, lanes));
  const int64_t n = blockIdx.x / tiles;
  const int c0 = static_cast<int>(blockIdx.x % tiles) * lanes;
  const int nl = min(lanes, C - c0);
  const int W = g.W, nsw = g.cols.nseg, nblk = g.rows.nseg * nsw;
  acc_t* colsum = dynamic_smem<acc_t>();  // [lanes][W]
  acc_t* blocks = colsum + lanes * W;     // [lanes][nblk]
  x += n * xs.n + c0 * xs.c;
  if (concat != nullptr) concat += n * cs.n + c0 * cs.c;

  for (int a = 0; a < g.rows.nseg; ++a) {
    const int h0 = g.rows.bound[a], h1 = g.rows.bound[a + 1];
    for (int e = threadIdx.x; e < nl * W; e += blockDim.x) {
      const Item it = split_item(e, nl, W, lanes_fastest);
      // Pointers walked row by row, the concat branch hoisted out of the loop: the indexed form spilled
      // registers in the 16-bit instantiations (ptxas -v, sm_90).
      acc_t t = 0;
      const scalar_t* xp = x + it.lane * xs.c + (static_cast<int64_t>(h0) * W + it.pos) * xs.hw;
      const int64_t x_row = static_cast<int64_t>(W) * xs.hw;
      if (concat != nullptr) {
        scalar_t* cp = concat + it.lane * cs.c + (static_cast<int64_t>(h0) * W + it.pos) * cs.hw;
        const int64_t c_row = static_cast<int64_t>(W) * cs.hw;
        for (int h = h0; h < h1; ++h, xp += x_row, cp += c_row) {
          const scalar_t v = *xp;
          *cp = v;
          t += static_cast<acc_t>(v);
        }
      } else {
        for (int h = h0; h < h1; ++h, xp += x_row) t += static_cast<acc_t>(*xp);
      }
      colsum[it.lane * W + it.pos] = t;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nl * nsw; e += blockDim.x) {
      const int l = e / nsw, s = e % nsw;
      acc_t t = 0;
      for (int w = g.cols.bound[s]; w < g.cols.bound[s + 1]; ++w) t += colsum[l * W + w];
      blocks[l * nblk + a * nsw + s] = t;
    }
    __syncthreads();
  }
  scalar_t* o = out + (n * C + c0) * g.S;  // [nl][S], contiguous
  for (int e = threadIdx.x; e < nl * g.S; e += blockDim.x) {
    const int l = e / g.S, q = e % g.S;
    o[e] = static_cast<scalar_t>(cell_from_blocks(g, blocks + l * nblk, q));
  }
}

// Backward. Block = (n, channels [c0, c0 + nl)): (1) item (channel, cell q) loads gs = g / area,
// (2) item (channel, block) gathers the block's value, (3) item (channel, column w) writes column w of
// grad_x row by row (plus the residual when given), each element exactly once. Shared memory:
// gs [lanes][S], vals [lanes][nseg_h * nseg_w] in acc_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pool_backward_kernel(const scalar_t* __restrict__ gp, scalar_t* __restrict__ gx, FlatStrides xs,
                         const scalar_t* __restrict__ residual, FlatStrides rs, int C, int lanes,
                         bool lanes_fastest, const __grid_constant__ PoolGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int tiles = static_cast<int>(div_up(C, lanes));
  const int64_t n = blockIdx.x / tiles;
  const int c0 = static_cast<int>(blockIdx.x % tiles) * lanes;
  const int nl = min(lanes, C - c0);
  const int W = g.W, nsw = g.cols.nseg, nblk = g.rows.nseg * nsw;
  acc_t* gs = dynamic_smem<acc_t>();  // [lanes][S]
  acc_t* vals = gs + lanes * g.S;     // [lanes][nblk]

  const scalar_t* src = gp + (n * C + c0) * g.S;  // [nl][S], contiguous
  for (int e = threadIdx.x; e < nl * g.S; e += blockDim.x) {
    gs[e] = static_cast<acc_t>(src[e]) / static_cast<acc_t>(cell_window(g, e % g.S).area);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nl * nblk; e += blockDim.x) {
    const int l = e / nblk, blk = e % nblk;
    vals[e] = block_from_cells(g, gs + l * g.S, blk / nsw, blk % nsw);
  }
  __syncthreads();
  gx += n * xs.n + c0 * xs.c;
  if (residual != nullptr) residual += n * rs.n + c0 * rs.c;
  for (int e = threadIdx.x; e < nl * W; e += blockDim.x) {
    const Item it = split_item(e, nl, W, lanes_fastest);
    const acc_t* v = vals + it.lane * nblk + segment_of(g.cols, it.pos);
    int a = 0;
    for (int h = 0; h < g.H; ++h) {
      if (h == g.rows.bound[a + 1]) ++a;
      const int64_t pixel = static_cast<int64_t>(h) * W + it.pos;
      acc_t value = v[a * nsw];
      if (residual != nullptr) value += static_cast<acc_t>(residual[it.lane * rs.c + pixel * rs.hw]);
      gx[it.lane * xs.c + pixel * xs.hw] = static_cast<scalar_t>(value);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

// Launch shape of the pooling kernels for the streamed tensor (x forward, grad_x backward).
struct PoolLaunch {
  int lanes;  // channels per block
  bool lanes_fastest;
  unsigned int blocks;
  size_t smem;
};

// `per_lane` is the number of acc_t entries of shared memory per channel of a tile.
PoolLaunch pool_launch(const FlatStrides& streamed, int64_t N, int64_t C, int64_t W, int64_t element_size,
                       int64_t per_lane, int64_t acc_size) {
  const bool lanes_fastest = channels_fastest(streamed);
  const int64_t lanes = tile_lanes(lanes_fastest, C, W, element_size);
  return {static_cast<int>(lanes), lanes_fastest, grid_1d(N * div_up(C, lanes)),
          static_cast<size_t>(lanes * per_lane * acc_size)};
}

// x (NCHW or channels_last) -> out [N, C, S]; copies x into concat's first C channels when given.
void pooling_pass(const at::Tensor& x, const PackedBins& pb, const at::Tensor& out, const at::Tensor* concat) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const PoolGeometry g = pool_geometry(pb, H, W);
  const FlatStrides xs = flat_strides(x);
  const FlatStrides cs = concat != nullptr ? flat_strides(*concat) : FlatStrides{0, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psp_cuda_pool_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PoolLaunch l = pool_launch(xs, N, C, W, sizeof(scalar_t), W + g.rows.nseg * g.cols.nseg, sizeof(acc_t));
    allow_dynamic_smem(pool_forward_kernel<scalar_t>, l.smem, "pool_forward");
    pool_forward_kernel<scalar_t><<<l.blocks, kThreads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), xs, out.data_ptr<scalar_t>(),
        concat != nullptr ? concat->data_ptr<scalar_t>() : nullptr, cs, static_cast<int>(C), l.lanes,
        l.lanes_fastest, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_pooled [N, C, S] -> grad_x [N, C, H, W] in the requested layout, plus residual when given.
at::Tensor pool_backward_pass(const at::Tensor& grad_pooled_in, const PackedBins& pb, int64_t height,
                              int64_t width, bool channels_last, const at::Tensor* residual) {
  const at::NoGradGuard no_grad;  // explicit gradients: the ATen ops used here must not record autograd
  const PoolGeometry g = pool_geometry(pb, height, width);
  const at::Tensor gp = grad_pooled_in.contiguous();
  const int64_t N = gp.size(0), C = gp.size(1);
  at::Tensor gx = at::empty({N, C, height, width},
                            gp.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  if (gx.numel() == 0) return gx;
  // A residual view whose pixels are not addressable by one stride is copied once.
  const at::Tensor res = residual == nullptr ? at::Tensor()
                                             : (has_flat_hw(*residual) ? *residual : residual->contiguous());
  const FlatStrides xs = flat_strides(gx);
  const FlatStrides rs = res.defined() ? flat_strides(res) : FlatStrides{0, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gp.scalar_type(), "psp_cuda_pool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PoolLaunch l = pool_launch(xs, N, C, width, sizeof(scalar_t), g.S + g.rows.nseg * g.cols.nseg,
                                     sizeof(acc_t));
    allow_dynamic_smem(pool_backward_kernel<scalar_t>, l.smem, "pool_backward");
    pool_backward_kernel<scalar_t><<<l.blocks, kThreads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
        gp.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), xs,
        res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, rs, static_cast<int>(C), l.lanes,
        l.lanes_fastest, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

at::Tensor multibin_avg_pool(const at::Tensor& x_in, const std::vector<int64_t>& bins) {
  const at::NoGradGuard no_grad;  // explicit gradients: the ATen ops used here must not record autograd
  check_cuda(x_in, "x", 4);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PackedBins pb = cuda_bins(bins);
  const at::Tensor x = cpu::kernel_layout(x_in);
  at::Tensor out = at::empty({x.size(0), x.size(1), pb.total}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  pooling_pass(x, pb, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> multibin_avg_pool_with_concat(const at::Tensor& x_in,
                                                                 const std::vector<int64_t>& bins,
                                                                 int64_t total_channels) {
  const at::NoGradGuard no_grad;  // explicit gradients: the ATen ops used here must not record autograd
  check_cuda(x_in, "x", 4);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PackedBins pb = cuda_bins(bins);
  const at::Tensor x = cpu::kernel_layout(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(total_channels >= C, "psp_kernels (CUDA): total_channels (", total_channels,
              ") must be at least x's channels (", C, ")");
  at::Tensor out = at::empty({N, C, pb.total}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor concat = at::empty({N, total_channels, H, W},
                                x.options().memory_format(cpu::memory_format(cpu::layout_of(x))));
  if (out.numel() == 0) return {out, concat};
  pooling_pass(x, pb, out, &concat);
  return {out, concat};
}

at::Tensor multibin_avg_pool_backward(const at::Tensor& grad_pooled, const std::vector<int64_t>& bins, int64_t height,
                                      int64_t width, bool channels_last) {
  const PackedBins pb = cuda_bins(bins);
  check_cuda_packed(grad_pooled, "grad_pooled", pb);
  const c10::cuda::CUDAGuard guard(grad_pooled.device());
  return pool_backward_pass(grad_pooled, pb, height, width, channels_last, nullptr);
}

at::Tensor multibin_avg_pool_backward_add(const at::Tensor& grad_pooled, const std::vector<int64_t>& bins,
                                          const at::Tensor& residual, bool channels_last) {
  const PackedBins pb = cuda_bins(bins);
  check_cuda_packed(grad_pooled, "grad_pooled", pb);
  check_cuda(residual, "residual", 4, grad_pooled.device());
  TORCH_CHECK(residual.size(0) == grad_pooled.size(0) && residual.size(1) == grad_pooled.size(1),
              "psp_kernels (CUDA): residual [N, C, H, W] must match grad_pooled's N and C, got ", residual.sizes(),
              " and ", grad_pooled.sizes());
  TORCH_CHECK(residual.scalar_type() == grad_pooled.scalar_type(), "psp_kernels (CUDA): residual must have ",
              "grad_pooled's dtype ", grad_pooled.scalar_type(), ", got ", residual.scalar_type());
  const c10::cuda::CUDAGuard guard(grad_pooled.device());
  return pool_backward_pass(grad_pooled, pb, residual.size(2), residual.size(3), channels_last, &residual);
}

}  // namespace psp::cuda

TORCH_LIBRARY_IMPL(psp_native, CUDA, m) {
  m.impl("multibin_avg_pool", &psp::cuda::multibin_avg_pool);
  m.impl("multibin_avg_pool_backward", &psp::cuda::multibin_avg_pool_backward);
  m.impl("multibin_avg_pool_with_concat", &psp::cuda::multibin_avg_pool_with_concat);
  m.impl("multibin_avg_pool_backward_add", &psp::cuda::multibin_avg_pool_backward_add);
}
