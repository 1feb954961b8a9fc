// Bilinear upsampling (align_corners=True) of every branch + concat with x (psp::upsample_concat), and
// its gradient w.r.t. the packed branches, on CPU.
//
// Forward writes the [N, C + nb*R, H, W] output in one pass: x's channels are copied and every
// branch channel is interpolated from its b x b cells with ATen's per-pixel operation order
//   out = lh0 * (lw0 * v[i0, j0] + lw1 * v[i0, j1]) + lh1 * (lw0 * v[i1, j0] + lw1 * v[i1, j1]).
// NCHW: one task item per output plane (n, channel); the bracketed horizontal interpolations of
// the b source rows are formed once per plane (U[i][w]) and combined per output row (vectorisable
// over w). channels_last: one item per output row (n, h), so each pixel's channel vector (x's C
// values, then bins in order, R each) is written contiguously. Same values in both layouts.
//
// Backward is the transposed, separable interpolation per (n, bin, r): grad rows are first spread
// vertically onto the b source rows (V[i][w] += lh * g[h][w], h ascending), then each V row is
// reduced horizontally onto its b cells (w ascending). Fixed order, no atomics, the same per-lane
// order in both layouts (NCHW: item (n, k, r); channels_last: item (n, k, block of channels)).
#include "common.h"
#include "isa.h"

#include <cstring>

#define PSP_CPU_KERNELS "upsample_kernels.h"
#include "isa_variants.h"
#undef PSP_CPU_KERNELS

TORCH_LIBRARY_IMPL(psp_native, CPU, m) {
  PSP_CPU_IMPL(m, upsample_concat);
  PSP_CPU_IMPL(m, upsample_concat_backward);
  PSP_CPU_IMPL(m, upsample_into);
}
