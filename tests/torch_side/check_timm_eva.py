"""Torch-side half of the timm eva export parity tests (runs in .venv-torch, never imports JAX).

Commands (CASE_DIR holds ``inputs.npz`` with ``images``, NHWC float32; outputs go next to it as
``torch_outputs.npz`` with ``features`` (``forward_features``: final-normed tokens, class token
first) and ``pooled`` (``forward``: pooled, through the head if any), plus ``report.json``):

``load-export CASE_DIR``
    Builds timm's model from ``CASE_DIR/export/config.json`` the way the export's docstring tells a
    user: ``timm.create_model(architecture, pretrained=False, **model_args)`` then
    ``load_state_dict(safetensors, strict=True)``; also ``timm.create_model("local-dir:...",
    pretrained=True)``, whose weights must be the same. Reports the model's keys, shapes and
    parameter count.

``make-reference CASE_DIR SPEC_JSON``
    Creates ``timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])``
    with random weights (LayerNorms and biases perturbed too, the head weight drawn at a
    projection's scale; the head bias stays zero because the project's ViT projection has none)
    and writes it as an export directory ``CASE_DIR/reference/{config.json, model.safetensors}``
    for the JAX side to import.

``count SPECS_JSON OUT_JSON``
    Parameter counts of a list of ``{"architecture", "model_args"}`` specs (built on the meta
    device, so no memory is spent).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from parity_files import write_results
from torch_parity import (
    check_timm_export,
    create_timm_model,
    parameter_count,
    perturb_timm_,
    run_commands,
    run_vit,
    state_report,
    write_timm_reference,
)


def _report(model: torch.nn.Module) -> dict:
    return {**state_report(model), "rope": model.rope is not None}


def load_export(case_dir: Path) -> None:
    model, _, outputs, report = check_timm_export(case_dir, run_vit)
    write_results(case_dir, outputs, {**report, "rope": model.rope is not None})


def make_reference(case_dir: Path, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    torch.manual_seed(0)
    model = create_timm_model(spec)
    perturb_timm_(model, seed=1)
    write_timm_reference(case_dir, model, spec, run_vit(model, case_dir), _report(model))


def count(specs_path: Path, out_path: Path) -> None:
    counts = []
    for spec in json.loads(specs_path.read_text()):
        with torch.device("meta"):
            counts.append(parameter_count(create_timm_model(spec)))
    out_path.write_text(json.dumps(counts))


if __name__ == "__main__":
    run_commands(
        sys.argv[1:], {"load-export": load_export, "make-reference": make_reference, "count": count}
    )
