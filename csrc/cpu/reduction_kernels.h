// The reduction kernels' code, compiled once per instruction set: reduction.cpp includes it through
// isa_variants.h inside psp::cpu::{avx512, avx2, base} (see isa.h); no include guard by design.
// Names of psp::cpu (common.h) are visible from the enclosing namespace.

namespace {

// Per-bin parameters of shape [R] (any floating dtype) stacked into one contiguous [nb, R] tensor
// of the accumulation dtype.
at::Tensor stack_params(const std::vector<at::Tensor>& ts, const char* name, const PackedBins& pb,
                        int64_t R, at::ScalarType acc) {
  check_list(ts, name, pb);
  std::vector<at::Tensor> rows;
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.defined() && t.numel() == R, "psp_kernels: every ", name, "[k] must have ", R,
                " elements, got ", t.sizes());
    rows.push_back(t.reshape({R}).to(acc));
  }
  return at::stack(rows).contiguous();
}

// Checks conv_weights[k] is [R, C, 1, 1] (R from conv_weights[0]); returns R.
int64_t check_weights(const std::vector<at::Tensor>& conv_weights, const PackedBins& pb, int64_t C) {
  check_list(conv_weights, "conv_weights", pb);
  const int64_t R = conv_weights[0].dim() == 4 ? conv_weights[0].size(0) : -1;
  for (const at::Tensor& w : conv_weights) {
    TORCH_CHECK(w.defined() && w.dim() == 4 && w.size(0) == R && w.size(1) == C && w.size(2) == 1 &&
                    w.size(3) == 1,
                "psp_kernels: conv_weights[k] must be [R, C, 1, 1] with C = ", C, " and one R, got ",
                w.sizes());
  }
  return R;
}

// Bin k's columns of the [C, N, S] accumulation-type view as a contiguous [C, N*s] matrix.
at::Tensor bin_columns(const at::Tensor& p_cns, const PackedBins& pb, int64_t k) {
  const int64_t s = pb.sizes[k] * pb.sizes[k];
  return p_cns.narrow(2, pb.offsets[k], s).reshape({p_cns.size(0), p_cns.size(1) * s});
}

// ---------------------------------------------------------------------------------------------
// Fixed-order GEMM (gemm.h): every out[i][j] is accumulated from 0 over k ascending by one task, so
// its bits depend neither on the tiling nor on the thread count. (at::mm is not used here: MKL's
// multi-threaded sgemm returns different bits for 1 and 2 threads at PPM sizes, e.g. [512, 2048] @
// [2048, 72].)
// ---------------------------------------------------------------------------------------------

// Task tiles of 8 rows x two 64-byte vectors (the widest the GEMM uses: AVX-512).
constexpr int64_t kTileRows = 8;
template <typename acc_t>
constexpr int64_t kTileCols = 128 / static_cast<int64_t>(sizeof(acc_t));

// out (contiguous [I, n]) = A @ B; one task item per output tile, row tiles fastest so consecutive
// items of a task reuse one column block of B from cache.
template <typename acc_t>
void gemm_parallel(int64_t I, int64_t n, int64_t K, const acc_t* a, int64_t si, int64_t sk,
                   const acc_t* b, int64_t ldb, acc_t* out) {
  constexpr int64_t TR = kTileRows, TC = kTileCols<acc_t>;
  const int64_t ti = div_up(I, TR);
  at::parallel_for(0, ti * div_up(n, TC), grain_for(K * TR * TC), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t % ti) * TR, j0 = (t / ti) * TC;
      gemm_fixed_order(std::min(TR, I - i0), std::min(TC, n - j0), K, a + i0 * si, si, sk, b + j0, ldb,
                       out + i0 * n + j0, n);
    }
  });
}

// Tensor front end: A given by a 2-D tensor of acc_t (any strides; transposed views are free),
// B a contiguous [K, n] tensor of acc_t; returns a contiguous [I, n] tensor.
at::Tensor fixed_order_mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && a.scalar_type() == b.scalar_type(),
              "psp_kernels: bad GEMM operands ", a.sizes(), " @ ", b.sizes());
  const at::Tensor bc = b.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(1)}, b.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psp_gemm", [&] {
    gemm_parallel<scalar_t>(a.size(0), b.size(1), a.size(1), a.const_data_ptr<scalar_t>(), a.stride(0),
                               a.stride(1), bc.const_data_ptr<scalar_t>(), b.size(1), out.data_ptr<scalar_t>());
  });
  return out;
}

// Batch mean and biased variance of m contiguous values, two passes.
template <typename acc_t>
inline void batch_stats(const acc_t* v, int64_t m, acc_t& mean, acc_t& var) {
  acc_t sum = 0;
  for (int64_t e = 0; e < m; ++e) sum += v[e];
  mean = sum / static_cast<acc_t>(m);
  acc_t sq = 0;
  for (int64_t e = 0; e < m; ++e) sq += (v[e] - mean) * (v[e] - mean);
  var = sq / static_cast<acc_t>(m);
}

// Read-only views shared by the per-(bin, channel) kernels of one call.
template <typename acc_t>
struct ReductionArgs {
  const PackedBins* pb;
  int64_t N, R, S;
  const acc_t* bn_weight;  // [nb, R]
  const acc_t* bn_bias;   // [nb, R]
  double eps;
  bool training;
};

// Forward of item (k, r): statistics (training) from zrow = Z_k[r, :] ([N, s] flattened), then z and
// out written into their packed [N, R, S] places.
template <typename scalar_t, typename acc_t>
void bn_relu_forward_row(const ReductionArgs<acc_t>& a, int64_t k, int64_t r, const acc_t* zrow,
                         acc_t* mean, acc_t* var, acc_t* z, scalar_t* out) {
  const int64_t s = a.pb->sizes[k] * a.pb->sizes[k], kr = k * a.R + r;
  if (a.training) batch_stats(zrow, a.N * s, mean[kr], var[kr]);
  const BnAffine<acc_t> bn = bn_affine(a.bn_weight[kr], a.bn_bias[kr], mean[kr], var[kr], a.eps);
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t base = (n * a.R + r) * a.S + a.pb->offsets[k];
    for (int64_t q = 0; q < s; ++q) {
      const acc_t v = zrow[n * s + q];
      z[base + q] = v;
      out[base + q] = static_cast<scalar_t>(relu(v * bn.scale + bn.shift));
    }
  }
}

// Backward of item (k, r): masked grad g = grad_out * (y > 0), dbn_bias = sum g, dbn_weight = sum g * xhat,
// then dz (through the batch statistics in training) into dzrow = dZ_k[r, :].
template <typename scalar_t, typename acc_t>
void bn_relu_backward_row(const ReductionArgs<acc_t>& a, int64_t k, int64_t r, const scalar_t* go,
                          const acc_t* z, const acc_t* mean, const acc_t* var, acc_t* dzrow,
                          acc_t* dbn_weight, acc_t* dbn_bias) {
  const int64_t s = a.pb->sizes[k] * a.pb->sizes[k], kr = k * a.R + r, m = a.N * s;
  const BnAffine<acc_t> bn = bn_affine(a.bn_weight[kr], a.bn_bias[kr], mean[kr], var[kr], a.eps);
  acc_t sum_g = 0, sum_gx = 0;
  for (int64_t n = 0; n < a.N; ++n) {  // pass 1: masked grad (kept in dzrow) and its two sums
    const int64_t base = (n * a.R + r) * a.S + a.pb->offsets[k];
    for (int64_t q = 0; q < s; ++q) {
      const acc_t zv = z[base + q];
      const acc_t g = zv * bn.scale + bn.shift > acc_t(0) ? static_cast<acc_t>(go[base + q]) : acc_t(0);
      dzrow[n * s + q] = g;
      sum_g += g;
      sum_gx += g * ((zv - mean[kr]) * bn.invstd);
    }
  }
  dbn_bias[r] = sum_g;
  dbn_weight[r] = sum_gx;
  const acc_t gi = a.bn_weight[kr] * bn.invstd;
  if (!a.training) {
    for (int64_t e = 0; e < m; ++e) dzrow[e] = dzrow[e] * gi;
    return;
  }
  const acc_t mean_g = sum_g / static_cast<acc_t>(m), mean_gx = sum_gx / static_cast<acc_t>(m);
  for (int64_t n = 0; n < a.N; ++n) {  // pass 2: dz through the batch statistics
    const int64_t base = (n * a.R + r) * a.S + a.pb->offsets[k];
    for (int64_t q = 0; q < s; ++q) {
      const acc_t xhat = (z[base + q] - mean[kr]) * bn.invstd;
      acc_t& d = dzrow[n * s + q];
      d = gi * (d - mean_g - xhat * mean_gx);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduction_conv_bn_relu(
    const at::Tensor& pooled, const std::vector<at::Tensor>& conv_weights,
    const std::vector<at::Tensor>& bn_weights, const std::vector<at::Tensor>& bn_biases,
    const std::vector<at::Tensor>& running_means, const std::vector<at::Tensor>& running_vars,
    const std::vector<int64_t>& bins, bool training, double eps) {
  at::NoGradGuard no_grad;  // explicit gradients; never record the ATen ops used here
  const PackedBins pb = packed_bins(bins);
  check_packed(pooled, "pooled", pb);
  const int64_t N = pooled.size(0), C = pooled.size(1), S = pb.total, nb = pb.count();
  const int64_t R = check_weights(conv_weights, pb, C);
  const at::ScalarType acc = acc_dtype(pooled.scalar_type());
  const at::Tensor bn_weight = stack_params(bn_weights, "bn_weights", pb, R, acc);
  const at::Tensor bn_bias = stack_params(bn_biases, "bn_biases", pb, R, acc);
  const auto acc_opts = pooled.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor mean = training ? at::empty({nb, R}, acc_opts) : stack_params(running_means, "running_means", pb, R, acc);
  at::Tensor var = training ? at::empty({nb, R}, acc_opts) : stack_params(running_vars, "running_vars", pb, R, acc);
  at::Tensor z = at::empty({N, R, S}, acc_opts);
  at::Tensor out = at::empty({N, R, S}, pooled.options().memory_format(at::MemoryFormat::Contiguous));

  // GEMMs: Z_k [R, N*s] = W_k [R, C] @ P_k [C, N*s], in the accumulation dtype.
  const at::Tensor p_cns = pooled.to(acc).permute({1, 0, 2});
  std::vector<at::Tensor> zk;
  for (int64_t k = 0; k < nb; ++k) {
    zk.push_back(fixed_order_mm(conv_weights[k].to(acc).reshape({R, C}), bin_columns(p_cns, pb, k)));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "psp_reduction_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReductionArgs<acc_t> a{&pb, N, R, S, bn_weight.const_data_ptr<acc_t>(), bn_bias.const_data_ptr<acc_t>(),
                               eps, training};
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    acc_t* zp = z.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // One item per (bin k, channel r); an item owns mean/var[k, r] and its z/out cells.
    at::parallel_for(0, nb * R, grain_for(N * S / nb), [&](int64_t begin, int64_t end) {
      for (int64_t kr = begin; kr < end; ++kr) {
        const int64_t k = kr / R, r = kr % R, m = N * pb.sizes[k] * pb.sizes[k];
        bn_relu_forward_row<scalar_t, acc_t>(a, k, r, zk[k].const_data_ptr<acc_t>() + r * m, mp, vp, zp, op);
      }
    });
  });
  return {out, z, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduction_conv_bn_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& pooled, const at::Tensor& z_in,
    const std::vector<at::Tensor>& conv_weights, const std::vector<at::Tensor>& bn_weights,
    const std::vector<at::Tensor>& bn_biases, const at::Tensor& mean_in, const at::Tensor& var_in,
    const std::vector<int64_t>& bins, bool training, double eps) {
  at::NoGradGuard no_grad;
  const PackedBins pb = packed_bins(bins);
  check_packed(pooled, "pooled", pb);
  check_packed(grad_out, "grad_out", pb);
  check_packed(z_in, "bn_input", pb);
  const int64_t N = pooled.size(0), C = pooled.size(1), S = pb.total, nb = pb.count();
  const int64_t R = check_weights(conv_weights, pb, C);
  const at::ScalarType acc = acc_dtype(pooled.scalar_type());
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == R && z_in.size(0) == N && z_in.size(1) == R,
              "psp_kernels: grad_out and bn_input must be [N, R, S] = [", N, ", ", R, ", ", S, "], got ",
              grad_out.sizes(), " and ", z_in.sizes());
  TORCH_CHECK(z_in.scalar_type() == acc, "psp_kernels: bn_input must be in the accumulation dtype ", acc,
              ", got ", z_in.scalar_type());
  TORCH_CHECK(mean_in.numel() == nb * R && var_in.numel() == nb * R, "psp_kernels: mean and var must be [",
              nb, ", ", R, "], got ", mean_in.sizes(), " and ", var_in.sizes());
  const at::Tensor bn_weight = stack_params(bn_weights, "bn_weights", pb, R, acc);
  const at::Tensor bn_bias = stack_params(bn_biases, "bn_biases", pb, R, acc);
  const at::Tensor mean = mean_in.to(acc).contiguous(), var = var_in.to(acc).contiguous();
  const at::Tensor z = z_in.contiguous();
  TORCH_CHECK(grad_out.scalar_type() == pooled.scalar_type(), "psp_kernels: grad_out must have pooled's dtype ",
              pooled.scalar_type(), ", got ", grad_out.scalar_type());
  const at::Tensor go = grad_out.contiguous();
  const auto acc_opts = pooled.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);

  std::vector<at::Tensor> dz;
  for (int64_t k = 0; k < nb; ++k) dz.push_back(at::empty({R, N * pb.sizes[k] * pb.sizes[k]}, acc_opts));
  at::Tensor grad_bn_weight = at::empty({nb, R}, acc_opts), grad_bn_bias = at::empty({nb, R}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "psp_reduction_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReductionArgs<acc_t> a{&pb, N, R, S, bn_weight.const_data_ptr<acc_t>(), bn_bias.const_data_ptr<acc_t>(),
                               eps, training};
    // One item per (bin k, channel r); an item owns dz_k[r, :], grad_bn_weight[k][r], grad_bn_bias[k][r].
    at::parallel_for(0, nb * R, grain_for(N * S / nb), [&](int64_t begin, int64_t end) {
      for (int64_t kr = begin; kr < end; ++kr) {
        const int64_t k = kr / R, r = kr % R;
        bn_relu_backward_row<scalar_t, acc_t>(
            a, k, r, go.const_data_ptr<scalar_t>(), z.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
            var.const_data_ptr<acc_t>(), dz[k].data_ptr<acc_t>() + r * dz[k].size(1),
            grad_bn_weight.data_ptr<acc_t>() + k * R, grad_bn_bias.data_ptr<acc_t>() + k * R);
      }
    });
  });

  // GEMMs per bin: grad P_k = W_k^T @ dZ_k (formed transposed, B = W_k's contiguous rows) and
  // grad W_k [R, C] = dZ_k @ P_k^T.
  const at::Tensor p_cns = pooled.to(acc).permute({1, 0, 2});
  at::Tensor grad_pooled = at::empty({N, C, S}, pooled.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_w = at::empty({nb, R, C}, acc_opts);
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t s = pb.sizes[k] * pb.sizes[k];
    const at::Tensor w = conv_weights[k].to(acc).reshape({R, C});
    const at::Tensor gpt = fixed_order_mm(dz[k].t(), w);  // grad P_k^T [N*s, C] = dZ_k^T @ W_k
    grad_pooled.narrow(2, pb.offsets[k], s).copy_(gpt.view({N, s, C}).permute({0, 2, 1}));
    grad_w[k].copy_(fixed_order_mm(dz[k], bin_columns(p_cns, pb, k).t()));
  }
  return {grad_pooled, grad_w, grad_bn_weight, grad_bn_bias};
}

