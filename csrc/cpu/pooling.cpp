// Multi-bin adaptive average pooling (psp::multibin_avg_pool) and its gradient on CPU.
//
// Both axes are cut into elementary segments (common.h: AxisSegments): every bin window is a run
// of whole segments, so the plane is a grid of blocks (row segment x column segment) and
//   forward:  one pass over x: the rows of each row segment are summed into one L1-resident row
//             (each element read and added once, vectorised along the row), which is cut into its
//             column-segment block sums; every bin cell then sums the blocks of its window (column
//             windows first, then the row windows containing each row segment -- windows overlap
//             when H % b != 0, b > H repeats rows) and is divided by the window area.
//   backward: grad_x[h, w] = sum_k sum_{cells (i, j) of bin k containing (h, w)} g[i, j] / area(i, j)
//             is constant on a block: computed once per block (gather, the transpose of the forward
//             combination) and written to every element of the block -- one write of grad_x.
// Parallel decomposition: NCHW -- one task item per (n, c) plane; channels_last -- one item per
// (n, block of kChannelBlock channels), every pixel a contiguous channel vector. Each item owns its
// outputs; NCHW and channels_last use the same per-lane reduction order (bitwise equal results).
// Fused variants: the forward can copy the x it reads into the first C channels of the PPM's concat
// buffer (multibin_avg_pool_with_concat), the backward can add a pass-through gradient while it writes
// grad_x (multibin_avg_pool_backward_add), each in the same pass.
#include "common.h"
#include "isa.h"

#include <cstring>

#define PSP_CPU_KERNELS "pooling_kernels.h"
#include "isa_variants.h"
#undef PSP_CPU_KERNELS

TORCH_LIBRARY_IMPL(psp_native, CPU, m) {
  PSP_CPU_IMPL(m, multibin_avg_pool);
  PSP_CPU_IMPL(m, multibin_avg_pool_backward);
  PSP_CPU_IMPL(m, multibin_avg_pool_with_concat);
  PSP_CPU_IMPL(m, multibin_avg_pool_backward_add);
}
