"""Torch-side half of the spatial-ops parity test (runs in .venv-torch, never imports JAX): the
reference values of models/spatial.py's pooling and resizing from ``torch.nn.functional``.

``check_adaptive_pool.py CASE_DIR``: ``CASE_DIR/inputs.npz`` holds NHWC float32 arrays and
``CASE_DIR/spec.json`` a list of operations ``{"name", "input", "op", "size", ...}`` with ``op``
one of ``adaptive_avg_pool2d`` or ``interpolate`` (then also ``mode`` and, for "bilinear",
``align_corners``). Writes ``torch_outputs.npz`` with one NHWC array per operation ``name`` and
``report.json`` with torch's version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from parity_files import read_inputs, write_results


def _apply(operation: dict, x: torch.Tensor) -> torch.Tensor:
    size = tuple(operation["size"])
    if operation["op"] == "adaptive_avg_pool2d":
        return F.adaptive_avg_pool2d(x, size)
    if operation["op"] == "interpolate":
        mode = operation["mode"]
        align_corners = operation.get("align_corners") if mode == "bilinear" else None
        return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    raise SystemExit(f"unknown op {operation['op']!r}")


def main(case_dir: Path) -> None:
    inputs = read_inputs(case_dir)
    spec = json.loads((case_dir / "spec.json").read_text())
    outputs = {}
    for operation in spec:
        # NHWC (as JAX takes maps) -> NCHW for torch, and back.
        x = torch.from_numpy(inputs[operation["input"]]).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            y = _apply(operation, x)
        outputs[operation["name"]] = y.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)
    write_results(case_dir, outputs, {"torch_version": torch.__version__})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
