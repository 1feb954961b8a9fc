// Python bindings of the compiled backend (psp_kernels._C): the six functions of
// psp_kernels/reference.py with the same names, argument names and order, and results.
// bins: a sequence of ints; per-bin parameters: lists of tensors; list results come back as lists.
#include <torch/extension.h>

#include "cpu/ppm_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused pyramid pooling module (PPM) kernels for PSPNet: CPU backend (see psp_kernels.reference).";

  m.def("pool_forward", &psp::cpu::pool_forward,
        "Adaptive average pooling of x [N, C, H, W] to every bin in one pass; packed pooled [N, C, S].",
        py::arg("x"), py::arg("bins"));
  m.def("pool_backward", &psp::cpu::pool_backward,
        "Gradient of pool_forward: grad_x [N, C, H, W] (channels_last when asked), a gather.",
        py::arg("grad_pooled"), py::arg("bins"), py::arg("height"), py::arg("width"),
        py::arg("channels_last"));
  m.def("project_forward", &psp::cpu::project_forward,
        "Per bin 1x1 conv + BatchNorm + ReLU on the packed pooled tensor; returns (out, z, mean, var).",
        py::arg("pooled"), py::arg("weights"), py::arg("gammas"), py::arg("betas"),
        py::arg("running_means"), py::arg("running_vars"), py::arg("bins"), py::arg("training"),
        py::arg("eps"));
  m.def("project_backward", &psp::cpu::project_backward,
        "Gradient of project_forward; returns (grad_pooled, [grad_w], [grad_gamma], [grad_beta]).",
        py::arg("grad_out"), py::arg("pooled"), py::arg("z"), py::arg("weights"), py::arg("gammas"),
        py::arg("betas"), py::arg("mean"), py::arg("var"), py::arg("bins"), py::arg("training"),
        py::arg("eps"));
  m.def("upsample_forward", &psp::cpu::upsample_forward,
        "Concat of x and every branch upsampled bilinearly (align_corners=True); x's memory format.",
        py::arg("x"), py::arg("branches"), py::arg("bins"));
  m.def("upsample_backward", &psp::cpu::upsample_backward,
        "Gradient of upsample_forward w.r.t. the packed branches [N, R, S].",
        py::arg("grad_out"), py::arg("bins"), py::arg("channels"));
}
