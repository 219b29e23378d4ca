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

import numpy as np
import timm
import torch
from check_timm_eva import _perturb_, _run
from safetensors.torch import load_file, save_file


def _report(model: torch.nn.Module) -> dict:
    state = model.state_dict()
    return {
        "model_class": type(model).__name__,
        "model_keys": sorted(state),
        "model_shapes": {key: list(value.shape) for key, value in state.items()},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "norm_eps": model.norm.eps,
        "block_norm_eps": model.blocks[0].norm1.eps,
        "activation": type(model.blocks[0].mlp.act).__name__,
    }


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return sorted(a) == sorted(b) and all(torch.equal(value, b[key]) for key, value in a.items())


def load_export(case_dir: Path) -> None:
    export_dir = case_dir / "export"
    config = json.loads((export_dir / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    exported = load_file(str(export_dir / "model.safetensors"))
    # strict=True raises on any missing or unexpected key and on any shape mismatch.
    model.load_state_dict(exported, strict=True)
    from_dir = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    outputs = _run(model, case_dir)
    local_dir_outputs = _run(from_dir, case_dir)
    report = {
        **_report(model),
        "exported_keys": sorted(exported),
        "local_dir_matches": _same_weights(model, from_dir),
        "local_dir_max_diff": max(
            float(np.abs(outputs[name] - local_dir_outputs[name]).max()) for name in outputs
        ),
    }
    np.savez(case_dir / "torch_outputs.npz", **outputs)
    (case_dir / "report.json").write_text(json.dumps(report, indent=2))


def make_reference(case_dir: Path) -> None:
    spec = json.loads((case_dir / "spec.json").read_text())
    torch.manual_seed(0)
    model = timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])
    _perturb_(model, seed=1)
    if spec.get("random_head_bias") and isinstance(model.head, torch.nn.Linear):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(2)
            model.head.bias.copy_(0.1 * torch.randn(model.head.bias.shape, generator=generator))
    reference_dir = case_dir / "reference"
    reference_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(reference_dir / "model.safetensors"))
    config = {"architecture": spec["architecture"], "model_args": spec["model_args"]}
    (reference_dir / "config.json").write_text(json.dumps(config))
    np.savez(case_dir / "torch_outputs.npz", **_run(model, case_dir))
    (case_dir / "report.json").write_text(json.dumps(_report(model), indent=2))


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
        model = timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])
    return sum(p.numel() for p in model.parameters())


def inspect(in_path: Path, out_path: Path) -> None:
    request = json.loads(in_path.read_text())
    out = {
        "names": {name: _name_report(name) for name in request.get("names", [])},
        "counts": [_count(spec) for spec in request.get("specs", [])],
    }
    out_path.write_text(json.dumps(out, indent=2))


def main(argv: list[str]) -> None:
    command, *rest = argv
    if command == "load-export":
        for case_dir in rest:
            load_export(Path(case_dir))
    elif command == "make-reference":
        for case_dir in rest:
            make_reference(Path(case_dir))
    elif command == "inspect":
        inspect(Path(rest[0]), Path(rest[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
