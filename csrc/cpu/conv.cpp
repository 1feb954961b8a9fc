// Backbone convolution with its inference epilogue on CPU (psp::folded_conv, contract:
// psp_kernels/reference.py): relu?(conv2d(x, weight, bias) + residual?), BatchNorm folded into weight and
// bias. oneDNN's convolution (through ATen) in the accumulation dtype, then the residual add and ReLU in
// place on its output, rounded once to x's dtype in x's memory format. The backward is ATen's
// convolution backward (psp_kernels/eager.py: folded_conv_backward).
#include "common.h"

#include <optional>

namespace psp::cpu {

at::Tensor folded_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, int64_t dilation,
                       bool relu) {
  at::NoGradGuard no_grad;
  check_input(x, "x", 4);
  check_input(weight, "weight", 4);
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
