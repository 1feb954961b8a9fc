"""Helpers shared by the Triton launchers and kernels: dtype maps, interpreter detection, block sizes,
:class:`CompileConfig` (the compile-only test's specialisations), the kernels' common prologues, the
BatchNorm vectors and the ordered row sum shared by the head's and the backbone convs' BatchNorm passes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..geometry import acc_dtype


TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64, torch.int32: tl.int32}
SIG_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
             torch.int32: "i32"}


def interpreting() -> bool:
    """True when kernels run in the Triton CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel must feed ``tl.dot`` fp32 instead of ``dtype`` operands.

    The interpreter computes bf16 ``tl.dot`` wrongly; the upcast is exact for the products our kernels
    form (0/1 masks, or bf16 x bf16 products that fit fp32), so it only changes the summation order.
    """
    return dtype == torch.bfloat16 and interpreting()


def conv_dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of a ``tl.dot`` that computes a convolution (the backbone convs, the PPM's 1x1
    reduction convs, the head's 3x3 conv): ``"tf32"`` exactly when the eager cuDNN convolution it replaces
    would use TF32 -- fp32 operands, a GPU tensor (``meta`` counts as one: the resource table records GPU
    launches on meta tensors) and ``torch.backends.cudnn.allow_tf32`` (PyTorch's default: True); else
    ``"ieee"`` (CPU tensors in the interpreter, the flag off). 16-bit and fp64 dots ignore it."""
    if dtype == torch.float32 and device.type != "cpu" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo) (tl.dot needs every block dim >= 16)."""
    return max(lo, triton.next_power_of_2(max(1, n)))


def acc_tl(dtype: torch.dtype):
    """Triton accumulation dtype for a storage dtype: fp64 for fp64, else fp32."""
    return TL_DTYPE[acc_dtype(dtype)]


def flat_hw_stride(t: torch.Tensor) -> int:
    """Stride of the flattened (h, w) index of a 4-D NCHW or channels_last tensor.

    Both layouts have ``stride(h) == W * stride(w)``, so element (h, w) sits at ``(h*W + w) * s_hw``;
    asserted here (size-1 dims may carry any stride).
    """
    _, _, h, w = t.shape
    if h == 1:
        return t.stride(3)
    if w == 1:
        return t.stride(2)
    assert t.stride(2) == w * t.stride(3), f"unsupported strides {t.stride()} for shape {tuple(t.shape)}"
    return t.stride(3)


def eps_args(eps: float) -> tuple[float, float]:
    """eps as two fp32 kernel arguments whose sum is eps to fp64 precision (Triton passes floats as fp32)."""
    hi = float(torch.tensor(eps, dtype=torch.float32))
    return hi, float(torch.tensor(eps - hi, dtype=torch.float32))


@triton.jit
def relu_nan(y):
    """NaN-propagating ReLU, as torch.relu: tl.maximum's default would turn a NaN into 0."""
    return tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def inv_std(var, eps, ACC_DTYPE: tl.constexpr):
    """1 / sqrt(var + eps), correctly rounded sqrt (tl.sqrt_rn is fp32-only; fp64 tl.sqrt is exact)."""
    if ACC_DTYPE == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def channel_invstd(var_ptr, offs_o, mask_o, eps_hi, eps_lo, ACC_DTYPE: tl.constexpr):
    """1 / sqrt(var + eps) of a channel block (eps passed as two fp32 halves, see :func:`eps_args`)."""
    eps = tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)
    return inv_std(tl.load(var_ptr + offs_o, mask=mask_o, other=1.0), eps, ACC_DTYPE)


@triton.jit
def bn_vectors(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, offs_o, mask_o, eps_hi, eps_lo, ACC_DTYPE: tl.constexpr):
    """(invstd, scale, shift, mean) of the channel block: BatchNorm as ``z * scale + shift``."""
    invstd = channel_invstd(var_ptr, offs_o, mask_o, eps_hi, eps_lo, ACC_DTYPE)
    bn_weight = tl.load(bn_weight_ptr + offs_o, mask=mask_o, other=0.0)
    bn_bias = tl.load(bn_bias_ptr + offs_o, mask=mask_o, other=0.0)
    mean = tl.load(mean_ptr + offs_o, mask=mask_o, other=0.0)
    scale = bn_weight * invstd
    return invstd, scale, bn_bias - mean * scale, mean


BLOCK_ROWS = 64      # partial rows per step of the ordered reductions


@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, ROWS, O, BLOCK_O: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     ACC_DTYPE: tl.constexpr):
    """out[j, c, o] = sum over the rows of chunk c of part[j, rows, o] (j = 0, 1; program (channel block, j,
    c)), in row-block order: the BatchNorm backward sums of the head and the backbone convs. The chunks are
    the grid's third axis: ``num_programs(2)`` chunks of whole BLOCK_ROWS blocks, out [2, chunks, O]; a
    two-dimensional grid (one chunk) sums every row into out [2, O]. Summing [2, chunks, O] that way is the
    second level of a two-level sum, in a fixed order."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    j, chunk, chunks = tl.program_id(1), tl.program_id(2), tl.num_programs(2)
    per_chunk = tl.cdiv(tl.cdiv(ROWS, chunks), BLOCK_ROWS) * BLOCK_ROWS
    end = tl.minimum(chunk * per_chunk + per_chunk, ROWS)
    acc = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    for r0 in range(chunk * per_chunk, end, BLOCK_ROWS):
        offs_r = r0 + tl.arange(0, BLOCK_ROWS)
        mask = (offs_r < end)[:, None] & mask_o[None, :]
        acc += tl.sum(tl.load(part_ptr + (j * ROWS + offs_r[:, None]).to(tl.int64) * O + offs_o[None, :],
                              mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + (j * chunks + chunk) * O + offs_o, acc, mask=mask_o)


def chunk_rows(rows: int, block: int) -> int:
    """Rows per chunk of a two-level reduction: whole blocks, at most ``block`` chunks."""
    return triton.cdiv(triton.cdiv(rows, min(triton.cdiv(rows, block), block)), block) * block


def sum_rows(part: torch.Tensor, out: torch.Tensor, block_o: int, num_warps: int) -> None:
    """out[j] = part[j].sum(0) (part [2, rows, O], out [2, O], accumulation dtype) in two levels of
    :func:`_sum_rows_kernel`: chunks of rows (at most BLOCK_ROWS chunks), then the chunks, in a fixed order;
    one launch when the rows fit one step. The BatchNorm backward sums of the head and the backbone convs."""
    rows, o = part.shape[1], part.shape[2]
    chunks = triton.cdiv(rows, chunk_rows(rows, BLOCK_ROWS))
    consts = dict(BLOCK_O=block_o, BLOCK_ROWS=BLOCK_ROWS, ACC_DTYPE=TL_DTYPE[part.dtype], num_warps=num_warps)
    if chunks > 1:
        partial = part.new_empty(2, chunks, o)
        _sum_rows_kernel[(triton.cdiv(o, block_o), 2, chunks)](part, partial, rows, o, **consts)
        part, rows = partial, chunks
    _sum_rows_kernel[(triton.cdiv(o, block_o), 2)](part, out, rows, o, **consts)


MERGE_BLOCK_T = 32                             # tiles per step of the statistics merge


@triton.jit
def _merge_tiles_kernel(part_ptr, mean_ptr, m2_ptr, TILES, O, M, TILE_PIXELS, TILES_PER_PROGRAM, M2_DIVISOR,
                        BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program (channel block, c): merges the (mean, M2) rows [c, c + 1) * TILES_PER_PROGRAM of part[2, TILES, O],
    tile t holding min(TILE_PIXELS, M - t TILE_PIXELS) pixels (every tile full but the last), into
    ``mean[c, o]`` and ``m2[c, o] / M2_DIVISOR``. BLOCK_T tiles at a time in the closed form, mean = sum(n_t
    mean_t) / sum(n_t), M2 = sum(M2_t) + sum(n_t (mean_t - mean)^2), those blocks in order by Chan's update:
    a fixed order, no atomics. A merge of the merged chunks (TILE_PIXELS = TILES_PER_PROGRAM of the first
    level times its TILE_PIXELS) gives the batch mean and, with M2_DIVISOR = M, the biased variance."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    first = tl.program_id(1) * TILES_PER_PROGRAM
    end = tl.minimum(first + TILES_PER_PROGRAM, TILES)
    run_mean = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    run_m2 = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    for t0 in range(first, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        count = tl.where(t < end, tl.minimum(M - t * TILE_PIXELS, TILE_PIXELS), 0).to(ACC_DTYPE)
        mask = (t < end)[:, None] & mask_o[None, :]
        rows = part_ptr + t.to(tl.int64)[:, None] * O + offs_o[None, :]
        mean_t = tl.load(rows, mask=mask, other=0.0)
        block = tl.sum(count, axis=0)
        mean = tl.sum(count[:, None] * mean_t, axis=0) / block
        d = tl.where(mask, mean_t - mean[None, :], 0.0)
        m2 = tl.sum(tl.load(rows + TILES.to(tl.int64) * O, mask=mask, other=0.0), axis=0) + tl.sum(
            count[:, None] * d * d, axis=0)
        seen = tl.cast(t0 - first, ACC_DTYPE) * TILE_PIXELS       # the tiles before t0 are full
        delta = mean - run_mean
        run_mean += delta * (block / (seen + block))
        run_m2 += m2 + delta * delta * (seen * block / (seen + block))
    row = tl.program_id(1) * O + offs_o
    tl.store(mean_ptr + row, run_mean, mask=mask_o)
    tl.store(m2_ptr + row, run_m2 / tl.cast(M2_DIVISOR, ACC_DTYPE), mask=mask_o)


def merge_tiles(part: torch.Tensor, m: int, tile_pixels: int, block_o: int,
                num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch (mean, biased variance) [O] of M values per channel from per-tile (mean, M2) part [2, tiles, O]
    (accumulation dtype; tile t holds min(tile_pixels, M - t tile_pixels) values) in two levels of
    :func:`_merge_tiles_kernel`: chunks of tiles merged in parallel (at most MERGE_BLOCK_T chunks, MERGE_BLOCK_T
    tiles per step), then the chunks, in a fixed order; one launch when one chunk holds every tile. The
    training statistics of the backbone convs (pixel tiles) and of the head (image rows)."""
    tiles, o = part.shape[1], part.shape[2]
    per_chunk = chunk_rows(tiles, MERGE_BLOCK_T)
    chunks = triton.cdiv(tiles, per_chunk)              # none empty: each counts per_chunk tiles but the last
    consts = dict(BLOCK_T=MERGE_BLOCK_T, BLOCK_O=block_o, ACC_DTYPE=TL_DTYPE[part.dtype], num_warps=num_warps)
    mean = part.new_empty(o)
    var = part.new_empty(o)
    if chunks == 1:
        _merge_tiles_kernel[(triton.cdiv(o, block_o), 1)](part, mean, var, tiles, o, m, tile_pixels, tiles, m,
                                                             **consts)
        return mean, var
    merged = part.new_empty(2, chunks, o)
    _merge_tiles_kernel[(triton.cdiv(o, block_o), chunks)](part, merged[0], merged[1], tiles, o, m, tile_pixels,
                                                              per_chunk, 1, **consts)
    _merge_tiles_kernel[(triton.cdiv(o, block_o), 1)](merged, mean, var, chunks, o, m, per_chunk * tile_pixels,
                                                         chunks, m, **consts)
    return mean, var


@dataclass(frozen=True)
class CompileConfig:
    """One compile-only specialisation of a kernel: ASTSource signature/constexprs plus launch options."""

    name: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    options: dict = field(default_factory=dict)


@triton.jit
def bin_channel_block(pid, R, bin_ptr, NB: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program id -> (bin k, channel offsets and mask of its BLOCK_R block, bin size b, packed offset).

    Grid layout shared by the per-(bin, channel block) kernels; ``bin_ptr`` holds sizes then offsets.
    """
    n_rblocks = tl.cdiv(R, BLOCK_R)
    k = pid // n_rblocks
    offs_r = (pid % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    return k, offs_r, offs_r < R, tl.load(bin_ptr + k), tl.load(bin_ptr + NB + k)
