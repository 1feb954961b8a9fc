"""``python -m pspnet.export --checkpoint C --output OUT [--format onnx|pt2] [--height H --width W] [--static]
[--opset N] [--config YAML] [--key value ...]``

Exports a trained PSPNet (fused ops on, fp32, eval mode, BatchNorm folded) for deployment:

- ``onnx`` (default): one graph of standard ONNX operators that is exact at every input size (dynamic batch,
  height and width unless ``--static``): the ``psp::`` ops are translated by ``psp_kernels.onnx_ops``
  (adaptive pooling windows and interpolation weights computed from the runtime shape, the concat-free head
  at bin resolution). Before the file is written the graph passes ``onnx.checker`` and runs in ONNX Runtime
  on the example size and on a second one; an error above 1e-4 relative to the eager model refuses the
  export. The training config and class colours travel in the model's metadata (``pspnet.predict --onnx``
  reads them).
- ``pt2``: ``torch.export`` of the fused model (the ``psp::`` ops kept as ops; load it with
  ``torch.export.load`` after ``import psp_kernels``), checked by reloading it in a fresh process.

The example size defaults to the config's sliding-window crop (``test_h`` x ``test_w``), the size
``pspnet.predict`` feeds the network. Nothing is written unless every check passes (temporary file, then
rename); an existing file at OUT is replaced only then.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .checkpoint import atomic_write

if TYPE_CHECKING:
    import onnx

__all__ = ["ExportError", "MAX_RELATIVE_ERROR", "MAX_OPSET", "build_parser", "main", "to_onnx", "to_pt2"]

MAX_RELATIVE_ERROR = 1e-4      # max |exported - eager| / max |eager| over the logits, or the export is refused
MAX_OPSET = 23                 # the newest opset torch 2.13's exporter writes
DEFAULT_OPSET = 20             # the exporter's default
_BATCH = 2                     # example batch: 2, so that the exported batch dimension stays dynamic
MAX_SIZE = 8192                # the largest H and W of a dynamic export
MIN_SIZE = 9                   # the smallest: torch.export's layout checks need a stride-8 map of at least 2x2


class ExportError(RuntimeError):
    """The model cannot be exported, or its export does not reproduce the eager model (nothing was written)."""


def _check_opset(opset: Optional[int]) -> int:
    from psp_kernels.onnx_ops import MIN_OPSET
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


def _check_size(example_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(example_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"example_size must be (height, width) of positive ints, got {example_size!r}")
    return size


def _check_output(path: str | os.PathLike) -> Path:
    """The output path, after checking that a file can be created there (the folder is made if missing)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {path.parent}: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path.parent} is not writable")
    return path


def _inference_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 eval-mode copy of model (the caller's model is left as it is)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


def _second_size(size: tuple[int, int]) -> tuple[int, int]:
    """A verification size other than the example's, not a multiple of 8 either way (odd feature maps)."""
    return size[0] // 2 + 13, size[1] + 37


def _inputs(sizes: Sequence[tuple[int, int]], batches: Sequence[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, *s, generator=generator) for s, n in zip(sizes, batches)]


def _prepared(model: nn.Module, path: str | os.PathLike, example_size: Sequence[int], dynamic: bool,
              min_size: int) -> tuple[nn.Module, Path, list[torch.Tensor], dict]:
    """What both exports start from, arguments checked: (the fp32 eval copy, the output path, [example input,
    verification input], the dynamic_shapes)."""
    size, path = _check_size(example_size), _check_output(path)
    shapes = _dynamic_shapes(dynamic, min_size)
    inputs = _inputs([size, _second_size(size) if dynamic else size], [_BATCH, 1 if dynamic else 3])
    return _inference_copy(model), path, inputs, shapes


def _dynamic_shapes(dynamic: bool, min_size: int) -> dict:
    from torch.export import Dim
    if isinstance(min_size, bool) or not isinstance(min_size, int) or not 1 <= min_size <= MAX_SIZE:
        raise ValueError(f"min_size must be an int from 1 to {MAX_SIZE}, got {min_size!r}")
    dims = {0: Dim("batch", min=1, max=1024)}
    if dynamic:
        dims.update({2: Dim("height", min=min_size, max=MAX_SIZE), 3: Dim("width", min=min_size, max=MAX_SIZE)})
    return {"x": dims}


@contextlib.contextmanager
def _quiet_tracing():
    """Silences torch's own deprecation notice about its pytree internals, printed on every export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        yield


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise ExportError(f"the exported model returned logits of shape {tuple(got.shape)}, the eager model "
                          f"{tuple(want.shape)}")
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def _compare(run: Callable, net: nn.Module, inputs: Sequence[torch.Tensor], what: str,
             report: Callable[[str], None]) -> list[float]:
    """Relative errors of ``run(inputs)`` (a list of logits) against the eager model; refuses above the limit."""
    with torch.no_grad():
        want = [net(x) for x in inputs]
    errors = [_relative_error(g, w) for g, w in zip(run(inputs), want)]
    sizes = ", ".join(f"{e:.2e} at {list(x.shape)}" for e, x in zip(errors, inputs))
    report(f"verified in {what}: max relative error vs the eager model {sizes}")
    if max(errors) > MAX_RELATIVE_ERROR:
        raise ExportError(f"the export does not reproduce the eager model in {what}: relative error "
                          f"{max(errors):.2e} > {MAX_RELATIVE_ERROR:.0e}; nothing was written")
    return errors


def _fold_constants(program) -> "onnx.ModelProto":
    """The exported ONNX model with every computation on initializers folded into constants (BatchNorm into
    the conv weights and biases; the onnxscript optimiser's default leaves tensors above 8192 elements)."""
    import onnx_ir
    import onnxscript.optimizer
    model = program.model
    onnxscript.optimizer.optimize(model, input_size_limit=2 ** 31, output_size_limit=2 ** 31)
    return onnx_ir.serde.serialize_model(model)


def to_onnx(model: nn.Module, path: str | os.PathLike, example_size: Sequence[int] = (473, 473),
            dynamic: bool = True, opset: Optional[int] = None, *, metadata: Optional[Mapping[str, str]] = None,
            min_size: int = MIN_SIZE, report: Callable[[str], None] = print) -> Path:
    """Export ``model`` (a :class:`pspnet.models.PSPNet`, fused or not) to an ONNX file, verified first.

    Args:
        model: the network; an fp32 eval-mode CPU copy is exported (``model`` itself is not changed).
        path: the ``.onnx`` file to write (its folder is created; an existing file is replaced on success).
        example_size: (H, W) of the example input, pixels.
        dynamic: batch, height and width dynamic (one model for every input size from ``min_size`` to 8192);
            False: height and width fixed at ``example_size`` (the batch stays dynamic).
        opset: ONNX opset, 18 to 23 (default 20, the exporter's).
        metadata: extra ``metadata_props`` to store (the CLI stores the config and palette).
        min_size: the smallest H and W of a dynamic export (default 9: PSPNet's stride-8 map must be at least
            2x2 for torch.export's layout checks; 1 for a single op).
        report: receives the progress lines (the measured errors).

    Returns:
        ``path`` as a Path. The graph's input is ``image`` float32 [N, 3, H, W], its output ``logits`` float32
        [N, classes, h, w].

    Raises:
        ValueError: a bad ``example_size``, ``opset`` or output path (nothing exported).
        ExportError: the exporter does not cover the model, ``onnx.checker`` rejects the graph, or ONNX Runtime's
            logits differ from the eager model's by more than 1e-4 relative at the example size or at a second
            size (nothing written).

    Source: docs/export.md.
    """
    import onnx
    from psp_kernels.onnx_ops import translation_table
    from .onnx_runtime import OnnxSegmenter, open_session

    opset = _check_opset(opset)
    net, path, inputs, shapes = _prepared(model, path, example_size, dynamic, min_size)
    try:
        with torch.no_grad(), _quiet_tracing():
            program = torch.onnx.export(net, tuple(inputs[:1]), dynamo=True, dynamic_shapes=shapes,
                                        custom_translation_table=translation_table(), opset_version=opset,
                                        input_names=["image"], output_names=["logits"], verbose=False)
    except Exception as e:  # the exporter raises torch.onnx.errors / torch._dynamo errors with long reports
        raise ExportError(f"the ONNX exporter does not cover this model: {_first_line(e)}") from None
    proto = _fold_constants(program)
    if metadata:
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})

    def check(tmp: Path) -> None:
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"onnx.checker rejects the exported graph: {_first_line(e)}") from None
        session = OnnxSegmenter(open_session(tmp))
        _compare(lambda xs: [session(x) for x in xs], net, inputs, "ONNX Runtime", report)

    return atomic_write(path, lambda f: f.write(proto.SerializeToString()), check=check)


_PT2_CHECK = """
import sys, torch, psp_kernels
program = torch.export.load(sys.argv[1])
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save([program.module()(x) for x in inputs], sys.argv[3])
"""


def _run_pt2_in_fresh_process(path: Path, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        given, got = Path(tmp) / "inputs.pt", Path(tmp) / "logits.pt"
        torch.save(list(inputs), given)
        done = subprocess.run([sys.executable, "-c", _PT2_CHECK, str(path), str(given), str(got)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
            raise ExportError(f"the saved program does not load and run in a fresh process: {tail[0]}")
        return torch.load(got)


def to_pt2(model: nn.Module, path: str | os.PathLike, example_size: Sequence[int] = (473, 473),
           dynamic: bool = True, *, min_size: int = MIN_SIZE, report: Callable[[str], None] = print) -> Path:
    """``torch.export`` of ``model`` (fp32, eval) with dynamic batch, height and width, saved with
    ``torch.export.save`` after a check in a fresh process (``torch.export.load`` with ``psp_kernels`` imported,
    logits within 1e-4 relative of the eager model at the example size and a second size).

    Arguments, return value and errors as :func:`to_onnx` (no opset). Load the file with ``import psp_kernels;
    torch.export.load(path).module()``: the ``psp::`` ops stay ops in the program, so it runs the same kernels.
    """
    net, path, inputs, shapes = _prepared(model, path, example_size, dynamic, min_size)
    try:
        with torch.no_grad(), _quiet_tracing():
            program = torch.export.export(net, tuple(inputs[:1]), dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises several error types, each with a long report
        raise ExportError(f"torch.export does not cover this model: {_first_line(e)}") from None

    def check(tmp: Path) -> None:
        _compare(lambda xs: _run_pt2_in_fresh_process(tmp, xs), net, inputs, "a fresh process (torch.export.load)",
                 report)

    return atomic_write(path, lambda f: torch.export.save(program, f), check=check)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def build_parser():
    """Parser for the export options and every config key."""
    from .config_cli import ConfigArgumentParser
    parser = ConfigArgumentParser(prog="python -m pspnet.export", description=__doc__,
                                  usage=("%(prog)s --checkpoint PATH --output FILE [--format onnx|pt2] "
                                         "[--height H --width W] [--static] [--opset N] [--config YAML]"),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file (.pth)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write (.onnx or .pt2)")
    parser.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="onnx (default) or pt2")
    parser.add_argument("--height", type=int, default=None, help="example height (default: the config's test_h)")
    parser.add_argument("--width", type=int, default=None, help="example width (default: the config's test_w)")
    parser.add_argument("--static", action="store_true", help="fix height and width at the example size")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset, 18-23 (default 20)")
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="config file (default: the config stored in the checkpoint)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and export; returns the exit code (0 = written; 2 = bad arguments, a missing or unreadable
    checkpoint or an unwritable output; 1 = the export failed its checks). Errors are one line, no traceback."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import ConfigError
    from .config_cli import config_overrides
    from .config_files import checkpoint_config
    from .modeling import load_for_inference
    from .onnx_runtime import CONFIG_KEY, PALETTE_KEY

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.format == "pt2" and args.opset is not None:
            raise ValueError("--opset applies to --format onnx only")
        state = load_checkpoint(args.checkpoint)
        cfg = checkpoint_config(state, args.checkpoint, args.config, {**config_overrides(args), "device": "cpu"})
        size = (cfg.test_h if args.height is None else args.height, cfg.test_w if args.width is None else args.width)
        _check_size(size), _check_output(args.output)
        if args.format == "onnx":
            _check_opset(args.opset)
        model = load_for_inference(cfg, state)
    except (FileNotFoundError, CheckpointError, ConfigError, ValueError, RuntimeError) as e:
        parser.error(str(e).splitlines()[0])
    try:
        if args.format == "onnx":
            metadata = {CONFIG_KEY: json.dumps(cfg.to_dict()), PALETTE_KEY: json.dumps(state.get("palette"))}
            out = to_onnx(model, args.output, size, not args.static, args.opset, metadata=metadata)
        else:
            out = to_pt2(model, args.output, size, not args.static)
    except (ExportError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    shape = "dynamic batch, height and width" if not args.static else f"dynamic batch, {size[0]}x{size[1]}"
    print(f"wrote {out} ({args.format}, {shape}, {out.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
