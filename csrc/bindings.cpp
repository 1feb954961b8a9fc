// Python bindings of the compiled backend (psp_kernels._C): the six functions of
// psp_kernels/reference.py with the same names, argument names and order, and results.
// bins: a sequence of ints; per-bin parameters: lists of tensors; list results come back as lists.
// Built with CUDA (PSP_WITH_CUDA), the submodule psp_kernels._C.cuda holds the same six functions for
// CUDA tensors plus the reference's fused-pass variants (pool_concat_forward, upsample_into,
// pool_backward_add).
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused pyramid pooling module (PPM) kernels for PSPNet: CPU backend (see psp_kernels.reference).";

  m.def("pool_forward", &psp::cpu::pool_forward, kPoolForwardDoc, py::arg("x"), py::arg("bins"));
  m.def("pool_backward", &psp::cpu::pool_backward, kPoolBackwardDoc, py::arg("grad_pooled"), py::arg("bins"),
        py::arg("height"), py::arg("width"), py::arg("channels_last"));
  m.def("project_forward", &psp::cpu::project_forward, kProjectForwardDoc, py::arg("pooled"), py::arg("weights"),
        py::arg("gammas"), py::arg("betas"), py::arg("running_means"), py::arg("running_vars"), py::arg("bins"),
        py::arg("training"), py::arg("eps"));
  m.def("project_backward", &psp::cpu::project_backward, kProjectBackwardDoc, py::arg("grad_out"),
        py::arg("pooled"), py::arg("z"), py::arg("weights"), py::arg("gammas"), py::arg("betas"), py::arg("mean"),
        py::arg("var"), py::arg("bins"), py::arg("training"), py::arg("eps"));
  m.def("upsample_forward", &psp::cpu::upsample_forward, kUpsampleForwardDoc, py::arg("x"), py::arg("branches"),
        py::arg("bins"));
  m.def("upsample_backward", &psp::cpu::upsample_backward, kUpsampleBackwardDoc, py::arg("grad_out"),
        py::arg("bins"), py::arg("channels"));

#ifdef PSP_WITH_CUDA
  py::module_ cu = m.def_submodule(
      "cuda", "Fused PPM kernels for CUDA tensors: the CPU backend's functions plus the fused-pass variants.");
  cu.def("pool_forward", &psp::cuda::pool_forward, kPoolForwardDoc, py::arg("x"), py::arg("bins"));
  cu.def("pool_backward", &psp::cuda::pool_backward, kPoolBackwardDoc, py::arg("grad_pooled"), py::arg("bins"),
         py::arg("height"), py::arg("width"), py::arg("channels_last"));
  cu.def("project_forward", &psp::cuda::project_forward, kProjectForwardDoc, py::arg("pooled"),
         py::arg("weights"), py::arg("gammas"), py::arg("betas"), py::arg("running_means"),
         py::arg("running_vars"), py::arg("bins"), py::arg("training"), py::arg("eps"));
  cu.def("project_backward", &psp::cuda::project_backward, kProjectBackwardDoc, py::arg("grad_out"),
         py::arg("pooled"), py::arg("z"), py::arg("weights"), py::arg("gammas"), py::arg("betas"),
         py::arg("mean"), py::arg("var"), py::arg("bins"), py::arg("training"), py::arg("eps"));
  cu.def("upsample_forward", &psp::cuda::upsample_forward, kUpsampleForwardDoc, py::arg("x"),
         py::arg("branches"), py::arg("bins"));
  cu.def("upsample_backward", &psp::cuda::upsample_backward, kUpsampleBackwardDoc, py::arg("grad_out"),
         py::arg("bins"), py::arg("channels"));
  cu.def("pool_concat_forward", &psp::cuda::pool_concat_forward,
         "pool_forward that also allocates the concat [N, total_channels, H, W] (x's memory format) and "
         "copies x into its first C channels in the same read; returns (pooled, concat).",
         py::arg("x"), py::arg("bins"), py::arg("total_channels"));
  cu.def("upsample_into", &psp::cuda::upsample_into,
         "Writes every branch, upsampled bilinearly (align_corners=True), into concat[:, channels:] in place.",
         py::arg("concat"), py::arg("branches"), py::arg("bins"), py::arg("channels"));
  cu.def("pool_backward_add", &psp::cuda::pool_backward_add,
         "residual + pool_backward(grad_pooled, ...), summed in the accumulation dtype and rounded once; "
         "residual may be a channel-slice view (NCHW or channels_last).",
         py::arg("grad_pooled"), py::arg("bins"), py::arg("residual"), py::arg("channels_last"));
#endif
}
