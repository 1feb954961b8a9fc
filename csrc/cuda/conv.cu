// Backbone convolution with its inference epilogue on CUDA, built on CUTLASS's implicit-GEMM convolution
// (CUTLASS 2.x API, sm_80 tensor cores, also run on sm_90): psp::folded_conv, the contract of
// psp_kernels/reference.py and psp_kernels/triton/conv.py:
//
//   out = relu?(conv2d(x, weight) + bias + residual?)      (BatchNorm folded into weight and bias)
//
// x, weight, residual and out are channels_last (NHWC / KRSC); fp16 and bf16 with fp32 accumulation; the
// epilogue (LinearCombinationBiasElementwise: alpha * acc + beta * residual + bias, then ReLU or identity)
// runs on the accumulator tile before the single store, so out is written once. Other inputs (fp32/fp64,
// NCHW, channel counts not multiples of 8, no bias, a residual of another dtype, pointers not 16-byte
// aligned) raise NotImplementedError, which the kernel table (psp_kernels/dispatch.py) takes as "not this
// candidate" and runs the next one. No split-K: every output element is written by one thread block,
// deterministically. Runs on the tensors' device and its current stream.
#include "common.cuh"

#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/epilogue/thread/linear_combination_bias_elementwise.h>
#include <cutlass/numeric_types.h>

namespace psp::cuda {
namespace {

constexpr int kAlignment = 8;  // 8 x 16-bit = 128-bit accesses: C and O must be multiples of 8

template <typename Element, bool Relu>
struct ConvBiasAct {
  using Layout = cutlass::layout::TensorNHWC;
  using Activation = std::conditional_t<Relu, cutlass::epilogue::thread::ReLu<float>,
                                        cutlass::epilogue::thread::Identity<float>>;
  // Z = Activation(alpha * acc + beta * C + V): C the residual (beta = 0 without one), V the bias (fp32).
  using Epilogue = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
      Element, float, float, Element, Element, kAlignment, Activation, cutlass::plus<float>,
      /*StoreT=*/false, /*ElementVector=*/float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      Element, Layout, Element, Layout, Element, Layout, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 64, 64>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>,
      3, cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided, kAlignment, kAlignment>::Kernel;
  using Conv = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

template <typename Element, bool Relu>
void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
         const at::Tensor& out, const cutlass::conv::Conv2dProblemSize& problem) {
  using Op = ConvBiasAct<Element, Relu>;
  using Layout = typename Op::Layout;
  auto nhwc = [](const at::Tensor& t) {
    return Layout::packed({static_cast<int>(t.size(0)), static_cast<int>(t.size(2)), static_cast<int>(t.size(3)),
                           static_cast<int>(t.size(1))});
  };
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<Element*>(t.data_ptr()); };
  const bool has_res = residual.has_value();
  typename Op::Conv::Arguments args(
      problem, {ptr(x), nhwc(x)}, {ptr(weight), nhwc(weight)},
      {has_res ? ptr(*residual) : ptr(out), nhwc(out)}, {ptr(out), nhwc(out)},
      {1.0f, has_res ? 1.0f : 0.0f}, cutlass::conv::SplitKMode::kSerial, bias.data_ptr<float>(), nullptr, 0, 0);
  typename Op::Conv conv;
  TORCH_CHECK_NOT_IMPLEMENTED(conv.can_implement(args) == cutlass::Status::kSuccess,
                              "psp_kernels (CUDA folded_conv): CUTLASS cannot run this problem");
  auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(conv.initialize(args, nullptr, stream) == cutlass::Status::kSuccess,
              "psp_kernels (CUDA folded_conv): CUTLASS initialisation failed");
  TORCH_CHECK(conv(stream) == cutlass::Status::kSuccess, "psp_kernels (CUDA folded_conv): CUTLASS launch failed");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether a tensor's data starts on a `bytes` boundary (the vector loads and stores CUTLASS issues).
bool aligned(const at::Tensor& t, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % bytes == 0;
}

}  // namespace

at::Tensor folded_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, int64_t dilation,
                       bool relu) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK_NOT_IMPLEMENTED(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                              "psp_kernels (CUDA folded_conv): only float16/bfloat16");
  TORCH_CHECK_NOT_IMPLEMENTED(bias.has_value(), "psp_kernels (CUDA folded_conv): needs a bias");
  TORCH_CHECK_NOT_IMPLEMENTED(x.is_contiguous(cl) && x.size(1) % kAlignment == 0 && weight.size(0) % kAlignment == 0,
                              "psp_kernels (CUDA folded_conv): needs channels_last x with C and O multiples of 8");
  TORCH_CHECK_NOT_IMPLEMENTED(
      !residual.has_value() || (residual->is_contiguous(cl) && residual->scalar_type() == x.scalar_type()),
      "psp_kernels (CUDA folded_conv): needs a channels_last residual of x's dtype");
  TORCH_CHECK_NOT_IMPLEMENTED(aligned(x, 16) && (!residual.has_value() || aligned(*residual, 16)),
                              "psp_kernels (CUDA folded_conv): needs x and the residual 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor w = weight.to(x.scalar_type()).contiguous(cl);
  if (!aligned(w, 16)) w = w.clone(cl);     // a fresh allocation is aligned
  at::Tensor b = bias->to(at::kFloat).contiguous();
  if (!aligned(b, 32)) b = b.clone();       // read as 8-float vectors
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), o = w.size(0), k = w.size(2);
  const int64_t ho = (h + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
  const int64_t wo = (wd + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
  at::Tensor out = at::empty({n, o, ho, wo}, x.options().memory_format(cl));
  const auto i32 = [](int64_t v) { return static_cast<int>(v); };
  cutlass::conv::Conv2dProblemSize problem(
      i32(n), i32(h), i32(wd), i32(c), i32(o), i32(k), i32(k), i32(ho), i32(wo), i32(padding), i32(padding),
      i32(stride), i32(stride), i32(dilation), i32(dilation), cutlass::conv::Mode::kCrossCorrelation, 1, 1);
  const at::Tensor xc = x.contiguous(cl);
  if (x.scalar_type() == at::kHalf) {
    relu ? run<cutlass::half_t, true>(xc, w, b, residual, out, problem)
         : run<cutlass::half_t, false>(xc, w, b, residual, out, problem);
  } else {
    relu ? run<cutlass::bfloat16_t, true>(xc, w, b, residual, out, problem)
         : run<cutlass::bfloat16_t, false>(xc, w, b, residual, out, problem);
  }
  return out;
}

}  // namespace psp::cuda

TORCH_LIBRARY_IMPL(psp_native, CUDA, m) { m.impl("folded_conv", &psp::cuda::folded_conv); }
