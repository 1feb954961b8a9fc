// The concat-free head's epilogue on CPU (psp::add_branch_bn_relu and its backward, contract:
// psp_kernels/reference.py): the branch term's last interpolation along W, its add to the x-half conv
// output, BatchNorm and ReLU, and the gradient of all that. Below y is the conv output (conv_out), u the
// branch rows (branch_rows), bw the W-axis interpolation weights (width_interp) and z = y + u . bw^T
// BatchNorm's input (bn_input).
//
// Per (n, o, h) row the branch term is u[n, o, h, :] . bw[w, :] (K = kw * sum(bins) taps). A task item
// is one (n, h) row and a block of kChannelBlock channels -- a "tile" of all W columns -- and computes
// its branch term as a small fixed-order GEMM into a task-local buffer (NCHW: [ob, W] = U @ bw^T;
// channels_last: [W, ob] = bw @ U^T), so neither the full-resolution branch term nor the concat exists
// in memory. Elementwise loops run along the layout's contiguous dimension (w for NCHW, o for
// channels_last) and vectorise.
//
//   forward, eval        tiles: y, u -> out (and z when kept)                                 1 pass
//   forward, training    tiles: y, u -> z and the row's (mean, M2) per channel; merge rows    2 passes
//                        in ascending order (Chan et al.'s pairwise formula); tiles: z -> out
//   backward             tiles: g, z -> the row's (sum g', sum g' xhat) per channel; sum      2 passes
//                        rows in ascending order into grad_bn [2, O] = (grad_bn_weight, grad_bn_bias);
//                        tiles: g, z -> grad_y, grad_u = grad_z @ bw
//
// g' is the gradient behind the ReLU (mask z * scale + shift > 0, the forward's pre-activation).
// Determinism: every output element (z, out, grad_y, grad_u, a row partial) is written by one tile
// with a fixed loop order; per-row partials [N*H, O] are merged by channel-block items that walk the
// rows in ascending order; so results are bitwise identical for any thread count. A row's
// per-channel sums over w use one lane order in both layouts (sum_columns), and the GEMMs accumulate
// from 0 over k (w) ascending: NCHW and channels_last give the same bits.
#include "common.h"
#include "isa.h"
#include "../bn_affine.h"
#include "gemm.h"

#include <array>
#include <cstring>
#include <type_traits>

#define PSP_CPU_KERNELS "head_kernels.h"
#include "isa_variants.h"
#undef PSP_CPU_KERNELS

TORCH_LIBRARY_IMPL(psp_native, CPU, m) {
  PSP_CPU_IMPL(m, add_branch_bn_relu);
  PSP_CPU_IMPL(m, add_branch_bn_relu_backward);
}
