"""Running an exported PSPNet (``pspnet.export``) in ONNX Runtime: the session, the metadata the export stores
(the training config and class colours), and an adapter that lets :mod:`pspnet.inference` drive the session
as it drives a torch model (same sliding-window, multi-scale, flip procedure; no torch network involved).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ["CONFIG_KEY", "PALETTE_KEY", "INPUT_NAME", "OUTPUT_NAME", "OnnxSegmenter", "open_session",
           "read_metadata"]

INPUT_NAME, OUTPUT_NAME = "image", "logits"
CONFIG_KEY, PALETTE_KEY = "pspnet.config", "pspnet.palette"


def open_session(path: str | os.PathLike, threads: Optional[int] = None):
    """An ``onnxruntime.InferenceSession`` on the CPU for the model file ``path``.

    Args:
        path: an ``.onnx`` file; threads: intra-op threads (None: ONNX Runtime's default, one per core).
    Raises:
        FileNotFoundError: no file at ``path``. ValueError: the file is not a model ONNX Runtime can load
            (the message names it and gives ONNX Runtime's reason).
    """
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3          # errors only: the shape-merge notes of dynamic graphs are noise
    # no busy-waiting between runs: the threads would spin on the cores the torch work between runs needs
    # (softmax and window accumulation in pspnet.inference; 10x slower interleaved on 2 cores otherwise)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise ValueError(f"{path} is not a model ONNX Runtime can load: {str(e).splitlines()[0]}") from None


def read_metadata(session) -> dict[str, Any]:
    """The export's metadata of a session: ``{"config": dict or None, "palette": list or None}``."""
    props = session.get_modelmeta().custom_metadata_map
    return {"config": json.loads(props[CONFIG_KEY]) if CONFIG_KEY in props else None,
            "palette": json.loads(props[PALETTE_KEY]) if PALETTE_KEY in props else None}


class OnnxSegmenter(nn.Module):
    """An ONNX Runtime session behind ``nn.Module``'s call: float32 [N, 3, H, W] -> logits [N, K, h, w]
    (CPU tensors), for :func:`pspnet.inference.predict` and the export's verification. Holds no parameters.

    Args:
        session: from :func:`open_session`, with the export's input ``image`` and output ``logits``.
    """

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: image})[0])
