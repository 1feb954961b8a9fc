// Bilinear upsampling (align_corners=True) of every branch on CUDA: upsample_into (writes the branch
// channels of a concat buffer in place), psp::upsample_concat (x's channels copied, then upsample_into),
// and its gradient upsample_concat_backward w.r.t. the packed branches.
//
// Taps exactly as ATen upsample_bilinear2d and psp_kernels/triton/upsample.py: per bin, the scales
// (b-1)/(H-1) and (b-1)/(W-1) are computed on the host in the accumulation type (0 when H or W is 1);
// src = o * scale, i0 = min(int(src), b-1), i1 = i0 < b-1 ? i0+1 : i0, lambda = src - i0, and
//   out = (1-lh) * ((1-lw) * v[i0, j0] + lw * v[i0, j1]) + lh * ((1-lw) * v[i1, j0] + lw * v[i1, j1]).
//
// The backward is the transposed interpolation, separable and in a fixed order (csrc/cpu/upsample.cpp):
// grad rows are spread vertically onto the b source rows (V[i][w] += l * g[h][w], h ascending), then
// every V row is reduced horizontally onto the b cells (w ascending). No atomics: a block owns whole
// cells, and within a block every V column and every cell has one owning thread.
#include "common.cuh"

namespace psp::cuda {
namespace {

// Bins and their bilinear scales, passed by value.
template <typename acc_t>
struct UpsampleBins {
  int nb;
  int size[kMaxBins];
  int offset[kMaxBins];
  acc_t scale_h[kMaxBins];
  acc_t scale_w[kMaxBins];
};

// ATen area_pixel_compute_scale with align_corners=True: (in - 1) / (out - 1), 0 when out == 1.
template <typename acc_t>
acc_t align_corners_scale(int64_t in_size, int64_t out_size) {
  return out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1) : acc_t(0);
}

template <typename acc_t>
UpsampleBins<acc_t> upsample_bins(const PackedBins& pb, int64_t height, int64_t width) {
  TORCH_CHECK(height >= 1 && width >= 1 && height * width <= std::numeric_limits<int>::max(),
              "psp_kernels (CUDA): unsupported spatial size ", height, "x", width);
  UpsampleBins<acc_t> u{};
  u.nb = static_cast<int>(pb.count());
  for (int k = 0; k < u.nb; ++k) {
    u.size[k] = static_cast<int>(pb.sizes[k]);
    u.offset[k] = static_cast<int>(pb.offsets[k]);
    u.scale_h[k] = align_corners_scale<acc_t>(pb.sizes[k], height);
    u.scale_w[k] = align_corners_scale<acc_t>(pb.sizes[k], width);
  }
  return u;
}

int64_t max_bin(const PackedBins& pb) { return *std::max_element(pb.sizes.begin(), pb.sizes.end()); }

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Block tiles of the forward: `lanes` branch channels x `pixels` output pixels. NCHW tiles are long
// along the pixels (contiguous), channels_last tiles along the channels (contiguous).
constexpr int kFwdLanesNchw = 8;
constexpr int kFwdPixelsNchw = 256;
constexpr int kFwdLanesCl = 32;
constexpr int kFwdPixelsCl = 64;

// Both bilinear taps of one output pixel: the four source cells are c00, c00 + dc, c00 + dr and
// c00 + dr + dc; lh, lw the weights of the second row / column.
template <typename acc_t>
struct PixelTap {
  int c00;
  int dr;
  int dc;
  acc_t lh;
  acc_t lw;
};

// Decomposition: one block per (n, bin k, tile of `lanes` of the R branch channels, tile of `pixels`
// pixels). The block stages its channels' b x b source cells and its pixels' taps in shared memory,
// then every output element of the tile is written exactly once (concat channel channels + k*R + r);
// consecutive threads take consecutive elements along the contiguous dim.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    upsample_into_kernel(const scalar_t* __restrict__ branches, scalar_t* __restrict__ out, FlatStrides os,
                         int R, int S, int H, int W, int channels, int lanes, int pixels, bool lanes_fastest,
                         const __grid_constant__ UpsampleBins<at::opmath_type<scalar_t>> bins) {
  using acc_t = at::opmath_type<scalar_t>;
  const int HW = H * W;
  const int ptiles = static_cast<int>(div_up(HW, pixels)), rtiles = static_cast<int>(div_up(R, lanes));
  int t = blockIdx.x;
  const int p0 = (t % ptiles) * pixels;
  t /= ptiles;
  const int r0 = (t % rtiles) * lanes;
  t /= rtiles;
  const int k = t % bins.nb;
  const int64_t n = t / bins.nb;
  const int b = bins.size[k], bb = b * b;
  const int nl = min(lanes, R - r0), np = min(pixels, HW - p0);

  PixelTap<acc_t>* taps = dynamic_smem<PixelTap<acc_t>>();     // [pixels]
  acc_t* slab = reinterpret_cast<acc_t*>(taps + pixels);         // [lanes][bb] (NCHW) or [bb][lanes]
  const int cell_stride = lanes_fastest ? lanes : 1, lane_stride = lanes_fastest ? 1 : bb;
  const scalar_t* src = branches + (n * R + r0) * S + bins.offset[k];
  for (int e = threadIdx.x; e < nl * bb; e += blockDim.x) {
    const int l = e / bb, cell = e % bb;
    slab[l * lane_stride + cell * cell_stride] = static_cast<acc_t>(src[l * S + cell]);
  }
  for (int p = threadIdx.x; p < np; p += blockDim.x) {
    const int h = (p0 + p) / W, w = (p0 + p) % W;
    const Tap<acc_t> th = bilinear_tap(h, bins.scale_h[k], b), tw = bilinear_tap(w, bins.scale_w[k], b);
    taps[p] = {th.i0 * b + tw.i0, (th.i1 - th.i0) * b, tw.i1 - tw.i0, th.l1, tw.l1};
  }
  __syncthreads();

  scalar_t* dst = out + n * os.n + static_cast<int64_t>(channels + k * R + r0) * os.c + p0 * os.hw;
  for (int e = threadIdx.x; e < nl * np; e += blockDim.x) {
    const Item it = split_item(e, nl, np, lanes_fastest);
    const PixelTap<acc_t> tp = taps[it.pos];
    const acc_t* v = slab + it.lane * lane_stride;
    const acc_t v00 = v[tp.c00 * cell_stride], v01 = v[(tp.c00 + tp.dc) * cell_stride];
    const acc_t v10 = v[(tp.c00 + tp.dr) * cell_stride], v11 = v[(tp.c00 + tp.dr + tp.dc) * cell_stride];
    const acc_t lh0 = acc_t(1) - tp.lh, lw0 = acc_t(1) - tp.lw;
    dst[it.lane * os.c + it.pos * os.hw] =
        static_cast<scalar_t>(lh0 * (lw0 * v00 + tp.lw * v01) + tp.lh * (lw0 * v10 + tp.lw * v11));
  }
}

// Writes every branch, upsampled, into concat[:, channels:] (concat checked by the caller).
void upsample_into_pass(const at::Tensor& concat, const at::Tensor& branches_in, const PackedBins& pb,
                        int64_t channels) {
  const at::Tensor branches = branches_in.contiguous();
  const int64_t N = concat.size(0), H = concat.size(2), W = concat.size(3), R = branches.size(1);
  if (N * R * H * W == 0) return;
  const FlatStrides os = flat_strides(concat);
  const bool lanes_fastest = channels_fastest(os);
  const int64_t lanes = std::min<int64_t>(R, lanes_fastest ? kFwdLanesCl : kFwdLanesNchw);
  const int64_t pixels = std::min<int64_t>(H * W, lanes_fastest ? kFwdPixelsCl : kFwdPixelsNchw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, concat.scalar_type(), "psp_cuda_upsample_into", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const UpsampleBins<acc_t> bins = upsample_bins<acc_t>(pb, H, W);
    const int64_t bmax = max_bin(pb);
    const size_t smem = pixels * sizeof(PixelTap<acc_t>) + lanes * bmax * bmax * sizeof(acc_t);
    allow_dynamic_smem(upsample_into_kernel<scalar_t>, smem, "upsample_forward");
    const unsigned int blocks = grid_1d(N * pb.count() * div_up(R, lanes) * div_up(H * W, pixels));
    upsample_into_kernel<scalar_t><<<blocks, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        branches.const_data_ptr<scalar_t>(), concat.data_ptr<scalar_t>(), os, static_cast<int>(R),
        static_cast<int>(pb.total), static_cast<int>(H), static_cast<int>(W), static_cast<int>(channels),
        static_cast<int>(lanes), static_cast<int>(pixels), lanes_fastest, bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Checks branches [N, R, S] against the concat buffer [N, channels + nb*R, H, W]; returns R.
int64_t check_branches(const at::Tensor& branches, const at::Tensor& concat, const PackedBins& pb,
                       int64_t channels) {
  check_cuda_packed(branches, "branches", pb, concat.device());
  TORCH_CHECK(branches.size(0) == concat.size(0), "psp_kernels (CUDA): branches batch ", branches.size(0),
              " does not match the batch ", concat.size(0));
  TORCH_CHECK(branches.scalar_type() == concat.scalar_type(), "psp_kernels (CUDA): branches must have dtype ",
              concat.scalar_type(), ", got ", branches.scalar_type());
  const int64_t R = branches.size(1);
  TORCH_CHECK(channels >= 0 && concat.size(1) == channels + pb.count() * R, "psp_kernels (CUDA): concat has ",
              concat.size(1), " channels, expected channels (", channels, ") + len(bins) (", pb.count(),
              ") * R (", R, ")");
  return R;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// First index in [0, n) whose tap has i0 >= value (i0 is non-decreasing along w), n if none.
template <typename acc_t>
__device__ inline int first_tap_from(const Tap<acc_t>* taps, int n, int value) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (taps[mid].i0 < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Decomposition: one block per (n, bin k, tile of `lanes` branch channels); it owns the b x b cells of
// those channels. The columns are processed in chunks of `wtile`: item (channel, column) spreads its
// column over the b source rows into V (h ascending; only that thread touches that V column), then
// item (channel, cell (i, j)) adds the chunk's columns whose taps touch j (w ascending) to its cell.
// Shared memory: column taps [wtile], cells [lanes][bmax^2], V [lanes][bmax][wtile] in acc_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    upsample_backward_kernel(const scalar_t* __restrict__ grad, int64_t sgn, int64_t sgc, int64_t sgh,
                             int64_t sgw, scalar_t* __restrict__ out, int R, int S, int H, int W, int channels,
                             int lanes, int wtile, int bmax, bool lanes_fastest,
                             const __grid_constant__ UpsampleBins<at::opmath_type<scalar_t>> bins) {
  using acc_t = at::opmath_type<scalar_t>;
  const int rtiles = static_cast<int>(div_up(R, lanes));
  int t = blockIdx.x;
  const int r0 = (t % rtiles) * lanes;
  t /= rtiles;
  const int k = t % bins.nb;
  const int64_t n = t / bins.nb;
  const int b = bins.size[k], bb = b * b, nl = min(lanes, R - r0);

  Tap<acc_t>* tw = dynamic_smem<Tap<acc_t>>();                 // [wtile]
  acc_t* cells = reinterpret_cast<acc_t*>(tw + wtile);          // [lanes][bb]
  acc_t* V = cells + lanes * bmax * bmax;                       // [lanes][b][wtile]
  for (int e = threadIdx.x; e < nl * bb; e += blockDim.x) cells[e] = acc_t(0);

  const scalar_t* g = grad + n * sgn + static_cast<int64_t>(channels + k * R + r0) * sgc;
  for (int w0 = 0; w0 < W; w0 += wtile) {
    const int nw = min(wtile, W - w0);
    __syncthreads();  // the previous chunk's column step is done with V and tw
    for (int wl = threadIdx.x; wl < nw; wl += blockDim.x) tw[wl] = bilinear_tap(w0 + wl, bins.scale_w[k], b);
    for (int e = threadIdx.x; e < nl * nw; e += blockDim.x) {
      const Item it = split_item(e, nl, nw, lanes_fastest);
      acc_t* v = V + it.lane * b * wtile + it.pos;  // v[i * wtile] = V[lane][i][pos]
      for (int i = 0; i < b; ++i) v[i * wtile] = acc_t(0);
      const scalar_t* column = g + it.lane * sgc + (w0 + it.pos) * sgw;
      for (int h = 0; h < H; ++h) {
        const Tap<acc_t> th = bilinear_tap(h, bins.scale_h[k], b);
        const acc_t x = static_cast<acc_t>(column[h * sgh]);
        v[th.i0 * wtile] += (acc_t(1) - th.l1) * x;
        v[th.i1 * wtile] += th.l1 * x;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nl * bb; e += blockDim.x) {
      const int l = e / bb, i = (e % bb) / b, j = (e % bb) % b;
      const acc_t* v = V + (l * b + i) * wtile;
      acc_t acc = cells[e];
      // Columns whose taps touch j: i0 == j (weight 1 - l1, and l1 too when i1 == i0) or i0 == j - 1.
      const int end = first_tap_from(tw, nw, j + 1);
      for (int wl = first_tap_from(tw, nw, j - 1); wl < end; ++wl) {
        const Tap<acc_t> tp = tw[wl];
        if (tp.i0 == j) acc += (acc_t(1) - tp.l1) * v[wl];
        if (tp.i1 == j) acc += tp.l1 * v[wl];
      }
      cells[e] = acc;
    }
  }
  // Each cell is written by the thread that accumulated it.
  scalar_t* o = out + (n * R + r0) * S + bins.offset[k];
  for (int e = threadIdx.x; e < nl * bb; e += blockDim.x) o[(e / bb) * S + e % bb] = static_cast<scalar_t>(cells[e]);
}

// Shared memory budget of the backward before the column chunk shrinks below W.
constexpr int64_t kBwdSmemBudget = 48 * 1024;

}  // namespace

void upsample_into(const at::Tensor& concat, const at::Tensor& branches, const std::vector<int64_t>& bins,
                   int64_t channels) {
  const at::NoGradGuard no_grad;  // explicit gradients: the ATen ops used here must not record autograd
  check_cuda(concat, "concat", 4);
  const c10::cuda::CUDAGuard guard(concat.device());
  const PackedBins pb = cuda_bins(bins);
  check_branches(branches, concat, pb, channels);
  TORCH_CHECK(has_flat_hw(concat), "psp_kernels (CUDA): concat must be NCHW or channels_last (stride(h) == ",
              "W * stride(w)), got strides ", concat.strides(), " for shape ", concat.sizes());
  upsample_into_pass(concat, branches, pb, channels);
}

at::Tensor upsample_concat(const at::Tensor& x_in, const at::Tensor& branches, const std::vector<int64_t>& bins) {
  const at::NoGradGuard no_grad;  // explicit gradients: the ATen ops used here must not record autograd
  check_cuda(x_in, "x", 4);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PackedBins pb = cuda_bins(bins);
  check_cuda_packed(branches, "branches", pb, x_in.device());
  const at::Tensor x = cpu::kernel_layout(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({N, C + pb.count() * branches.size(1), H, W},
                             x.options().memory_format(cpu::memory_format(cpu::layout_of(x))));
  check_branches(branches, out, pb, C);
  if (out.numel() == 0) return out;
  out.narrow(1, 0, C).copy_(x);
  upsample_into_pass(out, branches, pb, C);
  return out;
}

at::Tensor upsample_concat_backward(const at::Tensor& grad_out, const std::vector<int64_t>& bins, int64_t channels) {
  check_cuda(grad_out, "grad_out", 4);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const PackedBins pb = cuda_bins(bins);
  const int64_t N = grad_out.size(0), total = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  TORCH_CHECK(channels >= 0 && channels <= total && (total - channels) % pb.count() == 0,
              "psp_kernels (CUDA): grad_out has ", total, " channels, which is not channels (", channels,
              ") + len(bins) (", pb.count(), ") * R");
  const int64_t R = (total - channels) / pb.count();
  at::Tensor out = at::empty({N, R, pb.total}, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // Pixels are addressed per (h, w) with grad_out's own strides: any layout is read in place.
  const bool lanes_fastest = grad_out.stride(1) < grad_out.stride(3);
  const int64_t lanes = tile_lanes(lanes_fastest, R, W, grad_out.element_size());
  const int64_t bmax = max_bin(pb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "psp_cuda_upsample_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const UpsampleBins<acc_t> u = upsample_bins<acc_t>(pb, H, W);
    const int64_t fixed = lanes * bmax * bmax * static_cast<int64_t>(sizeof(acc_t));
    const int64_t per_column = lanes * bmax * static_cast<int64_t>(sizeof(acc_t)) + sizeof(Tap<acc_t>);
    const int64_t wtile = std::clamp<int64_t>((kBwdSmemBudget - fixed) / per_column, 1, W);
    const size_t smem = fixed + wtile * per_column;
    allow_dynamic_smem(upsample_backward_kernel<scalar_t>, smem, "upsample_backward");
    const unsigned int blocks = grid_1d(N * pb.count() * div_up(R, lanes));
    upsample_backward_kernel<scalar_t><<<blocks, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        grad_out.const_data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        grad_out.stride(3), out.data_ptr<scalar_t>(), static_cast<int>(R), static_cast<int>(pb.total),
        static_cast<int>(H), static_cast<int>(W), static_cast<int>(channels), static_cast<int>(lanes),
        static_cast<int>(wtile), static_cast<int>(bmax), lanes_fastest, u);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace psp::cuda

TORCH_LIBRARY_IMPL(psp_native, CUDA, m) {
  m.impl("upsample_concat", &psp::cuda::upsample_concat);
  m.impl("upsample_concat_backward", &psp::cuda::upsample_concat_backward);
  m.impl("upsample_into", &psp::cuda::upsample_into);
}
