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

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _run(model: torch.nn.Module, case_dir: Path) -> dict[str, np.ndarray]:
    images = np.load(case_dir / "inputs.npz")["images"]
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    model.eval()
    with torch.no_grad():
        return {
            "features": model.forward_features(images).numpy(),
            "pooled": model(images).numpy(),
        }


def _report(model: torch.nn.Module) -> dict:
    state = model.state_dict()
    return {
        "model_class": type(model).__name__,
        "model_keys": sorted(state),
        "model_shapes": {key: list(value.shape) for key, value in state.items()},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "rope": model.rope is not None,
    }


def load_export(case_dir: Path) -> None:
    export_dir = case_dir / "export"
    config = json.loads((export_dir / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    exported = load_file(str(export_dir / "model.safetensors"))
    # strict=True raises on any missing or unexpected key and on any shape mismatch.
    model.load_state_dict(exported, strict=True)
    from_dir = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    report = {
        **_report(model),
        "exported_keys": sorted(exported),
        "local_dir_matches": sorted(from_dir.state_dict()) == sorted(model.state_dict())
        and all(
            torch.equal(value, from_dir.state_dict()[key])
            for key, value in model.state_dict().items()
        ),
    }
    outputs = _run(model, case_dir)
    local_dir_outputs = _run(from_dir, case_dir)
    report["local_dir_max_diff"] = max(
        float(np.abs(outputs[name] - local_dir_outputs[name]).max()) for name in outputs
    )
    np.savez(case_dir / "torch_outputs.npz", **outputs)
    (case_dir / "report.json").write_text(json.dumps(report, indent=2))


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere: LayerNorm scales near 1, biases and weights around their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "head.weight":
                # timm scales its head init by 1e-3; give it a projection's scale instead, so that
                # the pooled output is far from zero and its comparison means something.
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
                parameter.mul_(parameter.shape[1] ** -0.5)
                continue
            if name == "head.bias":
                continue
            spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * (0.2 * spread if spread > 0 else 0.05))
        if getattr(model, "head", None) is not None and hasattr(model.head, "bias"):
            model.head.bias.zero_()


def make_reference(case_dir: Path, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    torch.manual_seed(0)
    model = timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])
    _perturb_(model, seed=1)
    reference_dir = case_dir / "reference"
    reference_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(reference_dir / "model.safetensors"))
    (reference_dir / "config.json").write_text(json.dumps(spec))
    np.savez(case_dir / "torch_outputs.npz", **_run(model, case_dir))
    (case_dir / "report.json").write_text(json.dumps(_report(model), indent=2))


def count(specs_path: Path, out_path: Path) -> None:
    counts = []
    for spec in json.loads(specs_path.read_text()):
        with torch.device("meta"):
            model = timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])
        counts.append(sum(p.numel() for p in model.parameters()))
    out_path.write_text(json.dumps(counts))


def main(argv: list[str]) -> None:
    command, *rest = argv
    if command == "load-export":
        load_export(Path(rest[0]))
    elif command == "make-reference":
        make_reference(Path(rest[0]), Path(rest[1]))
    elif command == "count":
        count(Path(rest[0]), Path(rest[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
