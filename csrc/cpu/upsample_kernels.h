// The upsample kernels' code, compiled once per instruction set: upsample.cpp includes it through
// isa_variants.h inside psp::cpu::{avx512, avx2, base} (see isa.h); no include guard by design.
// Names of psp::cpu (common.h) are visible from the enclosing namespace.

namespace {

// Bilinear taps of every bin along H and W (from b cells to H rows / W columns).
template <typename acc_t>
struct UpsampleGeometry {
  PackedBins pb;
  std::vector<std::vector<Tap<acc_t>>> th;  // th[k][h]
  std::vector<std::vector<Tap<acc_t>>> tw;  // tw[k][w]
};

template <typename acc_t>
UpsampleGeometry<acc_t> upsample_geometry(const std::vector<int64_t>& bins, int64_t H, int64_t W) {
  UpsampleGeometry<acc_t> g{packed_bins(bins), {}, {}};
  for (int64_t b : g.pb.sizes) {
    g.th.push_back(bilinear_taps<acc_t>(H, b));
    g.tw.push_back(bilinear_taps<acc_t>(W, b));
  }
  return g;
}

// One interpolated value from the 2x2 source taps of a b x b grid whose cells are `lanes` apart
// (R for the [S, R] transposed branches of the channels_last path).
template <typename acc_t>
inline acc_t interpolate(const acc_t* src, int64_t b, int64_t lanes, const Tap<acc_t>& th,
                         const Tap<acc_t>& tw) {
  const acc_t* r0 = src + th.i0 * b * lanes;
  const acc_t* r1 = src + th.i1 * b * lanes;
  return th.l0 * (tw.l0 * r0[tw.i0 * lanes] + tw.l1 * r0[tw.i1 * lanes]) +
         th.l1 * (tw.l0 * r1[tw.i0 * lanes] + tw.l1 * r1[tw.i1 * lanes]);
}

// ---------------------------------------------------------------------------------------------
// upsample_forward
// ---------------------------------------------------------------------------------------------

// NCHW. br: branches [N, R, S] in acc_t. Item = output plane (n, ch) of H*W values; x == nullptr
// (upsample_into): x's planes are already in out and are skipped.
template <typename scalar_t, typename acc_t>
void upsample_forward_nchw(const scalar_t* x, const acc_t* br, scalar_t* out, int64_t N, int64_t C,
                           int64_t R, int64_t H, int64_t W, const UpsampleGeometry<acc_t>& g) {
  const int64_t total = C + g.pb.count() * R, HW = H * W, S = g.pb.total;
  at::parallel_for(0, N * total, grain_for(HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> U;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / total, ch = item % total;
      scalar_t* o = out + item * HW;
      if (ch < C) {
        if (x) std::memcpy(o, x + (n * C + ch) * HW, HW * sizeof(scalar_t));
        continue;
      }
      const int64_t k = (ch - C) / R, r = (ch - C) % R, b = g.pb.sizes[k];
      const acc_t* src = br + (n * R + r) * S + g.pb.offsets[k];
      U.resize(b * W);
      for (int64_t i = 0; i < b; ++i) {  // U[i][w] = lw0 * v[i, j0] + lw1 * v[i, j1]
        for (int64_t w = 0; w < W; ++w) {
          const Tap<acc_t>& tw = g.tw[k][w];
          U[i * W + w] = tw.l0 * src[i * b + tw.i0] + tw.l1 * src[i * b + tw.i1];
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const Tap<acc_t>& th = g.th[k][h];
        const acc_t* u0 = U.data() + th.i0 * W;
        const acc_t* u1 = U.data() + th.i1 * W;
        for (int64_t w = 0; w < W; ++w) o[h * W + w] = static_cast<scalar_t>(th.l0 * u0[w] + th.l1 * u1[w]);
      }
    }
  });
}

// channels_last. bt: branches transposed to [N, S, R] in acc_t, so that the R values of one cell
// are contiguous. Item = output row (n, h) of W pixels x (C + nb*R) channels; x == nullptr: as NCHW.
template <typename scalar_t, typename acc_t>
void upsample_forward_nhwc(const scalar_t* x, const acc_t* bt, scalar_t* out, int64_t N, int64_t C,
                           int64_t R, int64_t H, int64_t W, const UpsampleGeometry<acc_t>& g) {
  const int64_t total = C + g.pb.count() * R, S = g.pb.total;
  at::parallel_for(0, N * H, grain_for(W * total), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / H, h = item % H;
      for (int64_t w = 0; w < W; ++w) {
        scalar_t* px = out + (item * W + w) * total;
        if (x) std::memcpy(px, x + (item * W + w) * C, C * sizeof(scalar_t));
        for (int64_t k = 0; k < g.pb.count(); ++k) {
          const acc_t* src = bt + (n * S + g.pb.offsets[k]) * R;
          const Tap<acc_t>& th = g.th[k][h];
          const Tap<acc_t>& tw = g.tw[k][w];
          scalar_t* dst = px + C + k * R;
          for (int64_t r = 0; r < R; ++r) {
            dst[r] = static_cast<scalar_t>(interpolate(src + r, g.pb.sizes[k], R, th, tw));
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// upsample_backward
// ---------------------------------------------------------------------------------------------

// Vertical step for one grad row: V[i0][w] += lh0 * g[w], V[i1][w] += lh1 * g[w], over the first
// n_lanes of the `lanes` values per w of V; grad pixels are `stride` elements apart in grow.
template <typename scalar_t, typename acc_t>
inline void spread_rows(const Tap<acc_t>& th, const scalar_t* grow, int64_t W, int64_t lanes,
                        int64_t stride, int64_t n_lanes, acc_t* V) {
  acc_t* v0 = V + th.i0 * W * lanes;
  acc_t* v1 = V + th.i1 * W * lanes;
  for (int64_t w = 0; w < W; ++w) {
    const scalar_t* px = grow + w * stride;
    for (int64_t c = 0; c < n_lanes; ++c) {
      const acc_t v = static_cast<acc_t>(px[c]);
      v0[w * lanes + c] += th.l0 * v;
      v1[w * lanes + c] += th.l1 * v;
    }
  }
}

// Horizontal step: cells[i][j] = sum_w (w ascending) of lw * V[i][w] over the taps of w.
template <typename acc_t>
void reduce_columns(const std::vector<Tap<acc_t>>& tw, const acc_t* V, int64_t b, int64_t W,
                    int64_t lanes, acc_t* cells) {
  std::fill(cells, cells + b * b * lanes, acc_t(0));
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t w = 0; w < W; ++w) {
      const acc_t* v = V + (i * W + w) * lanes;
      add_scaled(cells + (i * b + tw[w].i0) * lanes, tw[w].l0, v, lanes);
      add_scaled(cells + (i * b + tw[w].i1) * lanes, tw[w].l1, v, lanes);
    }
  }
}

// NCHW grad_out. Item = (n, k, r): reads the grad plane of branch channel C + k*R + r and owns the
// b*b outputs of bin k of row (n, r).
template <typename scalar_t>
void upsample_backward_nchw(const scalar_t* go, scalar_t* gb, int64_t N, int64_t C, int64_t R,
                            int64_t H, int64_t W,
                            const UpsampleGeometry<at::opmath_type<scalar_t>>& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = g.pb.count(), total = C + nb * R, S = g.pb.total;
  at::parallel_for(0, N * nb * R, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> V, cells;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (nb * R), k = (item / R) % nb, r = item % R, b = g.pb.sizes[k];
      const scalar_t* plane = go + (n * total + C + k * R + r) * H * W;
      V.assign(b * W, acc_t(0));
      cells.resize(b * b);
      for (int64_t h = 0; h < H; ++h) spread_rows(g.th[k][h], plane + h * W, W, 1, 1, 1, V.data());
      reduce_columns(g.tw[k], V.data(), b, W, 1, cells.data());
      scalar_t* o = gb + (n * R + r) * S + g.pb.offsets[k];
      for (int64_t e = 0; e < b * b; ++e) o[e] = static_cast<scalar_t>(cells[e]);
    }
  });
}

// channels_last grad_out. Item = (n, k, block of kChannelBlock branch channels r): every pixel
// contributes a contiguous vector of lanes; same per-lane order as the NCHW path.
template <typename scalar_t>
void upsample_backward_nhwc(const scalar_t* go, scalar_t* gb, int64_t N, int64_t C, int64_t R,
                            int64_t H, int64_t W,
                            const UpsampleGeometry<at::opmath_type<scalar_t>>& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = g.pb.count(), total = C + nb * R, S = g.pb.total, CB = kChannelBlock;
  const int64_t blocks = div_up(R, CB);
  at::parallel_for(0, N * nb * blocks, grain_for(H * W * CB), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> V, cells;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (nb * blocks), k = (item / blocks) % nb, b = g.pb.sizes[k];
      const int64_t r0 = (item % blocks) * CB, rb = std::min(CB, R - r0);
      V.assign(b * W * CB, acc_t(0));
      cells.resize(b * b * CB);
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* grow = go + (n * H + h) * W * total + C + k * R + r0;
        spread_rows(g.th[k][h], grow, W, CB, total, rb, V.data());
      }
      reduce_columns(g.tw[k], V.data(), b, W, CB, cells.data());
      for (int64_t c = 0; c < rb; ++c) {
        scalar_t* o = gb + (n * R + r0 + c) * S + g.pb.offsets[k];
        for (int64_t e = 0; e < b * b; ++e) o[e] = static_cast<scalar_t>(cells[e * CB + c]);
      }
    }
  });
}

// Writes every branch, upsampled, into out[:, C:], and x into out[:, :C] unless x is undefined.
void upsample_write(const at::Tensor& x, const at::Tensor& branches, const std::vector<int64_t>& bins,
                    const at::Tensor& out, int64_t C) {
  at::NoGradGuard no_grad;  // branches.to() below must not record autograd
  const PackedBins pb = packed_bins(bins);
  check_packed(branches, "branches", pb);
  const int64_t N = out.size(0), H = out.size(2), W = out.size(3), R = branches.size(1);
  TORCH_CHECK(branches.size(0) == N, "psp_kernels: branches batch ", branches.size(0), " does not match x batch ", N);
  TORCH_CHECK(out.size(1) == C + pb.count() * R, "psp_kernels: the concat has ", out.size(1),
              " channels, expected C + len(bins) * R = ", C + pb.count() * R);
  if (out.numel() == 0) return;
  // The branches are tiny ([N, R, S]): convert them to the accumulation type once (and for
  // channels_last transpose to [N, S, R]) so the kernels read acc_t cells directly.
  const at::Tensor bacc = branches.to(acc_dtype(out.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "psp_upsample_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = upsample_geometry<acc_t>(bins, H, W);
    const scalar_t* xp = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    if (layout_of(out) == Layout::NHWC) {
      const at::Tensor bt = bacc.permute({0, 2, 1}).contiguous();
      upsample_forward_nhwc<scalar_t, acc_t>(xp, bt.const_data_ptr<acc_t>(), op, N, C, R, H, W, g);
    } else {
      const at::Tensor br = bacc.contiguous();
      upsample_forward_nchw<scalar_t, acc_t>(xp, br.const_data_ptr<acc_t>(), op, N, C, R, H, W, g);
    }
  });
}

}  // namespace

at::Tensor upsample_concat(const at::Tensor& x_in, const at::Tensor& branches, const std::vector<int64_t>& bins) {
  check_input(x_in, "x", 4);
  check_input(branches, "branches", 3);
  const at::Tensor x = kernel_layout(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t total = C + static_cast<int64_t>(bins.size()) * branches.size(1);
  at::Tensor out = at::empty({N, total, H, W}, x.options().memory_format(memory_format(layout_of(x))));
  upsample_write(x, branches, bins, out, C);
  return out;
}

void upsample_into(const at::Tensor& concat, const at::Tensor& branches, const std::vector<int64_t>& bins,
                   int64_t channels) {
  check_input(concat, "concat", 4);
  TORCH_CHECK(concat.is_contiguous() || concat.is_contiguous(at::MemoryFormat::ChannelsLast),
              "psp_kernels: concat must be NCHW-contiguous or channels_last");
  upsample_write(at::Tensor(), branches, bins, concat, channels);
}

at::Tensor upsample_concat_backward(const at::Tensor& grad_out_in, const std::vector<int64_t>& bins,
                                    int64_t channels) {
  check_input(grad_out_in, "grad_out", 4);
  const PackedBins pb = packed_bins(bins);
  const int64_t total = grad_out_in.size(1);
  TORCH_CHECK(channels >= 0 && channels <= total && (total - channels) % pb.count() == 0,
              "psp_kernels: grad_out has ", total, " channels, which is not channels (", channels,
              ") + len(bins) (", pb.count(), ") * R");
  const at::Tensor go = kernel_layout(grad_out_in);
  const int64_t N = go.size(0), H = go.size(2), W = go.size(3), R = (total - channels) / pb.count();
  at::Tensor gb = at::empty({N, R, pb.total}, go.options().memory_format(at::MemoryFormat::Contiguous));
  if (gb.numel() == 0) return gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "psp_upsample_backward", [&] {
    const auto g = upsample_geometry<at::opmath_type<scalar_t>>(bins, H, W);
    const scalar_t* src = go.const_data_ptr<scalar_t>();
    scalar_t* dst = gb.data_ptr<scalar_t>();
    if (layout_of(go) == Layout::NHWC) {
      upsample_backward_nhwc<scalar_t>(src, dst, N, channels, R, H, W, g);
    } else {
      upsample_backward_nchw<scalar_t>(src, dst, N, channels, R, H, W, g);
    }
  });
  return gb;
}

