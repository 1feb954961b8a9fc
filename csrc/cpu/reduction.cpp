// Every bin's 1x1 reduction conv + BatchNorm + ReLU on the packed pooled tensor (psp::reduction_conv_bn_relu)
// and its gradient, on CPU.
//
// The 1x1 convs are GEMMs on tiny operands: the packed pooled [N, C, S] is converted to the
// accumulation type and viewed as [C, N, S]; bin k's columns become P_k [C, N*s] (s = b*b) and
// Z_k = W_k [R, C] @ P_k (an own fixed-order GEMM, gemm.h). Everything per
// BatchNorm channel -- batch statistics (two-pass mean and biased variance over the N*s values),
// normalise + ReLU, and the BN + ReLU backward -- is an own loop over the contiguous row Z_k[r, :],
// one task item per (bin, channel), so each statistic has a fixed summation order independent of
// the thread count.
#include "common.h"
#include "isa.h"
#include "../bn_affine.h"
#include "gemm.h"

#include <cmath>
#include <cstring>

#define PSP_CPU_KERNELS "reduction_kernels.h"
#include "isa_variants.h"
#undef PSP_CPU_KERNELS

TORCH_LIBRARY_IMPL(psp_native, CPU, m) {
  PSP_CPU_IMPL(m, reduction_conv_bn_relu);
  PSP_CPU_IMPL(m, reduction_conv_bn_relu_backward);
}
