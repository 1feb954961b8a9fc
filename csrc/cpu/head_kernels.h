// The head kernels' code, compiled once per instruction set: head.cpp includes it through
// isa_variants.h inside psp::cpu::{avx512, avx2, base} (see isa.h); no include guard by design.
// Names of psp::cpu (common.h) are visible from the enclosing namespace.

namespace {

// ---------------------------------------------------------------------------------------------
// Tiles: one (n, h) row x one block of channels, all W columns.
// ---------------------------------------------------------------------------------------------

struct HeadGeometry {
  int64_t N, O, H, W, K;
  int64_t rows() const { return N * H; }
  int64_t blocks() const { return div_up(O, kChannelBlock); }
};

// A tile's elements form `lines` contiguous runs of `len` elements, `stride` apart, starting at
// element `base` of the [N, O, H, W] tensor. NCHW: one run of W columns per channel (lines = ob);
// channels_last: one run of ob channels per column (lines = W). The tile's local buffers are
// [lines, len] in the same order, so element (l, e) is at l * len + e.
struct Tile {
  int64_t row, n, h, o0, ob;
  int64_t base, lines, len, stride;
};

template <bool CL>
Tile make_tile(const HeadGeometry& g, int64_t item) {
  Tile t;
  t.row = item / g.blocks();
  t.n = t.row / g.H;
  t.h = t.row % g.H;
  t.o0 = (item % g.blocks()) * kChannelBlock;
  t.ob = std::min(kChannelBlock, g.O - t.o0);
  if constexpr (CL) {
    t.base = (t.row * g.W) * g.O + t.o0;
    t.lines = g.W, t.len = t.ob, t.stride = g.O;
  } else {
    t.base = ((t.n * g.O + t.o0) * g.H + t.h) * g.W;
    t.lines = t.ob, t.len = g.W, t.stride = g.H * g.W;
  }
  return t;
}

// f(c, gi, li) for every element of the tile: c its channel within the block, gi its offset in the
// [N, O, H, W] tensor, li its offset in the tile's local buffer. The inner loop runs along the
// contiguous dimension; an iteration only touches its own element (and reads per-channel values), so
// it is marked ivdep: GCC would otherwise give up vectorising for the many possible pointer aliases.
template <bool CL, typename F>
inline void for_tile(const Tile& t, F&& f) {
  for (int64_t l = 0; l < t.lines; ++l) {
    const int64_t gl = t.base + l * t.stride, ll = l * t.len;
#pragma GCC ivdep
    for (int64_t e = 0; e < t.len; ++e) f(CL ? e : l, gl + e, ll + e);
  }
}

// Per-channel sums over the W columns of a tile's local buffer v [lines, len], in one fixed order for
// both layouts: kSumLanes interleaved partial sums (lane j takes w = j, j + kSumLanes, ... ascending),
// then the lanes added in order. NCHW: a channel's run is contiguous, its lanes one small vector;
// channels_last: the lanes are kSumLanes channel vectors. Writes out[0:ob].
constexpr int64_t kSumLanes = 8;

template <bool CL, typename acc_t>
void sum_columns(const Tile& t, const acc_t* v, acc_t* out) {
  constexpr int64_t L = kSumLanes;
  if constexpr (CL) {
    std::array<acc_t, L * kChannelBlock> lanes{};
    for (int64_t w = 0; w < t.lines; ++w) {
      acc_t* lane = lanes.data() + (w % L) * t.ob;
      const acc_t* vw = v + w * t.ob;
      for (int64_t c = 0; c < t.ob; ++c) lane[c] += vw[c];
    }
    for (int64_t c = 0; c < t.ob; ++c) {
      acc_t s = 0;
      for (int64_t j = 0; j < L; ++j) s += lanes[j * t.ob + c];
      out[c] = s;
    }
  } else {
    for (int64_t c = 0; c < t.lines; ++c) {
      const acc_t* vc = v + c * t.len;
      std::array<acc_t, L> lanes{};
      int64_t w = 0;
      for (; w + L <= t.len; w += L) {
        for (int64_t j = 0; j < L; ++j) lanes[j] += vc[w + j];
      }
      for (int64_t j = 0; w + j < t.len; ++j) lanes[j] += vc[w + j];
      acc_t s = 0;
      for (int64_t j = 0; j < L; ++j) s += lanes[j];
      out[c] = s;
    }
  }
}

// f(tile, scratch) for every (row, channel block) item in parallel; `scratch` holds `scratch_size`
// acc_t per task; `work` is an item's cost in elements (for the grain size).
template <bool CL, typename acc_t, typename F>
void parallel_tiles(const HeadGeometry& g, int64_t work, int64_t scratch_size, F&& f) {
  at::parallel_for(0, g.rows() * g.blocks(), grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size);
    for (int64_t item = begin; item < end; ++item) f(make_tile<CL>(g, item), scratch.data());
  });
}

// f(o0, ob) for every block of channels in parallel; `work` is a channel's cost in elements.
template <typename F>
void parallel_channel_blocks(int64_t O, int64_t work, F&& f) {
  at::parallel_for(0, div_up(O, kChannelBlock), grain_for(work * kChannelBlock), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b * kChannelBlock, std::min(kChannelBlock, O - b * kChannelBlock));
  });
}

// f(std::true_type) or f(std::false_type): a runtime flag as a compile-time constant, so that the hot
// loops carry no branch on it.
template <typename F>
inline void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Per-row partials [2, rows, O] of the per-channel reductions; the tile's slices of both.
template <typename acc_t>
std::array<acc_t*, 2> row_partials(std::vector<acc_t>& part, const HeadGeometry& g, const Tile& t) {
  acc_t* p0 = part.data() + t.row * g.O + t.o0;
  return {p0, p0 + g.rows() * g.O};
}

// BatchNorm per channel as z * scale + shift (csrc/bn_affine.h).
template <typename acc_t>
struct ChannelAffine {
  std::vector<acc_t> invstd, scale, shift;
};

template <typename acc_t>
ChannelAffine<acc_t> channel_affine(const at::Tensor& bn_weight, const at::Tensor& bn_bias, const acc_t* mean,
                                    const acc_t* var, int64_t O, double eps) {
  ChannelAffine<acc_t> a{std::vector<acc_t>(O), std::vector<acc_t>(O), std::vector<acc_t>(O)};
  const acc_t* gp = bn_weight.const_data_ptr<acc_t>();
  const acc_t* bp = bn_bias.const_data_ptr<acc_t>();
  for (int64_t o = 0; o < O; ++o) {
    const BnAffine<acc_t> bn = bn_affine(gp[o], bp[o], mean[o], var[o], eps);
    a.invstd[o] = bn.invstd, a.scale[o] = bn.scale, a.shift[o] = bn.shift;
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// head_forward
// ---------------------------------------------------------------------------------------------

// The tile's branch term into T (its local [lines, len] buffer): NCHW T [ob, W] = U [ob, K] @ bw^T
// (bwt = bw^T [K, W]); channels_last T [W, ob] = bw [W, K] @ U^T, U^T staged in ut [K, ob].
template <bool CL, typename acc_t>
void branch_tile(const HeadGeometry& g, const Tile& t, const acc_t* u, const acc_t* bw, const acc_t* bwt,
                 acc_t* T, acc_t* ut) {
  const int64_t HK = g.H * g.K;
  const acc_t* ur = u + ((t.n * g.O + t.o0) * g.H + t.h) * g.K;  // U(j, k) = ur[j * HK + k]
  if constexpr (CL) {
    for (int64_t j = 0; j < t.ob; ++j) {
      for (int64_t k = 0; k < g.K; ++k) ut[k * t.ob + j] = ur[j * HK + k];
    }
    gemm_fixed_order(g.W, t.ob, g.K, bw, g.K, 1, ut, t.ob, T, t.ob);
  } else {
    gemm_fixed_order(t.ob, g.W, g.K, ur, HK, 1, bwt, g.W, T, g.W);
  }
}

// Per-row moments of the tile's rounded z (zt: local buffer, acc_t) into the row partials: the mean over
// the W columns, then the centred M2 = sum (z - mean)^2 (d: a second local buffer for the squares).
template <bool CL, typename acc_t>
void row_moments(const Tile& t, const acc_t* zt, acc_t* d, int64_t W, const std::array<acc_t*, 2>& part) {
  acc_t* mean = part[0];
  sum_columns<CL>(t, zt, mean);
  for (int64_t c = 0; c < t.ob; ++c) mean[c] /= static_cast<acc_t>(W);
  for_tile<CL>(t, [&](int64_t c, int64_t, int64_t li) {
    const acc_t dz = zt[li] - mean[c];
    d[li] = dz * dz;
  });
  sum_columns<CL>(t, d, part[1]);
}

// Batch mean and biased variance per channel from the per-row (mean, M2) partials of rows of W values
// each, merged in ascending row order with Chan et al.'s pairwise update: after merging row r into the
// first r rows, mean += d / (r + 1), M2 += M2_r + d^2 * W * r / (r + 1), with d = mean_r - mean.
template <typename acc_t>
void merge_moments(const std::vector<acc_t>& part, const HeadGeometry& g, acc_t* mean, acc_t* var) {
  const int64_t rows = g.rows(), O = g.O;
  const acc_t* pm = part.data();
  const acc_t* pm2 = pm + rows * O;
  parallel_channel_blocks(O, rows, [&](int64_t o0, int64_t ob) {
    std::array<acc_t, kChannelBlock> mu{}, m2{};
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t div = static_cast<acc_t>(r + 1);
      const acc_t f = static_cast<acc_t>(static_cast<double>(g.W) * static_cast<double>(r) / (r + 1.0));
      for (int64_t c = 0; c < ob; ++c) {
        const acc_t d = pm[r * O + o0 + c] - mu[c];
        mu[c] += d / div;
        m2[c] += pm2[r * O + o0 + c] + d * d * f;
      }
    }
    const acc_t count = static_cast<acc_t>(rows * g.W);
    for (int64_t c = 0; c < ob; ++c) {
      mean[o0 + c] = mu[c];
      var[o0 + c] = m2[c] / count;
    }
  });
}

template <typename scalar_t, typename acc_t>
inline scalar_t bn_relu(acc_t z, acc_t scale, acc_t shift) {
  return static_cast<scalar_t>(relu(z * scale + shift));
}

template <typename scalar_t, bool CL>
void head_forward_kernel(const HeadGeometry& g, const at::Tensor& y, const at::Tensor& u, const at::Tensor& bw,
                         const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean, at::Tensor& var,
                         at::Tensor& z, at::Tensor& out, bool training, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor bwt = CL ? bw : bw.t().contiguous();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const acc_t* up = u.const_data_ptr<acc_t>();
  const acc_t* bwp = bw.const_data_ptr<acc_t>();
  const acc_t* bwtp = bwt.const_data_ptr<acc_t>();
  scalar_t* zp = z.numel() ? z.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* vp = var.data_ptr<acc_t>();
  const int64_t tile = kChannelBlock * g.W;
  // T, then U^T (channels_last GEMM) or the squares of row_moments.
  const int64_t scratch = tile + std::max(tile, kChannelBlock * g.K);

  // Pass over y and u: f(t, c, gi, li, T, z) for every element of a tile, z = y + branch term
  // rounded to y's dtype (stored first when kept: keep is std::true_type), then done(t, T).
  auto z_pass = [&](auto keep, auto&& f, auto&& done) {
    parallel_tiles<CL, acc_t>(g, tile * (g.K + 1), scratch, [&](const Tile& t, acc_t* T) {
      branch_tile<CL>(g, t, up, bwp, bwtp, T, T + tile);
      for_tile<CL>(t, [&](int64_t c, int64_t gi, int64_t li) {
        const scalar_t zv = static_cast<scalar_t>(static_cast<acc_t>(yp[gi]) + T[li]);
        if constexpr (decltype(keep)::value) zp[gi] = zv;
        f(t, c, gi, li, T, static_cast<acc_t>(zv));
      });
      done(t, T);
    });
  };

  if (!training) {  // one pass: running statistics known up front
    const ChannelAffine<acc_t> bn = channel_affine(bn_weight, bn_bias, mp, vp, g.O, eps);
    const acc_t* sc = bn.scale.data();
    const acc_t* sh = bn.shift.data();
    with_flag(zp != nullptr, [&](auto keep) {
      z_pass(keep, [&](const Tile& t, int64_t c, int64_t gi, int64_t, acc_t*,
                       acc_t zv) { op[gi] = bn_relu<scalar_t>(zv, sc[t.o0 + c], sh[t.o0 + c]); },
             [](const Tile&, acc_t*) {});
    });
    return;
  }
  // Training: z and the per-row moments (the tile's rounded z kept in T), merge, then z -> out.
  std::vector<acc_t> part(2 * g.rows() * g.O);
  z_pass(std::true_type{}, [](const Tile&, int64_t, int64_t, int64_t li, acc_t* T, acc_t zv) { T[li] = zv; },
         [&](const Tile& t, acc_t* T) { row_moments<CL>(t, T, T + tile, g.W, row_partials(part, g, t)); });
  merge_moments(part, g, mp, vp);
  const ChannelAffine<acc_t> bn = channel_affine(bn_weight, bn_bias, mp, vp, g.O, eps);
  parallel_tiles<CL, acc_t>(g, tile, 0, [&](const Tile& t, acc_t*) {
    const acc_t* sc = bn.scale.data() + t.o0;
    const acc_t* sh = bn.shift.data() + t.o0;
    for_tile<CL>(t, [&](int64_t c, int64_t gi, int64_t) {
      op[gi] = bn_relu<scalar_t>(static_cast<acc_t>(zp[gi]), sc[c], sh[c]);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// head_backward
// ---------------------------------------------------------------------------------------------

// Per channel: sums[s][o] = sum over rows, ascending, of the partials part[s][row, o] (s = 0, 1).
template <typename acc_t>
void sum_rows(const std::vector<acc_t>& part, const HeadGeometry& g, const std::array<acc_t*, 2>& sums) {
  const int64_t rows = g.rows(), O = g.O;
  parallel_channel_blocks(O, 2 * rows, [&](int64_t o0, int64_t ob) {
    for (int64_t s = 0; s < 2; ++s) {
      const acc_t* p = part.data() + s * rows * O + o0;
      std::array<acc_t, kChannelBlock> acc{};
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < ob; ++c) acc[c] += p[r * O + c];
      }
      std::copy(acc.begin(), acc.begin() + ob, sums[s] + o0);
    }
  });
}

template <typename scalar_t, bool CL>
void head_backward_kernel(const HeadGeometry& g, const at::Tensor& grad_out, const at::Tensor& z,
                          const at::Tensor& bw, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                          const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
                          at::Tensor& grad_y, at::Tensor& grad_u, at::Tensor& grad_bn) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const acc_t* bwp = bw.const_data_ptr<acc_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  acc_t* gup = grad_u.data_ptr<acc_t>();
  acc_t* ggp = grad_bn.data_ptr<acc_t>();  // grad_bn [2, O]: grad_bn_weight, then grad_bn_bias
  acc_t* gbp = ggp + g.O;
  const ChannelAffine<acc_t> bn = channel_affine(bn_weight, bn_bias, mp, var.const_data_ptr<acc_t>(), g.O, eps);
  const acc_t* is = bn.invstd.data();
  const acc_t* sc = bn.scale.data();
  const acc_t* sh = bn.shift.data();
  const int64_t tile = kChannelBlock * g.W;

  // (g', xhat) of element gi of channel o: the gradient behind the ReLU and the normalised z.
  auto grad_xhat = [&](int64_t o, int64_t gi) {
    const acc_t zv = static_cast<acc_t>(zp[gi]), go = static_cast<acc_t>(gop[gi]);  // both loaded: a select
    const acc_t gv = zv * sc[o] + sh[o] > acc_t(0) ? go : acc_t(0);
    return std::array<acc_t, 2>{gv, (zv - mp[o]) * is[o]};
  };

  // Pass 1: per-row (sum g', sum g' xhat) per channel; rows summed in order into grad_bn_bias, grad_bn_weight
  // (grad_bn's rows 1 and 0).
  std::vector<acc_t> part(2 * g.rows() * g.O);
  parallel_tiles<CL, acc_t>(g, tile, 2 * tile, [&](const Tile& t, acc_t* G) {
    acc_t* GX = G + tile;
    for_tile<CL>(t, [&](int64_t c, int64_t gi, int64_t li) {
      const std::array<acc_t, 2> gx = grad_xhat(t.o0 + c, gi);
      G[li] = gx[0];
      GX[li] = gx[0] * gx[1];
    });
    const std::array<acc_t*, 2> p = row_partials(part, g, t);
    sum_columns<CL>(t, G, p[0]);
    sum_columns<CL>(t, GX, p[1]);
  });
  sum_rows(part, g, {gbp, ggp});

  // Pass 2: grad_z per element (through the batch statistics in training) into the tile's local
  // buffer GZ and, rounded, grad_y; then grad_u rows (n, o, h, :) = GZ (as [ob, W]) @ bw [W, K].
  const acc_t count = static_cast<acc_t>(g.rows() * g.W);
  std::vector<acc_t> mean_g(g.O), mean_gx(g.O);
  for (int64_t o = 0; o < g.O; ++o) mean_g[o] = gbp[o] / count, mean_gx[o] = ggp[o] / count;
  with_flag(training, [&](auto train) {
    parallel_tiles<CL, acc_t>(g, tile * (g.K + 1), tile, [&](const Tile& t, acc_t* GZ) {
      for_tile<CL>(t, [&](int64_t c, int64_t gi, int64_t li) {
        const int64_t o = t.o0 + c;
        const std::array<acc_t, 2> gx = grad_xhat(o, gi);
        acc_t gz;
        if constexpr (decltype(train)::value) {
          gz = (gx[0] - mean_g[o] - gx[1] * mean_gx[o]) * sc[o];
        } else {
          gz = gx[0] * sc[o];
        }
        GZ[li] = gz;
        gyp[gi] = static_cast<scalar_t>(gz);
      });
      gemm_fixed_order(t.ob, g.K, g.W, GZ, CL ? 1 : g.W, CL ? t.ob : 1, bwp, g.K,
                       gup + ((t.n * g.O + t.o0) * g.H + t.h) * g.K, g.H * g.K);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks.
// ---------------------------------------------------------------------------------------------

// y / z: a 4-D CPU tensor of one of the four kernel dtypes.
void check_map(const at::Tensor& t, const char* name) {
  check_input(t, name, 4);
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kDouble || s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "psp_kernels: ", name,
              " must be float64, float32, float16 or bfloat16, got ", s);
}

// A tensor in the accumulation dtype of map.
void check_acc(const at::Tensor& t, const char* name, const at::Tensor& map) {
  const at::ScalarType acc = acc_dtype(map.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, "psp_kernels: ", name, " must be in the accumulation dtype ", acc, " of ",
              map.scalar_type(), ", got ", t.scalar_type());
}

// Sizes of the map [N, O, H, W] and width_interp [W, K] (checked, accumulation dtype).
HeadGeometry head_geometry(const at::Tensor& map, const at::Tensor& bw) {
  check_input(bw, "width_interp", 2);
  TORCH_CHECK(bw.size(0) == map.size(3), "psp_kernels: width_interp must be [W, K] with W = ", map.size(3),
              ", got ", bw.sizes());
  check_acc(bw, "width_interp", map);
  return {map.size(0), map.size(1), map.size(2), map.size(3), bw.size(1)};
}

// A per-channel vector [O] (any floating dtype) as a new contiguous tensor of dtype acc.
at::Tensor channel_param(const at::Tensor& t, const char* name, int64_t O, at::ScalarType acc) {
  check_input(t, name, 1);
  TORCH_CHECK(t.size(0) == O, "psp_kernels: ", name, " must be [O] = [", O, "], got ", t.sizes());
  return t.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_branch_bn_relu(
    const at::Tensor& y_in, const at::Tensor& u_in, const at::Tensor& bw_in, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var, bool training,
    double eps, bool keep_z) {
  at::NoGradGuard no_grad;
  check_map(y_in, "conv_out");
  const HeadGeometry g = head_geometry(y_in, bw_in);
  check_input(u_in, "branch_rows", 4);
  TORCH_CHECK(u_in.size(0) == g.N && u_in.size(1) == g.O && u_in.size(2) == g.H && u_in.size(3) == g.K,
              "psp_kernels: branch_rows must be [N, O, H, K] = [", g.N, ", ", g.O, ", ", g.H, ", ", g.K,
              "] (conv_out's N, O, H and width_interp's K), got ", u_in.sizes());
  check_acc(u_in, "branch_rows", y_in);
  const at::Tensor y = kernel_layout(y_in);
  const Layout layout = layout_of(y);
  const at::ScalarType acc = acc_dtype(y.scalar_type());
  const at::Tensor u = u_in.contiguous(), bw = bw_in.contiguous();
  const at::Tensor bn_w = channel_param(bn_weight, "bn_weight", g.O, acc);
  const at::Tensor bn_b = channel_param(bn_bias, "bn_bias", g.O, acc);
  const auto acc_opts = y.options().dtype(acc);
  at::Tensor mean = training ? at::empty({g.O}, acc_opts) : channel_param(running_mean, "running_mean", g.O, acc);
  at::Tensor var = training ? at::empty({g.O}, acc_opts) : channel_param(running_var, "running_var", g.O, acc);
  const auto map_opts = y.options().memory_format(memory_format(layout));
  at::Tensor out = at::empty(y.sizes(), map_opts);
  at::Tensor z = training || keep_z ? at::empty(y.sizes(), map_opts) : at::empty({0}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "psp_add_branch_bn_relu", [&] {
    if (layout == Layout::NHWC) {
      head_forward_kernel<scalar_t, true>(g, y, u, bw, bn_w, bn_b, mean, var, z, out, training, eps);
    } else {
      head_forward_kernel<scalar_t, false>(g, y, u, bw, bn_w, bn_b, mean, var, z, out, training, eps);
    }
  });
  return {out, z, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_branch_bn_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& z_in, const at::Tensor& bw_in, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean_in, const at::Tensor& var_in, bool training, double eps) {
  at::NoGradGuard no_grad;
  check_map(z_in, "bn_input");
  check_input(grad_out, "grad_out", 4);
  TORCH_CHECK(grad_out.sizes() == z_in.sizes(), "psp_kernels: grad_out must have bn_input's shape ", z_in.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == z_in.scalar_type(), "psp_kernels: grad_out must have bn_input's dtype ",
              z_in.scalar_type(), ", got ", grad_out.scalar_type());
  const HeadGeometry g = head_geometry(z_in, bw_in);
  const at::Tensor z = kernel_layout(z_in);
  const Layout layout = layout_of(z);
  const at::Tensor go = grad_out.contiguous(memory_format(layout));
  const at::ScalarType acc = acc_dtype(z.scalar_type());
  const at::Tensor bw = bw_in.contiguous();
  const at::Tensor bn_w = channel_param(bn_weight, "bn_weight", g.O, acc);
  const at::Tensor bn_b = channel_param(bn_bias, "bn_bias", g.O, acc);
  const at::Tensor mean = channel_param(mean_in, "mean", g.O, acc), var = channel_param(var_in, "var", g.O, acc);
  const auto acc_opts = z.options().dtype(acc);
  at::Tensor grad_y = at::empty(z.sizes(), z.options().memory_format(memory_format(layout)));
  at::Tensor grad_u = at::empty({g.N, g.O, g.H, g.K}, acc_opts);
  at::Tensor grad_bn = at::empty({2, g.O}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "psp_add_branch_bn_relu_backward", [&] {
    if (layout == Layout::NHWC) {
      head_backward_kernel<scalar_t, true>(g, go, z, bw, bn_w, bn_b, mean, var, training, eps, grad_y, grad_u,
                                           grad_bn);
    } else {
      head_backward_kernel<scalar_t, false>(g, go, z, bw, bn_w, bn_b, mean, var, training, eps, grad_y, grad_u,
                                            grad_bn);
    }
  });
  return {grad_y, grad_u, grad_bn};
}

