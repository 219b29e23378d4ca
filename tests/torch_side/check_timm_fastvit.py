"""Torch-side half of the timm FastViT (MobileCLIP MCi) export parity tests (runs in .venv-torch,
never imports JAX).

Each CASE_DIR holds ``inputs.npz`` with ``images`` (NHWC float32). Outputs go next to it:
``torch_outputs.npz`` with, all NHWC / (B, C) float32, ``features`` (``forward_features``: the
final conv's output), ``pre_logits`` (``forward_head(..., pre_logits=True)``), ``embedding``
(``forward``), ``stage_0`` .. ``stage_3`` (``forward_intermediates``), and the same names prefixed
``reparam_`` for timm's own re-parameterised model (``timm.utils.reparameterize_model``); plus
``report.json``.

``load-export CASE_DIR...``
    Builds timm's model from ``CASE_DIR/export/config.json`` as the export's docstring tells a
    user (``create_model(architecture, pretrained=False, **model_args)``, then
    ``load_state_dict(safetensors, strict=True)``) and through ``local-dir:``; runs both in eval
    mode; re-parameterises with timm and writes that model's state dict to
    ``CASE_DIR/reparam_state.safetensors``. Reports keys, parameter counts, BatchNorm eps /
    momentum and the ``num_batches_tracked`` dtype.

``make-reference CASE_DIR``
    ``CASE_DIR/spec.json`` = ``{"architecture", "model_args"}``: a timm model with random weights
    and random BatchNorm running statistics, written as ``CASE_DIR/reference/{config.json,
    model.safetensors}`` for the JAX side to import, with its outputs.

``count OUT_JSON``
    Parameter counts of fastvit_mci0/1/2 with a 512-d head: train-time and ``inference_mode``.

Several commands may run in one process, separated by ``--`` (torch and timm import once):
``load-export A B -- make-reference C -- count out.json``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from parity_files import write_results
from safetensors.torch import save_file
from timm.utils.model import reparameterize_model
from torch_parity import (
    check_timm_export,
    create_timm_model,
    each,
    images_nchw,
    nhwc,
    parameter_count,
    perturb_timm_,
    run_commands,
    write_timm_reference,
)


def _run(model: torch.nn.Module, case_dir: Path, prefix: str = "") -> dict[str, np.ndarray]:
    images = images_nchw(case_dir)
    model.eval()
    with torch.no_grad():
        features = model.forward_features(images)
        outputs = {
            "features": nhwc(features),
            "pre_logits": model.forward_head(features, pre_logits=True).numpy(),
            "embedding": model(images).numpy(),
        }
        stages = model.forward_intermediates(images, intermediates_only=True)
        outputs.update({f"stage_{i}": nhwc(stage) for i, stage in enumerate(stages)})
    return {f"{prefix}{name}": value for name, value in outputs.items()}


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def load_export(case_dir: Path) -> None:
    model, exported, outputs, report = check_timm_export(case_dir, _run)
    norms = _batch_norms(model)
    counters = [key for key in exported if key.endswith("num_batches_tracked")]
    report.update(
        {
            "batch_norm_eps": sorted({m.eps for m in norms}),
            "batch_norm_momentum": sorted({m.momentum for m in norms}),
            "counter_dtypes": sorted({str(exported[key].dtype) for key in counters}),
            "counter_values": sorted({int(exported[key]) for key in counters}),
        }
    )
    reparameterized = reparameterize_model(copy.deepcopy(model))
    outputs.update(_run(reparameterized, case_dir, prefix="reparam_"))
    report["reparam_num_parameters"] = parameter_count(reparameterized)
    report["reparam_batch_norms"] = len(_batch_norms(reparameterized))
    state = {key: value.contiguous() for key, value in reparameterized.state_dict().items()}
    save_file(state, str(case_dir / "reparam_state.safetensors"))
    write_results(case_dir, outputs, report)


def _randomize_batch_norms_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in _batch_norms(model):
            norm.running_mean.copy_(0.3 * torch.randn(norm.running_mean.shape, generator=generator))
            spread = torch.rand(norm.running_var.shape, generator=generator)
            norm.running_var.copy_(0.5 + 1.5 * spread)
            norm.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))


def make_reference(case_dir: Path) -> None:
    spec = json.loads((case_dir / "spec.json").read_text())
    torch.manual_seed(0)
    model = create_timm_model(spec)
    perturb_timm_(model, seed=1)
    _randomize_batch_norms_(model, seed=2)
    if isinstance(model.head.fc, torch.nn.Linear):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            model.head.fc.bias.copy_(
                0.1 * torch.randn(model.head.fc.bias.shape, generator=generator)
            )
    write_timm_reference(case_dir, model, spec, _run(model, case_dir))


def count(out_path: Path) -> None:
    counts = {}
    for name in ("fastvit_mci0", "fastvit_mci1", "fastvit_mci2"):
        with torch.device("meta"):
            train = timm.create_model(name, pretrained=False, num_classes=512)
            inference = timm.create_model(
                name, pretrained=False, num_classes=512, inference_mode=True
            )
        counts[name] = {"train": parameter_count(train), "inference": parameter_count(inference)}
    out_path.write_text(json.dumps(counts, indent=2))


if __name__ == "__main__":
    commands = {
        "load-export": each(load_export),
        "make-reference": each(make_reference),
        "count": count,
    }
    run_commands(sys.argv[1:], commands)
