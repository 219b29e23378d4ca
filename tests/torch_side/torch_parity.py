"""What the torch-side parity scripts share (runs in .venv-torch, never imports JAX): the case's
images as torch takes them, a model's state-dict report, random weights, and timm's two ways of
loading an export directory (by architecture + ``model_args`` with a strict ``load_state_dict``,
and ``local-dir:``) with the check that both give the same model."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import timm
import torch
from parity_files import read_inputs, write_results
from safetensors.torch import load_file, save_file

# float32 parity: no TF32 matmuls.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

TIMM_WEIGHTS_FILE = "model.safetensors"
TIMM_CONFIG_FILE = "config.json"


def images_nchw(case_dir: Path) -> torch.Tensor:
    """The case's ``images`` (NHWC, as JAX takes them) as torch's NCHW."""
    return torch.from_numpy(read_inputs(case_dir)["images"]).permute(0, 3, 1, 2).contiguous()


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 1).contiguous().numpy()


def run_vit(model: torch.nn.Module, case_dir: Path) -> dict[str, np.ndarray]:
    """A timm ViT's ``features`` (``forward_features``: final-normed tokens, class token first)
    and ``pooled`` (``forward``: through the head if any) in eval mode."""
    images = images_nchw(case_dir)
    model.eval()
    with torch.no_grad():
        return {"features": model.forward_features(images).numpy(), "pooled": model(images).numpy()}


def state_report(model: torch.nn.Module) -> dict:
    """The model's class, state-dict keys and shapes, and parameter count (buffers not counted)."""
    state = model.state_dict()
    return {
        "model_class": type(model).__name__,
        "model_keys": sorted(state),
        "model_shapes": {key: list(value.shape) for key, value in state.items()},
        "num_parameters": parameter_count(model),
    }


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return sorted(a) == sorted(b) and all(torch.equal(value, b[key]) for key, value in a.items())


def perturb_timm_(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere: LayerNorm scales near 1, biases and weights around their init;
    the head weight at a projection's scale, the ViT head's bias zero (the project's projection
    has none)."""
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


def create_timm_model(spec: dict, **kwargs) -> torch.nn.Module:
    """``timm.create_model(architecture, pretrained=False, **model_args)`` of a config or spec."""
    return timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"], **kwargs)


def load_timm_export(export_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """``(model, from_local_dir, exported state)``: the model built from ``config.json`` as a user
    would, with the export loaded ``strict=True`` (which raises on any missing or unexpected key
    and any shape mismatch), and the same through ``timm.create_model("local-dir:...")``."""
    config = json.loads((export_dir / TIMM_CONFIG_FILE).read_text())
    model = create_timm_model(config)
    exported = load_file(str(export_dir / TIMM_WEIGHTS_FILE))
    model.load_state_dict(exported, strict=True)
    from_dir = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    return model, from_dir, exported


Run = Callable[[torch.nn.Module, Path], dict[str, np.ndarray]]


def check_timm_export(case_dir: Path, run: Run) -> tuple[torch.nn.Module, dict, dict, dict]:
    """Load ``CASE_DIR/export`` both ways and run both: ``(model, exported state, outputs,
    report)``, the report with the model's state (state_report), the exported keys and whether
    ``local-dir:`` gives the same weights and outputs."""
    model, from_dir, exported = load_timm_export(case_dir / "export")
    outputs = run(model, case_dir)
    local_dir_outputs = run(from_dir, case_dir)
    report = {
        **state_report(model),
        "exported_keys": sorted(exported),
        "local_dir_matches": same_weights(model, from_dir),
        "local_dir_max_diff": max(
            float(np.abs(outputs[name] - local_dir_outputs[name]).max()) for name in outputs
        ),
    }
    return model, exported, outputs, report


def write_timm_reference(
    case_dir: Path, model: torch.nn.Module, spec: dict, outputs: dict, report: dict | None = None
) -> None:
    """Write ``model`` as a timm export directory ``CASE_DIR/reference`` (for the JAX side to
    import) and its outputs (and report) next to it."""
    reference_dir = case_dir / "reference"
    reference_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(reference_dir / TIMM_WEIGHTS_FILE))
    (reference_dir / TIMM_CONFIG_FILE).write_text(json.dumps(spec))
    write_results(case_dir, outputs, report)


def each(command: Callable[[Path], None]) -> Callable[..., None]:
    """A command over one case directory, run for every case directory it is given."""

    def for_each(*case_dirs: Path) -> None:
        for case_dir in case_dirs:
            command(case_dir)

    return for_each


def run_commands(argv: list[str], commands: Mapping[str, Callable[..., None]]) -> None:
    """Run ``COMMAND ARG...`` groups separated by ``--`` in order, in one process (torch and timm
    import once); each command gets its arguments as paths."""
    groups: list[list[str]] = [[]]
    for word in argv:
        if word == "--":
            groups.append([])
        else:
            groups[-1].append(word)
    for name, *args in filter(None, groups):
        if name not in commands:
            raise SystemExit(f"unknown command {name!r}; known: {sorted(commands)}")
        commands[name](*map(Path, args))
