// Backbone convolution with its inference epilogue on CPU (psp::folded_conv, contract:
// psp_kernels/reference.py): relu?(conv2d(x, weight, bias) + residual?), BatchNorm folded into weight and
// bias, rounded once to x's dtype in x's memory format. The backward is ATen's convolution backward
// (psp_kernels/eager.py: folded_conv_backward).
//
//   fp32 / fp64   oneDNN's (fp64: ATen's) convolution in the accumulation dtype, then the residual add and
//                 the ReLU in place on its output.
//   bf16          oneDNN's bf16 convolution with the epilogue as its post-ops (ATen's
//                 mkldnn::_convolution_pointwise, the primitive torch.compile's CPU conv fusions call):
//                 products of bf16 operands are exact in fp32, accumulated in fp32 with the bias, the residual
//                 and the ReLU applied in fp32, rounded once to bf16 -- the same contract at bf16 speed (AVX512-
//                 BF16 / AMX). The weight and bias are rounded to bf16 first, as autocast does for conv2d.
//                 Used where oneDNN runs bf16 natively (mkldnn::_is_mkldnn_bf16_supported), else the fp32 path.
//                 NCHW with a residual applies the ReLU after the primitive (oneDNN's NCHW add + ReLU post-op
//                 falls back to an ATen kernel without bf16); ReLU commutes with rounding, so still one rounding.
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>

namespace psp::cpu {
namespace {

using Scalars = c10::List<std::optional<at::Scalar>>;

bool onednn_bf16() {
  static const bool supported = [] {
    if (!at::hasMKLDNN()) return false;
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    return op.has_value() && op->typed<bool()>().call();
  }();
  return supported;
}

at::Tensor onednn_conv_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding,
                            int64_t dilation, bool relu) {
  const std::vector<int64_t> pad{padding, padding}, str{stride, stride}, dil{dilation, dilation};
  const bool cl = layout_of(x) == Layout::NHWC;
  const at::Tensor w = weight.to(at::kBFloat16).contiguous(memory_format(layout_of(x)));
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->to(at::kBFloat16)) : std::nullopt;
  at::Tensor y;
  if (residual) {
    static auto binary = c10::Dispatcher::singleton()
        .findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, std::string_view,
                          std::optional<at::Scalar>, std::optional<std::string_view>, Scalars,
                          std::optional<std::string_view>)>();
    const at::Tensor other = residual->to(at::kBFloat16).contiguous(memory_format(layout_of(x)));
    const bool fuse_relu = relu && cl;
    y = binary.call(x, other, w, b, pad, str, dil, 1, "add", std::nullopt,
                    fuse_relu ? std::optional<std::string_view>("relu") : std::nullopt, Scalars(), std::nullopt);
    if (relu && !fuse_relu) y.relu_();
  } else {
    static auto unary = c10::Dispatcher::singleton()
        .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                          at::IntArrayRef, at::IntArrayRef, int64_t, std::string_view, Scalars,
                          std::optional<std::string_view>)>();
    y = unary.call(x, w, b, pad, str, dil, 1, relu ? "relu" : "none", Scalars(), std::nullopt);
  }
  return y.contiguous(memory_format(layout_of(x)));
}

}  // namespace

at::Tensor folded_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, int64_t dilation,
                       bool relu) {
  at::NoGradGuard no_grad;
  check_input(x, "x", 4);
  check_input(weight, "weight", 4);
  if (residual) check_input(*residual, "residual", 4);
  if (x.scalar_type() == at::kBFloat16 && onednn_bf16()) {
    return onednn_conv_bf16(kernel_layout(x), weight, bias, residual, stride, padding, dilation, relu);
  }
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const std::optional<at::Tensor> bias_acc = bias ? std::optional<at::Tensor>(bias->to(acc)) : std::nullopt;
  at::Tensor y = at::conv2d(x.to(acc), weight.to(acc), bias_acc, {stride, stride}, {padding, padding},
                            {dilation, dilation});
  if (residual) {
    TORCH_CHECK(residual->sizes() == y.sizes(), "psp_kernels: residual must have the conv output's shape ",
                y.sizes(), ", got ", residual->sizes());
    y.add_(*residual);
  }
  if (relu) y.relu_();
  return y.to(x.scalar_type()).contiguous(memory_format(layout_of(x)));
}

}  // namespace psp::cpu

TORCH_LIBRARY_IMPL(psp_native, CPU, m) { m.impl("folded_conv", &psp::cpu::folded_conv); }
