"""Torch-side half of the open_clip export parity tests (runs in .venv-torch, never imports JAX).

Two commands, each reading ``inputs.npz`` (``images`` NHWC float32, ``tokens`` int) from a case
directory and writing ``torch_outputs.npz`` (normalised ``image_embeds``, ``text_embeds``,
``logit_scale`` (the log), ``logit_bias`` if any) and ``report.json`` next to it:

``load-export CASE_DIR [NAME] [--registered MODEL]``
    Builds the model the way a user would, ``open_clip.create_model("local-dir:CASE_DIR/export")``
    (which loads the weights with strict=True), then loads the exported safetensors again with a
    plain ``model.load_state_dict(..., strict=True)``, and reports the model's own key set, shapes
    and parameter count for the test to compare. With ``NAME``, also checks the registry path
    ``add_model_config(NAME.json)`` + ``create_model(NAME, pretrained=weights)``. With
    ``--registered MODEL`` (e.g. ``MobileCLIP-S1``), also loads the weights with strict=True into
    open_clip's own ``create_model(MODEL, pretrained=None)`` and writes its outputs as well, each
    name prefixed ``registered_``; the report gets that model's config and class.

``make-reference CASE_DIR MODEL``
    Creates an open_clip model from a built-in name (e.g. ``ViT-B-16``) or a config JSON path
    (``CLIP``, or ``CustomTextCLIP`` when the config says ``custom_text``; a timm trunk may be
    ``local-dir:/path``), with random weights (LayerNorm and biases perturbed too, not left at 1
    and 0; BatchNorm running statistics from the inputs, perturbed, for a ResNet), and writes
    ``CASE_DIR/reference/{open_clip_config.json, open_clip_model.safetensors}`` for the JAX side
    to import.

``describe OUT_JSON NAME...``
    For open_clip's registered model names: the model config (``get_model_config``) and the
    state dict's keys and shapes, built on the meta device (no memory, no init time).

``describe-trunks OUT_JSON NAME...``
    For timm model names: ``timm.create_model(name, num_classes=0, global_pool="token")`` (as
    open_clip builds a trunk with ``timm_pool: token``) on the meta device; its state
    dict's keys and shapes, image size, pooling, and whether it has RoPE (with its reference grid),
    a final norm and an fc norm.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
from parity_files import read_inputs, write_results
from safetensors.torch import load_file, save_file
from torch_parity import images_nchw, parameter_count, same_weights, state_report


def _embed(model: torch.nn.Module, case_dir: Path) -> dict[str, np.ndarray]:
    images = images_nchw(case_dir)
    tokens = torch.from_numpy(read_inputs(case_dir)["tokens"]).long()
    model.eval()
    with torch.no_grad():
        outputs = {
            "image_embeds": model.encode_image(images, normalize=True).numpy(),
            "text_embeds": model.encode_text(tokens, normalize=True).numpy(),
            "logit_scale": model.logit_scale.detach().numpy(),
        }
        if getattr(model, "logit_bias", None) is not None:
            outputs["logit_bias"] = model.logit_bias.detach().numpy()
        trunk = getattr(model.visual, "trunk", None)
        if hasattr(trunk, "num_prefix_tokens"):
            # A timm ViT tower's projection (its classifier head, or open_clip's visual.head) is a
            # per-token Linear: applied to every final-normed token, it gives UTA's targets.
            # (Convolutional trunks, e.g. MobileCLIP's FastViT, have no tokens to project.)
            tokens = trunk.forward_features(images)
            outputs["projected_tokens"] = model.visual.head(trunk.head(tokens)).numpy()
    return outputs


def load_export(case_dir: Path, name: str | None, registered: str | None = None) -> None:
    export_dir = case_dir / "export"
    model = open_clip.create_model(f"local-dir:{export_dir}")
    exported = load_file(str(export_dir / "open_clip_model.safetensors"))
    # strict=True raises on any missing or unexpected key and on any shape mismatch.
    model.load_state_dict(exported, strict=True)
    report = {
        **state_report(model),
        "exported_keys": sorted(exported),
        "tokenizer_class": type(open_clip.get_tokenizer(f"local-dir:{export_dir}")).__name__,
    }
    if name is not None:
        open_clip.add_model_config(export_dir / f"{name}.json")
        named = open_clip.create_model(
            name, pretrained=str(export_dir / "open_clip_model.safetensors")
        )
        report["named_model_matches"] = same_weights(model, named)
    outputs = _embed(model, case_dir)
    if registered is not None:
        # open_clip's own model of that name, randomly initialised, then the export on top.
        reference = open_clip.create_model(registered, pretrained=None)
        reference.load_state_dict(exported, strict=True)
        report["registered"] = {
            "name": registered,
            "model_class": type(reference).__name__,
            "model_cfg": open_clip.get_model_config(registered),
        }
        outputs.update(
            {f"registered_{key}": value for key, value in _embed(reference, case_dir).items()}
        )
    write_results(case_dir, outputs, report)


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere: LayerNorm scales near 1, biases and weights around their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("trunk.head.weight"):
                # timm initialises its classifier 1000x smaller than a projection; as the CLIP
                # projection it must not be dwarfed by its (perturbed) bias.
                parameter.copy_(noise / parameter.shape[1] ** 0.5)
                continue
            spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
            parameter.add_(noise * (0.1 * spread if spread > 0 else 0.05))


def _calibrate_batch_norms_(model: torch.nn.Module, case_dir: Path, seed: int) -> None:
    """BatchNorm running statistics as a trained model has them (a ResNet tower): the inputs'
    own statistics (one cumulative pass), then perturbed so that they are not exactly those.
    Models without BatchNorm are left untouched."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    images = images_nchw(case_dir)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model.encode_image(images.contiguous())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            shape = norm.running_mean.shape
            spread = norm.running_var.sqrt()
            norm.running_mean.add_(0.1 * spread * torch.randn(shape, generator=generator))
            norm.running_var.mul_(0.7 + 0.6 * torch.rand(shape, generator=generator))
    model.eval()


def make_reference(case_dir: Path, model_spec: str) -> None:
    torch.manual_seed(0)
    if model_spec.endswith(".json"):
        model_config = json.loads(Path(model_spec).read_text())
        kwargs = {key: value for key, value in model_config.items() if key != "custom_text"}
        model_class = (
            open_clip.model.CustomTextCLIP
            if model_config.get("custom_text")
            else open_clip.model.CLIP
        )
        model = model_class(**kwargs)
    else:
        model_config = open_clip.get_model_config(model_spec)
        model = open_clip.create_model(model_spec)
    _perturb_(model, seed=1)
    _calibrate_batch_norms_(model, case_dir, seed=2)
    reference_dir = case_dir / "reference"
    reference_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(reference_dir / "open_clip_model.safetensors"))
    (reference_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config}))
    report = {
        "model_class": type(model).__name__,
        "num_keys": len(state),
        "num_parameters": parameter_count(model),
    }
    write_results(case_dir, _embed(model, case_dir), report)


def describe(out_path: Path, names: list[str]) -> None:
    described = {}
    for name in names:
        with torch.device("meta"):
            model = open_clip.create_model(name, device="meta")
        state = model.state_dict()
        described[name] = {
            "model_cfg": open_clip.get_model_config(name),
            "model_class": type(model).__name__,
            "shapes": {key: list(value.shape) for key, value in state.items()},
        }
    out_path.write_text(json.dumps(described))


def describe_trunks(out_path: Path, names: list[str]) -> None:
    described = {}
    for name in names:
        with torch.device("meta"):
            trunk = timm.create_model(name, pretrained=False, num_classes=0, global_pool="token")
        rope = trunk.rope
        described[name] = {
            "shapes": {key: list(value.shape) for key, value in trunk.state_dict().items()},
            "img_size": list(trunk.patch_embed.img_size),
            "global_pool": trunk.global_pool,
            "rope": rope is not None,
            "rope_ref_feat_shape": (
                list(rope.ref_feat_shape) if getattr(rope, "ref_feat_shape", None) else None
            ),
            "final_norm": not isinstance(trunk.norm, torch.nn.Identity),
            "fc_norm": not isinstance(trunk.fc_norm, torch.nn.Identity),
            "norm_eps": trunk.norm.eps if hasattr(trunk.norm, "eps") else None,
        }
    out_path.write_text(json.dumps(described))


def main(argv: list[str]) -> None:
    command, case_dir, *rest = argv
    if command == "load-export":
        registered = None
        if "--registered" in rest:
            flag = rest.index("--registered")
            registered = rest[flag + 1]
            del rest[flag : flag + 2]
        load_export(Path(case_dir), rest[0] if rest else None, registered)
    elif command == "make-reference":
        make_reference(Path(case_dir), rest[0])
    elif command == "describe":
        describe(Path(case_dir), rest)
    elif command == "describe-trunks":
        describe_trunks(Path(case_dir), rest)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
