// Python bindings of the compiled backend (psp_kernels._C): the six functions of
// psp_kernels/reference.py and its three fused-pass variants, with the same names, argument names and
// order, and results.
// bins: a sequence of ints; per-bin parameters: lists of tensors; list results come back as lists.
// Built with CUDA (PSP_WITH_CUDA), the submodule psp_kernels._C.cuda holds the same nine functions for
// CUDA tensors. The concat-free head's epilogue (head_forward, head_backward) is CPU only.
#include <torch/extension.h>

#include "cpu/ppm_cpu.h"
#ifdef PSP_WITH_CUDA
#include "cuda/ppm_cuda.h"
#endif

namespace py = pybind11;

namespace {

// Docstrings shared by the CPU and CUDA bindings.
constexpr const char* kPoolForwardDoc =
    "Adaptive average pooling of x [N, C, H, W] to every bin in one pass; packed pooled [N, C, S].";
constexpr const char* kPoolBackwardDoc =
    "Gradient of pool_forward: grad_x [N, C, H, W] (channels_last when asked), a gather.";
constexpr const char* kProjectForwardDoc =
    "Per bin 1x1 conv + BatchNorm + ReLU on the packed pooled tensor; returns (out, z, mean, var).";
constexpr const char* kProjectBackwardDoc =
    "Gradient of project_forward; returns (grad_pooled, [grad_w], [grad_gamma], [grad_beta]).";
constexpr const char* kUpsampleForwardDoc =
    "Concat of x and every branch upsampled bilinearly (align_corners=True); x's memory format.";
constexpr const char* kUpsampleBackwardDoc = "Gradient of upsample_forward w.r.t. the packed branches [N, R, S].";
constexpr const char* kPoolConcatForwardDoc =
    "pool_forward that also allocates the concat [N, total_channels, H, W] (x's memory format) and copies x "
    "into its first C channels in the same read; returns (pooled, concat).";
constexpr const char* kUpsampleIntoDoc =
    "Writes every branch, upsampled bilinearly (align_corners=True), into concat[:, channels:] in place.";
constexpr const char* kPoolBackwardAddDoc =
    "residual + pool_backward(grad_pooled, ...), summed in the accumulation dtype and rounded once; residual "
    "may be a channel-slice view (NCHW or channels_last).";
constexpr const char* kConvBiasActDoc =
    "conv_bias_act(x: channels_last fp16/bf16 [N, C, H, W], weight: [O, C, k, k], bias: [O], residual: "
    "[N, O, Ho, Wo] or None, stride: int, padding: int, dilation: int, relu: bool) -> relu?(conv2d(x, weight) + "
    "bias + residual?) in x's dtype, channels_last (CUTLASS implicit GEMM, fp32 accumulation); raises "
    "NotImplementedError for inputs it does not cover (fp32/fp64, NCHW, C or O not multiples of 8).";
constexpr const char* kHeadForwardDoc =
    "relu(bn(y + u @ bw^T)) of the concat-free head (y NCHW or channels_last, u [N, O, H, K] and bw [W, K] in "
    "the accumulation dtype); returns (out, z, mean, var), z empty unless keep_z or training.";
constexpr const char* kHeadBackwardDoc =
    "Gradient of head_forward; returns (grad_y, grad_u = grad_z @ bw, grad_bn [2, O] = (grad_gamma, grad_beta)).";

}  // namespace

// Binds the nine backend functions of namespace NS (psp::cpu or psp::cuda) into module MOD: one list for
// both backends, so their Python signatures cannot drift apart.
#define PSP_BIND_BACKEND(MOD, NS)                                                                              \
  MOD.def("pool_forward", &NS::pool_forward, kPoolForwardDoc, py::arg("x"), py::arg("bins"));                    \
  MOD.def("pool_backward", &NS::pool_backward, kPoolBackwardDoc, py::arg("grad_pooled"), py::arg("bins"),        \
          py::arg("height"), py::arg("width"), py::arg("channels_last"));                                      \
  MOD.def("project_forward", &NS::project_forward, kProjectForwardDoc, py::arg("pooled"), py::arg("weights"),    \
          py::arg("gammas"), py::arg("betas"), py::arg("running_means"), py::arg("running_vars"),              \
          py::arg("bins"), py::arg("training"), py::arg("eps"));                                               \
  MOD.def("project_backward", &NS::project_backward, kProjectBackwardDoc, py::arg("grad_out"),                   \
          py::arg("pooled"), py::arg("z"), py::arg("weights"), py::arg("gammas"), py::arg("betas"),            \
          py::arg("mean"), py::arg("var"), py::arg("bins"), py::arg("training"), py::arg("eps"));              \
  MOD.def("upsample_forward", &NS::upsample_forward, kUpsampleForwardDoc, py::arg("x"), py::arg("branches"),     \
          py::arg("bins"));                                                                                    \
  MOD.def("upsample_backward", &NS::upsample_backward, kUpsampleBackwardDoc, py::arg("grad_out"),                \
          py::arg("bins"), py::arg("channels"));                                                               \
  MOD.def("pool_concat_forward", &NS::pool_concat_forward, kPoolConcatForwardDoc, py::arg("x"), py::arg("bins"), \
          py::arg("total_channels"));                                                                          \
  MOD.def("upsample_into", &NS::upsample_into, kUpsampleIntoDoc, py::arg("concat"), py::arg("branches"),         \
          py::arg("bins"), py::arg("channels"));                                                               \
  MOD.def("pool_backward_add", &NS::pool_backward_add, kPoolBackwardAddDoc, py::arg("grad_pooled"),              \
          py::arg("bins"), py::arg("residual"), py::arg("channels_last"))

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused pyramid pooling module (PPM) kernels for PSPNet: CPU backend (see psp_kernels.reference).";
  PSP_BIND_BACKEND(m, psp::cpu);
  m.def("head_forward", &psp::cpu::head_forward, kHeadForwardDoc, py::arg("y"), py::arg("u"), py::arg("bw"),
        py::arg("gamma"), py::arg("beta"), py::arg("running_mean"), py::arg("running_var"), py::arg("training"),
        py::arg("eps"), py::arg("keep_z"));
  m.def("head_backward", &psp::cpu::head_backward, kHeadBackwardDoc, py::arg("grad_out"), py::arg("z"),
        py::arg("bw"), py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("var"), py::arg("training"),
        py::arg("eps"));
#ifdef PSP_WITH_CUDA
  py::module_ cu = m.def_submodule(
      "cuda", "Fused PPM kernels for CUDA tensors: the same functions as the CPU backend.");
  PSP_BIND_BACKEND(cu, psp::cuda);
  cu.def("conv_bias_act", &psp::cuda::conv_bias_act, kConvBiasActDoc, py::arg("x"), py::arg("weight"),
         py::arg("bias"), py::arg("residual"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
         py::arg("relu"));
#endif
}
