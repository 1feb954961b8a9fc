"""Bin geometry shared by every backend: adaptive pooling windows, bilinear taps, packed layout.

The pooled and branch tensors of the fused ops are *packed*: all bins of one (n, c) sit in one row of
``S = sum(b * b for b in bins)`` values, bin ``k`` occupying ``[offset_k, offset_k + b_k**2)`` in
row-major ``(i, j)`` order. For ``bins=(1, 2, 3, 6)``, ``S = 50`` and the offsets are ``(0, 1, 5, 14)``.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_BINS = (1, 2, 3, 6)


def check_bins(bins: Sequence[int], arg: str = "bins") -> tuple[int, ...]:
    """Validate a bin-size sequence and return it as a tuple of ints.

    Raises:
        TypeError: ``bins`` is not a sequence of ints.
        ValueError: ``bins`` is empty, has a size < 1, or repeats a size.
    """
    if isinstance(bins, (str, bytes)) or not hasattr(bins, "__iter__"):
        raise TypeError(f"{arg} must be a sequence of positive ints, got {type(bins).__name__}")
    out = tuple(bins)
    if not out:
        raise ValueError(f"{arg} must not be empty")
    for b in out:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"{arg} must contain ints, got {b!r} ({type(b).__name__})")
        if b < 1:
            raise ValueError(f"{arg} must contain sizes >= 1, got {b}")
    if len(set(out)) != len(out):
        raise ValueError(f"{arg} must not repeat a size, got {out}")
    return out


def packed_size(bins: Sequence[int]) -> int:
    """Number of packed cells ``S = sum(b * b)`` over all bins."""
    return sum(b * b for b in bins)


def bin_offsets(bins: Sequence[int]) -> tuple[int, ...]:
    """Start of each bin inside a packed row: ``(0, b0**2, b0**2 + b1**2, ...)``."""
    offsets, acc = [], 0
    for b in bins:
        offsets.append(acc)
        acc += b * b
    return tuple(offsets)


def window(i: int, b: int, size: int) -> tuple[int, int]:
    """Half-open input window ``[floor(i*size/b), ceil((i+1)*size/b))`` of output cell ``i`` of ``b``.

    Exactly the boundaries of ``nn.AdaptiveAvgPool2d`` (ATen ``start_index``/``end_index``), which
    overlap when ``size`` is not a multiple of ``b`` and repeat rows when ``size < b``.
    """
    return (i * size) // b, -((-(i + 1) * size) // b)


def pooling_matrix(b: int, size: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Adaptive-average-pooling matrix ``P`` [b, size]: ``P[i, h] = 1/len_i`` for h in window i."""
    p = torch.zeros(b, size, dtype=dtype, device=device)
    for i in range(b):
        s, e = window(i, b, size)
        p[i, s:e] = 1.0 / (e - s)
    return p


def bilinear_taps(out_size: int, in_size: int) -> list[tuple[int, int, float]]:
    """Per output index: ``(i0, i1, lambda1)`` of 1-D bilinear interpolation, align_corners=True.

    ``value = (1 - lambda1) * v[i0] + lambda1 * v[i1]``; source coordinate ``o * (in-1)/(out-1)``
    (0 when ``out_size == 1``), as ATen's ``area_pixel_compute_source_index`` with align_corners.
    """
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    taps = []
    for o in range(out_size):
        src = scale * o
        i0 = min(int(src), in_size - 1)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        taps.append((i0, i1, src - i0))
    return taps


def interpolation_matrix(out_size: int, in_size: int, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Bilinear (align_corners=True) interpolation matrix ``A`` [out_size, in_size]; rows sum to 1."""
    a = torch.zeros(out_size, in_size, dtype=dtype, device=device)
    for o, (i0, i1, lam) in enumerate(bilinear_taps(out_size, in_size)):
        a[o, i0] += 1.0 - lam
        a[o, i1] += lam
    return a


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (fp16/bf16/fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-D tensor is laid out NHWC (``torch.channels_last``) rather than NCHW.

    A tensor that is both (C == 1 or H == W == 1) counts as NCHW, as ``suggest_memory_format`` does.
    """
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` when ``channels_last``, else ``torch.contiguous_format`` (NCHW)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output extent of a convolution along one axis (zero padding): ``(size + 2 padding - dilation (kernel - 1)
    - 1) // stride + 1``, as ``torch.nn.Conv2d``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def split_bins(packed: torch.Tensor, bins: Sequence[int]) -> list[torch.Tensor]:
    """Views [N, C, b, b] of each bin of a packed [N, C, S] tensor, in ``bins`` order."""
    n, c, _ = packed.shape
    return [packed[:, :, off:off + b * b].reshape(n, c, b, b) for b, off in zip(bins, bin_offsets(bins))]


def shifted_interpolation(out_size: int, in_size: int, kernel: int, padding: int, dilation: int,
                          dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per tap of a conv along one axis, the bilinear interpolation matrix shifted to that tap: [kernel, out, in].

    Row ``t`` of tap ``k`` is row ``t + k*dilation - padding`` of ``interpolation_matrix(out_size, in_size)``
    (align_corners=True), or **zero** when that position falls outside ``[0, out_size)``: the conv's zero
    padding of the upsampled map, not an extrapolated or clamped row. With it, a conv of an upsampled
    b x b map is ``sum_taps B_ky (W_tap p) B_kx^T`` at bin resolution (docs/concat_free_head.md).

    Built from tensor ops only (weights computed in fp64, then rounded to ``dtype``), so ``out_size`` and
    ``in_size`` may be symbolic: ``torch.export`` with dynamic H, W traces the table into the graph, and the
    exported model builds it from the runtime shape.
    """
    taps = torch.arange(kernel, device=device)[:, None] * dilation - padding
    rows = torch.arange(out_size, device=device)[None, :] + taps                        # [kernel, out]
    inside = (rows >= 0) & (rows < out_size)
    scale = torch.full((), in_size - 1, dtype=torch.float64, device=device) / max(out_size - 1, 1)  # bilinear_taps'
    src = rows.clamp(0, out_size - 1).to(torch.float64) * scale
    i0 = src.floor().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0
    cols = torch.arange(in_size, device=device).to(torch.float64)
    weights = (torch.where(cols == i0[..., None], 1.0 - lam[..., None], 0.0)
               + torch.where(cols == i1[..., None], lam[..., None], 0.0))
    return torch.where(inside[..., None], weights, 0.0).to(dtype)
