"""Torch-side half of the timm VisionTransformer export parity tests (runs in .venv-torch, never
imports JAX).

Commands (each CASE_DIR holds ``inputs.npz`` with ``images``, NHWC float32; outputs go next to it as
``torch_outputs.npz`` with ``features`` (``forward_features``: final-normed tokens, class token
first) and ``pooled`` (``forward``: the head's logits, or the pooled embedding without a head),
plus ``report.json``):

``load-export CASE_DIR...``
    For each case, builds timm's model from ``CASE_DIR/export/config.json`` the way the export's
    docstring tells a user: ``timm.create_model(architecture, pretrained=False, **model_args)`` then
    ``load_state_dict(safetensors, strict=True)``; also ``timm.create_model("local-dir:...",
    pretrained=True)``, whose weights and outputs must be the same. Reports the model's class,
    keys, shapes, parameter count, LayerNorm eps and MLP activation.

``make-reference CASE_DIR...``
    For each case, creates ``timm.create_model(spec["architecture"], pretrained=False,
    **spec["model_args"])`` from ``CASE_DIR/spec.json`` with random weights (every parameter
    perturbed; the head bias zero unless ``spec["random_head_bias"]``) and writes it as an export
    directory ``CASE_DIR/reference/{config.json, model.safetensors}`` for the JAX side to import.

``inspect IN_JSON OUT_JSON``
    ``IN_JSON`` = ``{"names": [...], "specs": [{"architecture", "model_args"}, ...]}``. Writes
    ``{"names": {name: {...}}, "counts": [...]}``: for each timm model name whether timm registers
    it and (built on the meta device) its class, LayerNorm eps, ``norm_pre`` and MLP activation;
    for each spec its parameter count (meta device, as check_timm_eva.py's ``count``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from parity_files import write_results
from torch_parity import (
    check_timm_export,
    create_timm_model,
    each,
    parameter_count,
    perturb_timm_,
    run_commands,
    run_vit,
    state_report,
    write_timm_reference,
)


def _norms_and_activation(model: torch.nn.Module) -> dict:
    return {
        "norm_eps": model.norm.eps,
        "block_norm_eps": model.blocks[0].norm1.eps,
        "activation": type(model.blocks[0].mlp.act).__name__,
    }


def load_export(case_dir: Path) -> None:
    model, _, outputs, report = check_timm_export(case_dir, run_vit)
    write_results(case_dir, outputs, {**report, **_norms_and_activation(model)})


def make_reference(case_dir: Path) -> None:
    spec = json.loads((case_dir / "spec.json").read_text())
    torch.manual_seed(0)
    model = create_timm_model(spec)
    perturb_timm_(model, seed=1)
    if spec.get("random_head_bias") and isinstance(model.head, torch.nn.Linear):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(2)
            model.head.bias.copy_(0.1 * torch.randn(model.head.bias.shape, generator=generator))
    config = {"architecture": spec["architecture"], "model_args": spec["model_args"]}
    report = {**state_report(model), **_norms_and_activation(model)}
    write_timm_reference(case_dir, model, config, run_vit(model, case_dir), report)


def _name_report(name: str) -> dict:
    if not timm.is_model(name):
        return {"registered": False}
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return {
        "registered": True,
        "model_class": type(model).__name__,
        "norm_eps": model.norm.eps,
        "pre_norm": isinstance(model.norm_pre, torch.nn.LayerNorm),
        "activation": type(model.blocks[0].mlp.act).__name__,
    }


def _count(spec: dict) -> int:
    with torch.device("meta"):
        return parameter_count(create_timm_model(spec))


def inspect(in_path: Path, out_path: Path) -> None:
    request = json.loads(in_path.read_text())
    out = {
        "names": {name: _name_report(name) for name in request.get("names", [])},
        "counts": [_count(spec) for spec in request.get("specs", [])],
    }
    out_path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    commands = {
        "load-export": each(load_export),
        "make-reference": each(make_reference),
        "inspect": inspect,
    }
    run_commands(sys.argv[1:], commands)
