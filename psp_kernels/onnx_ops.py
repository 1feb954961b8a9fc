"""ONNX translations of the ``psp::`` inference ops (and of ATen's adaptive average pooling), made of standard
ONNX operators, for ``torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table())``.

Every table the ops read is built *in the graph* from the runtime shape, so one exported model is exact at every
input size (docs/export.md):

- adaptive average pooling: the 0/1 window masks ``[floor(i*H/b) <= h < ceil((i+1)*H/b)]`` of every bin stacked
  into one [sum(bins), H] matrix (Range + compare ops), applied with two MatMuls (one pass over x for all bins);
  each bin's diagonal block is then divided by its window sizes. These are ``nn.AdaptiveAvgPool2d``'s windows
  for any H, W, also smaller than a bin (ONNX's own pooling ops cover output size 1 only);
- bilinear upsampling with ``align_corners=True``: the interpolation matrix [H, b] of ``geometry.bilinear_taps``
  (source position ``o * ((b-1)/(H-1))`` in fp64, as there), applied with MatMuls;
- BatchNorm in eval mode: a per-channel scale and shift of initializers (folded into constants by
  ``pspnet.export``).

Needs ``onnx`` and ``onnxscript`` (imported by this module only; ``import psp_kernels`` does not). The functions
are traced by the exporter (onnxscript trace-only functions): Python arguments (bins, eps, flags) are constants.
Only inference is covered: a call with ``training=True`` raises ``NotImplementedError``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from onnx import TensorProto, helper
from onnxscript import opset18 as op

from .geometry import bin_offsets

__all__ = ["MIN_OPSET", "translation_table"]

MIN_OPSET = 18       # the opset these translations are written in (the exporter's own minimum)

_EMPTY = helper.make_tensor("empty", TensorProto.FLOAT, [0], [])


def _ints(values: Sequence[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _int(value: int):
    return op.Constant(value_int=int(value))


def _size(x, axis: int):
    """x's size along ``axis`` as a 1-element int64 tensor."""
    return op.Shape(x, start=axis, end=axis + 1)


def _inference_only(training: bool, name: str) -> None:
    if training:
        raise NotImplementedError(f"psp::{name}: only inference (training=False) has an ONNX translation")


def _window_masks(size, bins: Sequence[int]):
    """The [sum(bins), size] 0/1 window mask (rows of all bins stacked; row ``off + i`` of bin b covers
    ``[floor(i*size/b), ceil((i+1)*size/b))``, ``geometry.window``) and the window lengths [sum(bins)]."""
    cells = _ints([i for b in bins for i in range(b)])
    parts = _ints([b for b in bins for _ in range(b)])
    start = op.Div(op.Mul(cells, size), parts)                          # int64 Div truncates: floor (all >= 0)
    stop = op.Div(op.Add(op.Mul(op.Add(cells, _ints([1])), size), op.Sub(parts, _ints([1]))), parts)   # ceil
    h = op.Unsqueeze(op.Range(_int(0), op.Squeeze(size, _ints([0])), _int(1)), _ints([0]))
    mask = op.And(op.GreaterOrEqual(h, op.Unsqueeze(start, _ints([1]))), op.Less(h, op.Unsqueeze(stop, _ints([1]))))
    return mask, op.Sub(stop, start)


def _pooled_grids(x, rows: Sequence[int], cols: Sequence[int]) -> list:
    """Adaptive average pooling of x [N, C, H, W] to every (rows[k], cols[k]) grid: a list of [N, C, r, c].

    One pass over x for all grids: ``mask_h @ x @ mask_w^T`` [N, C, sum(rows), sum(cols)] holds every window sum
    (grid k's in its diagonal block), divided by the window areas; sums accumulate in x's dtype."""
    mask_h, len_h = _window_masks(_size(x, 2), rows)
    mask_w, len_w = _window_masks(_size(x, 3), cols)
    sums = op.MatMul(op.MatMul(op.CastLike(mask_h, x), x), op.Transpose(op.CastLike(mask_w, x), perm=[1, 0]))
    means = op.Div(sums, op.CastLike(op.Mul(op.Unsqueeze(len_h, _ints([1])), op.Unsqueeze(len_w, _ints([0]))), x))
    grids, top, left = [], 0, 0
    for r, c in zip(rows, cols):
        grids.append(op.Slice(means, _ints([top, left]), _ints([top + r, left + c]), _ints([2, 3])))
        top, left = top + r, left + c
    return grids


def _interpolation(size, b: int, like):
    """Bilinear interpolation matrix [size, b] (align_corners=True) for a runtime ``size``, ``like``'s dtype:
    row o weighs cells ``i0 = min(floor(src), b-1)``, ``i1 = min(i0+1, b-1)`` by ``1-lam``, ``lam``, with
    ``src = o * ((b-1) / max(size-1, 1))`` and ``lam = src - i0`` in fp64 (``geometry.bilinear_taps``)."""
    f64 = TensorProto.DOUBLE
    scale = op.Div(op.Cast(_ints([b - 1]), to=f64),
                   op.Cast(op.Max(op.Sub(size, _ints([1])), _ints([1])), to=f64))
    src = op.Mul(op.Cast(op.Range(_int(0), op.Squeeze(size, _ints([0])), _int(1)), to=f64), scale)
    last = op.Cast(_ints([b - 1]), to=f64)
    i0 = op.Min(op.Floor(src), last)
    i1 = op.Min(op.Add(i0, op.Cast(_ints([1]), to=f64)), last)
    lam = op.Unsqueeze(op.Sub(src, i0), _ints([1]))
    cells = op.Cast(_ints(range(b)), to=f64)
    zero = op.Cast(_ints([0]), to=f64)
    weights = op.Add(op.Where(op.Equal(cells, op.Unsqueeze(i0, _ints([1]))), op.Sub(op.Cast(_ints([1]), to=f64), lam),
                              zero),
                     op.Where(op.Equal(cells, op.Unsqueeze(i1, _ints([1]))), lam, zero))
    return op.CastLike(weights, like)


def _bn_scale_shift(weight, bias, mean, var, eps: float, like):
    """Eval BatchNorm as ``y * scale + shift``, both [C, 1, 1] in ``like``'s dtype."""
    scale = op.Div(weight, op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=eps), var))))
    shift = op.Sub(bias, op.Mul(mean, scale))
    axes = _ints([1, 2])
    return op.CastLike(op.Unsqueeze(scale, axes), like), op.CastLike(op.Unsqueeze(shift, axes), like)


def _branch_outputs(pooled_grids, conv_weights, bn_weights, bn_biases, running_means, running_vars, eps: float):
    """Every bin's 1x1 conv + eval BatchNorm + ReLU on its pooled grid [N, C, b*b]: (branches, bn inputs)."""
    outs, bn_inputs = [], []
    for grid, w, g, beta, mean, var in zip(pooled_grids, conv_weights, bn_weights, bn_biases, running_means,
                                           running_vars):
        z = op.MatMul(op.Squeeze(w, _ints([2, 3])), grid)                 # [R, C] @ [N, C, b*b] -> [N, R, b*b]
        scale, shift = _bn_scale_shift(g, beta, mean, var, eps, z)
        bn_inputs.append(z)
        outs.append(op.Relu(op.Add(op.Mul(z, op.Squeeze(scale, _ints([2]))), op.Squeeze(shift, _ints([2])))))
    return outs, bn_inputs


def _flat(grid):
    """[N, C, b, b] -> [N, C, b*b]."""
    return op.Reshape(grid, _ints([0, 0, -1]))


def _stacked_stats(running_means, running_vars):
    return (op.Concat(*[op.Unsqueeze(m, _ints([0])) for m in running_means], axis=0),
            op.Concat(*[op.Unsqueeze(v, _ints([0])) for v in running_vars], axis=0))


def multibin_avg_pool(x, bins: Sequence[int]):
    """``psp::multibin_avg_pool``: x [N, C, H, W] -> packed [N, C, S]."""
    return op.Concat(*[_flat(g) for g in _pooled_grids(x, bins, bins)], axis=2)


def adaptive_avg_pool2d(x, output_size: Sequence[int]):
    """``aten::adaptive_avg_pool2d`` (semseg's unfused PPM): exact windows at any runtime H, W."""
    rows, cols = output_size
    return _pooled_grids(x, [rows], [cols])[0]


def _split_packed(packed, bins: Sequence[int]) -> list:
    """[N, C, S] -> per bin [N, C, b*b] (``geometry.split_bins`` without the reshape)."""
    return [op.Slice(packed, _ints([off]), _ints([off + b * b]), _ints([2])) for b, off in zip(bins, bin_offsets(bins))]


def reduction_conv_bn_relu(pooled, conv_weights, bn_weights, bn_biases, running_means, running_vars,
                           bins: Sequence[int], training: bool, eps: float):
    """``psp::reduction_conv_bn_relu`` (eval): (branches [N, R, S], bn_input [N, R, S], mean, var [nb, R])."""
    _inference_only(training, "reduction_conv_bn_relu")
    outs, bn_inputs = _branch_outputs(_split_packed(pooled, bins), conv_weights, bn_weights, bn_biases,
                                      running_means, running_vars, eps)
    return (op.Concat(*outs, axis=2), op.Concat(*bn_inputs, axis=2), *_stacked_stats(running_means, running_vars))


def _upsampled(x, branches: Sequence, bins: Sequence[int]) -> list:
    """Each bin's branch [N, R, b*b] upsampled to x's H x W (align_corners=True): [N, R, H, W]."""
    height, width = _size(x, 2), _size(x, 3)
    ups = []
    for branch, b in zip(branches, bins):
        grid = op.Reshape(branch, _ints([0, 0, b, b]))
        a_h, a_w = _interpolation(height, b, grid), _interpolation(width, b, grid)
        ups.append(op.MatMul(op.MatMul(a_h, grid), op.Transpose(a_w, perm=[1, 0])))
    return ups


def upsample_concat(x, branches, bins: Sequence[int]):
    """``psp::upsample_concat``: cat([x, up(branch_b) for b in bins], 1) [N, C + nb*R, H, W]."""
    return op.Concat(x, *[op.CastLike(u, x) for u in _upsampled(x, _split_packed(branches, bins), bins)], axis=1)


def pyramid_pooling(x, conv_weights, bn_weights, bn_biases, running_means, running_vars, bins: Sequence[int],
                    training: bool, eps: float):
    """``psp::pyramid_pooling`` (eval): (concat, pooled, bn_input, mean, var) of the whole PPM."""
    _inference_only(training, "pyramid_pooling")
    grids = [_flat(g) for g in _pooled_grids(x, bins, bins)]
    outs, bn_inputs = _branch_outputs(grids, conv_weights, bn_weights, bn_biases, running_means, running_vars, eps)
    concat = op.Concat(x, *[op.CastLike(u, x) for u in _upsampled(x, outs, bins)], axis=1)
    return (concat, op.Concat(*grids, axis=2), op.Concat(*bn_inputs, axis=2),
            *_stacked_stats(running_means, running_vars))


def add_branch_bn_relu(conv_out, branch_rows, width_interp, bn_weight, bn_bias, running_mean, running_var,
                       training: bool, eps: float, keep_bn_input: bool):
    """``psp::add_branch_bn_relu`` (eval): relu(bn(conv_out + branch_rows @ width_interp^T)), bn input, stats."""
    _inference_only(training, "add_branch_bn_relu")
    branch = op.CastLike(op.MatMul(branch_rows, op.Transpose(width_interp, perm=[1, 0])), conv_out)
    bn_input = op.Add(conv_out, branch)
    scale, shift = _bn_scale_shift(bn_weight, bn_bias, running_mean, running_var, eps, conv_out)
    out = op.Relu(op.Add(op.Mul(bn_input, scale), shift))
    if not keep_bn_input:        # the op's schema: an empty bn_input when it is not kept for backward
        bn_input = op.CastLike(op.Constant(value=_EMPTY), conv_out)
    return out, bn_input, op.Identity(running_mean), op.Identity(running_var)


def folded_conv(x, weight, bias: Optional[object], residual: Optional[object], stride: int, padding: int,
                dilation: int, relu: bool):
    """``psp::folded_conv``: relu?(conv(x, weight) + bias + residual?) as Conv (+ Add) (+ Relu)."""
    args = (x, weight) if bias is None else (x, weight, op.CastLike(bias, x))
    y = op.Conv(*args, strides=[stride, stride], pads=[padding] * 4, dilations=[dilation, dilation])
    if residual is not None:
        y = op.Add(y, residual)
    return op.Relu(y) if relu else y


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: every ``psp::`` op on the eval path, and
    ``aten::adaptive_avg_pool2d`` (exact at any runtime size; the exporter's own needs a fixed size)."""
    psp = torch.ops.psp
    return {
        psp.folded_conv.default: folded_conv,
        psp.multibin_avg_pool.default: multibin_avg_pool,
        psp.reduction_conv_bn_relu.default: reduction_conv_bn_relu,
        psp.add_branch_bn_relu.default: add_branch_bn_relu,
        psp.upsample_concat.default: upsample_concat,
        psp.pyramid_pooling.default: pyramid_pooling,
        torch.ops.aten.adaptive_avg_pool2d.default: adaptive_avg_pool2d,
    }
