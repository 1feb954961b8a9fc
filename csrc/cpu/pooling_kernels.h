// The pooling kernels' code, compiled once per instruction set: pooling.cpp includes it through
// isa_variants.h inside psp::cpu::{avx512, avx2, base} (see isa.h); no include guard by design.
// Names of psp::cpu (common.h) are visible from the enclosing namespace.

namespace {

// Geometry shared by the pooling kernels of one call.
struct PoolGeometry {
  PackedBins pb;
  AxisSegments rows;  // along H
  AxisSegments cols;  // along W (same bins, so cols.woff == rows.woff)
  int64_t height;
  int64_t width;
  int64_t blocks() const { return rows.nseg() * cols.nseg(); }
  // Scratch entries of blocks_to_cells / cells_to_blocks: one per (row segment, bin window).
  int64_t comb_size() const { return rows.nseg() * pb.sum_sizes; }
};

PoolGeometry pool_geometry(const std::vector<int64_t>& bins, int64_t height, int64_t width) {
  PackedBins pb = packed_bins(bins);
  AxisSegments rows = axis_segments(pb, height);
  AxisSegments cols = axis_segments(pb, width);
  return {std::move(pb), std::move(rows), std::move(cols), height, width};
}

// Window area of every packed cell, in the accumulation type.
template <typename acc_t>
std::vector<acc_t> cell_areas(const PoolGeometry& g) {
  std::vector<acc_t> area(g.pb.total);
  for (int64_t k = 0; k < g.pb.count(); ++k) {
    const int64_t b = g.pb.sizes[k], wo = g.rows.woff[k];
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) {
        area[g.pb.offsets[k] + i * b + j] = static_cast<acc_t>(g.rows.win_len[wo + i] * g.cols.win_len[wo + j]);
      }
    }
  }
  return area;
}

// Forward combination, `lanes` values per entry:
//   colcomb[a][window e] = sum of blocks[a][col segments of e]             (per row segment a)
//   cells[k, i, j]       = sum of colcomb[row segments of window i][woff_k + j]
template <typename acc_t>
void blocks_to_cells(const PoolGeometry& g, const acc_t* blocks, acc_t* colcomb, acc_t* cells,
                     int64_t lanes) {
  const int64_t nsh = g.rows.nseg(), nsw = g.cols.nseg(), nw = g.pb.sum_sizes;
  for (int64_t a = 0; a < nsh; ++a) {
    for (int64_t e = 0; e < nw; ++e) {
      acc_t* dst = colcomb + (a * nw + e) * lanes;
      std::fill(dst, dst + lanes, acc_t(0));
      const Range bs = g.cols.win_segs[e];
      for (int64_t s = bs.start; s < bs.end; ++s) add_into(dst, blocks + (a * nsw + s) * lanes, lanes);
    }
  }
  for (int64_t k = 0; k < g.pb.count(); ++k) {
    const int64_t b = g.pb.sizes[k], wo = g.rows.woff[k];
    for (int64_t i = 0; i < b; ++i) {
      const Range as = g.rows.win_segs[wo + i];
      for (int64_t j = 0; j < b; ++j) {
        acc_t* dst = cells + (g.pb.offsets[k] + i * b + j) * lanes;
        std::fill(dst, dst + lanes, acc_t(0));
        for (int64_t a = as.start; a < as.end; ++a) add_into(dst, colcomb + (a * nw + wo + j) * lanes, lanes);
      }
    }
  }
}

// Backward combination (transpose of blocks_to_cells), `lanes` values per entry:
//   rowcomb[a][woff_k + j] = sum over cells i of bin k containing row segment a of gs[k, i, j]
//   vals[a][s]             = sum over bins k, cells j containing col segment s of rowcomb[a][woff_k + j]
template <typename acc_t>
void cells_to_blocks(const PoolGeometry& g, const acc_t* gs, acc_t* rowcomb, acc_t* vals, int64_t lanes) {
  const int64_t nsh = g.rows.nseg(), nsw = g.cols.nseg(), nw = g.pb.sum_sizes;
  for (int64_t a = 0; a < nsh; ++a) {
    for (int64_t k = 0; k < g.pb.count(); ++k) {
      const int64_t b = g.pb.sizes[k], wo = g.rows.woff[k];
      const Range ri = g.rows.seg_cells[k * nsh + a];
      for (int64_t j = 0; j < b; ++j) {
        acc_t* dst = rowcomb + (a * nw + wo + j) * lanes;
        std::fill(dst, dst + lanes, acc_t(0));
        for (int64_t i = ri.start; i < ri.end; ++i) add_into(dst, gs + (g.pb.offsets[k] + i * b + j) * lanes, lanes);
      }
    }
    for (int64_t s = 0; s < nsw; ++s) {
      acc_t* dst = vals + (a * nsw + s) * lanes;
      std::fill(dst, dst + lanes, acc_t(0));
      for (int64_t k = 0; k < g.pb.count(); ++k) {
        const Range cj = g.cols.seg_cells[k * nsw + s];
        for (int64_t j = cj.start; j < cj.end; ++j) {
          add_into(dst, rowcomb + (a * nw + g.rows.woff[k] + j) * lanes, lanes);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pool_forward
// ---------------------------------------------------------------------------------------------

// Block sums of one row segment a from its column sums (`lanes` values per column):
// blocks[a][s] = sum over w in column segment s (ascending) of colsum[w].
template <typename acc_t>
void column_sums_to_blocks(const PoolGeometry& g, int64_t a, const acc_t* colsum, acc_t* blocks,
                           int64_t lanes) {
  const int64_t nsw = g.cols.nseg();
  for (int64_t s = 0; s < nsw; ++s) {
    acc_t* dst = blocks + (a * nsw + s) * lanes;
    std::fill(dst, dst + lanes, acc_t(0));
    for (int64_t w = g.cols.bounds[s]; w < g.cols.bounds[s + 1]; ++w) add_into(dst, colsum + w * lanes, lanes);
  }
}

// Optional concat buffer of the fused forward: [N, total, H, W] in x's layout (nullptr: no copy).
template <typename scalar_t>
struct ConcatOut {
  scalar_t* ptr;
  int64_t total;
};

// Optional residual of the fused backward: an [N, C, H, W] view with arbitrary strides (nullptr: none).
template <typename scalar_t>
struct Residual {
  const scalar_t* ptr;
  int64_t sn, sc, sh, sw;
  const scalar_t* at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return ptr + n * sn + c * sc + h * sh + w * sw;
  }
};

// NCHW: item = (n, c) plane of H*W contiguous values, owning its S outputs. The rows of a row
// segment are summed into an L1-resident row (vectorised over w), then cut into column segments.
template <typename scalar_t>
void pool_forward_nchw(const scalar_t* x, scalar_t* out, int64_t C, int64_t planes, const PoolGeometry& g,
                       ConcatOut<scalar_t> cat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.height, W = g.width, S = g.pb.total;
  const std::vector<acc_t> area = cell_areas<acc_t>(g);
  at::parallel_for(0, planes, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> colsum(W), blocks(g.blocks()), comb(g.comb_size()), cells(S);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t a = 0; a < g.rows.nseg(); ++a) {
        std::fill(colsum.begin(), colsum.end(), acc_t(0));
        for (int64_t h = g.rows.bounds[a]; h < g.rows.bounds[a + 1]; ++h) {
          const scalar_t* row = x + (p * H + h) * W;
          for (int64_t w = 0; w < W; ++w) colsum[w] += static_cast<acc_t>(row[w]);
          if (cat.ptr) std::memcpy(cat.ptr + (((p / C) * cat.total + p % C) * H + h) * W, row, W * sizeof(scalar_t));
        }
        column_sums_to_blocks(g, a, colsum.data(), blocks.data(), 1);
      }
      blocks_to_cells(g, blocks.data(), comb.data(), cells.data(), 1);
      for (int64_t s = 0; s < S; ++s) out[p * S + s] = static_cast<scalar_t>(cells[s] / area[s]);
    }
  });
}

// channels_last: item = (n, block of kChannelBlock channels); each pixel's channel vector is added
// into its column's lanes (same per-lane order as the NCHW path).
template <typename scalar_t>
void pool_forward_nhwc(const scalar_t* x, scalar_t* out, int64_t N, int64_t C, const PoolGeometry& g,
                       ConcatOut<scalar_t> cat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.height, W = g.width, S = g.pb.total, CB = kChannelBlock;
  const int64_t cblocks = div_up(C, CB);
  const std::vector<acc_t> area = cell_areas<acc_t>(g);
  at::parallel_for(0, N * cblocks, grain_for(H * W * CB), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> colsum(W * CB), blocks(g.blocks() * CB), comb(g.comb_size() * CB), cells(S * CB);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / cblocks, c0 = (t % cblocks) * CB, cb = std::min(CB, C - c0);
      for (int64_t a = 0; a < g.rows.nseg(); ++a) {
        std::fill(colsum.begin(), colsum.end(), acc_t(0));
        for (int64_t h = g.rows.bounds[a]; h < g.rows.bounds[a + 1]; ++h) {
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* px = x + ((n * H + h) * W + w) * C + c0;
            acc_t* dst = colsum.data() + w * CB;
            for (int64_t c = 0; c < cb; ++c) dst[c] += static_cast<acc_t>(px[c]);
            if (cat.ptr) std::memcpy(cat.ptr + ((n * H + h) * W + w) * cat.total + c0, px, cb * sizeof(scalar_t));
          }
        }
        column_sums_to_blocks(g, a, colsum.data(), blocks.data(), CB);
      }
      blocks_to_cells(g, blocks.data(), comb.data(), cells.data(), CB);
      for (int64_t c = 0; c < cb; ++c) {
        scalar_t* o = out + (n * C + c0 + c) * S;
        for (int64_t s = 0; s < S; ++s) o[s] = static_cast<scalar_t>(cells[s * CB + c] / area[s]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// pool_backward
// ---------------------------------------------------------------------------------------------

// NCHW: item = (n, c) plane; gs = g / area for its S cells -> one value per block -> written to
// every element of the block (plus the residual, summed in acc_t and rounded once).
template <typename scalar_t>
void pool_backward_nchw(const scalar_t* gp, scalar_t* gx, int64_t C, int64_t planes, const PoolGeometry& g,
                        Residual<scalar_t> res) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.height, W = g.width, S = g.pb.total, nsw = g.cols.nseg();
  const std::vector<acc_t> area = cell_areas<acc_t>(g);
  at::parallel_for(0, planes, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gs(S), comb(g.comb_size()), vals(g.blocks());
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t s = 0; s < S; ++s) gs[s] = static_cast<acc_t>(gp[p * S + s]) / area[s];
      cells_to_blocks(g, gs.data(), comb.data(), vals.data(), 1);
      for (int64_t a = 0; a < g.rows.nseg(); ++a) {
        for (int64_t h = g.rows.bounds[a]; h < g.rows.bounds[a + 1]; ++h) {
          scalar_t* row = gx + (p * H + h) * W;
          for (int64_t s = 0; s < nsw; ++s) {
            const acc_t v = vals[a * nsw + s];
            if (!res.ptr) {
              std::fill(row + g.cols.bounds[s], row + g.cols.bounds[s + 1], static_cast<scalar_t>(v));
              continue;
            }
            for (int64_t w = g.cols.bounds[s]; w < g.cols.bounds[s + 1]; ++w) {
              row[w] = static_cast<scalar_t>(v + static_cast<acc_t>(*res.at(p / C, p % C, h, w)));
            }
          }
        }
      }
    }
  });
}

// channels_last: item = (n, channel block); gs transposed to [S][block] lanes, block values
// converted once, then each pixel's channel vector is a contiguous copy.
template <typename scalar_t>
void pool_backward_nhwc(const scalar_t* gp, scalar_t* gx, int64_t N, int64_t C, const PoolGeometry& g,
                        Residual<scalar_t> res) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.height, W = g.width, S = g.pb.total, nsw = g.cols.nseg(), CB = kChannelBlock;
  const int64_t cblocks = div_up(C, CB);
  const std::vector<acc_t> area = cell_areas<acc_t>(g);
  at::parallel_for(0, N * cblocks, grain_for(H * W * CB), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gs(S * CB), comb(g.comb_size() * CB), vals(g.blocks() * CB);
    std::vector<scalar_t> vout(g.blocks() * CB);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / cblocks, c0 = (t % cblocks) * CB, cb = std::min(CB, C - c0);
      for (int64_t c = 0; c < cb; ++c) {
        const scalar_t* src = gp + (n * C + c0 + c) * S;
        for (int64_t s = 0; s < S; ++s) gs[s * CB + c] = static_cast<acc_t>(src[s]) / area[s];
      }
      cells_to_blocks(g, gs.data(), comb.data(), vals.data(), CB);
      for (size_t e = 0; e < vals.size(); ++e) vout[e] = static_cast<scalar_t>(vals[e]);
      for (int64_t a = 0; a < g.rows.nseg(); ++a) {
        for (int64_t h = g.rows.bounds[a]; h < g.rows.bounds[a + 1]; ++h) {
          for (int64_t s = 0; s < nsw; ++s) {
            const scalar_t* src = vout.data() + (a * nsw + s) * CB;
            const acc_t* val = vals.data() + (a * nsw + s) * CB;
            for (int64_t w = g.cols.bounds[s]; w < g.cols.bounds[s + 1]; ++w) {
              scalar_t* dst = gx + ((n * H + h) * W + w) * C + c0;
              if (!res.ptr) {
                std::memcpy(dst, src, cb * sizeof(scalar_t));
                continue;
              }
              const scalar_t* r = res.at(n, c0, h, w);
              for (int64_t c = 0; c < cb; ++c) {
                dst[c] = static_cast<scalar_t>(val[c] + static_cast<acc_t>(r[c * res.sc]));
              }
            }
          }
        }
      }
    }
  });
}

// x -> pooled, and x copied into concat[:, :C] when concat is defined.
at::Tensor pool_forward_impl(const at::Tensor& x, const std::vector<int64_t>& bins, const at::Tensor& concat) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const PoolGeometry g = pool_geometry(bins, H, W);
  at::Tensor out = at::empty({N, C, g.pb.total}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const Layout layout = layout_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "psp_pool_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const ConcatOut<scalar_t> cat{concat.defined() ? concat.data_ptr<scalar_t>() : nullptr,
                                  concat.defined() ? concat.size(1) : 0};
    if (layout == Layout::NHWC) {
      pool_forward_nhwc<scalar_t>(xp, op, N, C, g, cat);
    } else {
      pool_forward_nchw<scalar_t>(xp, op, C, N * C, g, cat);
    }
  });
  return out;
}

// grad_pooled -> grad_x, plus the residual when it is defined.
at::Tensor pool_backward_impl(const at::Tensor& grad_pooled_in, const std::vector<int64_t>& bins, int64_t height,
                              int64_t width, bool channels_last, const at::Tensor& residual) {
  const PoolGeometry g = pool_geometry(bins, height, width);
  check_packed(grad_pooled_in, "grad_pooled", g.pb);
  const at::Tensor gp = grad_pooled_in.contiguous();
  const int64_t N = gp.size(0), C = gp.size(1);
  const Layout layout = channels_last ? Layout::NHWC : Layout::NCHW;
  at::Tensor gx = at::empty({N, C, height, width}, gp.options().memory_format(memory_format(layout)));
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gp.scalar_type(), "psp_pool_backward", [&] {
    const scalar_t* src = gp.const_data_ptr<scalar_t>();
    scalar_t* dst = gx.data_ptr<scalar_t>();
    Residual<scalar_t> res{nullptr, 0, 0, 0, 0};
    if (residual.defined()) {
      res = {residual.const_data_ptr<scalar_t>(), residual.stride(0), residual.stride(1), residual.stride(2),
             residual.stride(3)};
    }
    if (layout == Layout::NHWC) {
      pool_backward_nhwc<scalar_t>(src, dst, N, C, g, res);
    } else {
      pool_backward_nchw<scalar_t>(src, dst, C, N * C, g, res);
    }
  });
  return gx;
}

}  // namespace

at::Tensor multibin_avg_pool(const at::Tensor& x_in, const std::vector<int64_t>& bins) {
  check_input(x_in, "x", 4);
  return pool_forward_impl(kernel_layout(x_in), bins, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> multibin_avg_pool_with_concat(const at::Tensor& x_in,
                                                                 const std::vector<int64_t>& bins,
                                                                 int64_t total_channels) {
  check_input(x_in, "x", 4);
  const at::Tensor x = kernel_layout(x_in);
  TORCH_CHECK(total_channels >= x.size(1), "psp_kernels: total_channels must be >= C = ", x.size(1), ", got ",
              total_channels);
  at::Tensor concat = at::empty({x.size(0), total_channels, x.size(2), x.size(3)},
                                x.options().memory_format(memory_format(layout_of(x))));
  at::Tensor pooled = pool_forward_impl(x, bins, concat);
  return {pooled, concat};
}

at::Tensor multibin_avg_pool_backward(const at::Tensor& grad_pooled, const std::vector<int64_t>& bins, int64_t height,
                                      int64_t width, bool channels_last) {
  return pool_backward_impl(grad_pooled, bins, height, width, channels_last, at::Tensor());
}

at::Tensor multibin_avg_pool_backward_add(const at::Tensor& grad_pooled, const std::vector<int64_t>& bins,
                                          const at::Tensor& residual, bool channels_last) {
  check_input(residual, "residual", 4);
  TORCH_CHECK(residual.scalar_type() == grad_pooled.scalar_type(),
              "psp_kernels: residual must have grad_pooled's dtype ",
              grad_pooled.scalar_type(), ", got ", residual.scalar_type());
  TORCH_CHECK(residual.size(0) == grad_pooled.size(0) && residual.size(1) == grad_pooled.size(1),
              "psp_kernels: residual must be [N, C, H, W] with grad_pooled's N, C, got ", residual.sizes());
  return pool_backward_impl(grad_pooled, bins, residual.size(2), residual.size(3), channels_last, residual);
}

