"""The files a parity case directory holds, shared by the JAX tests and the torch-side scripts
(NumPy and the standard library only, so both environments import it): the JAX side writes
``inputs.npz``, a torch-side script writes ``torch_outputs.npz`` and ``report.json`` next to it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

INPUTS_FILE = "inputs.npz"
OUTPUTS_FILE = "torch_outputs.npz"
REPORT_FILE = "report.json"


def write_inputs(case_dir: Path, inputs: Mapping[str, np.ndarray]) -> None:
    Path(case_dir).mkdir(parents=True, exist_ok=True)
    np.savez(Path(case_dir) / INPUTS_FILE, **inputs)


def read_inputs(case_dir: Path) -> dict[str, np.ndarray]:
    with np.load(Path(case_dir) / INPUTS_FILE) as inputs:
        return dict(inputs)


def write_results(
    case_dir: Path, outputs: Mapping[str, np.ndarray], report: Mapping[str, Any] | None = None
) -> None:
    np.savez(Path(case_dir) / OUTPUTS_FILE, **outputs)
    if report is not None:
        (Path(case_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2))


def read_results(case_dir: Path) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
    """``(report, outputs)`` a torch-side script wrote (``report`` None when it wrote none)."""
    report_path = Path(case_dir) / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    with np.load(Path(case_dir) / OUTPUTS_FILE) as outputs:
        return report, dict(outputs)
