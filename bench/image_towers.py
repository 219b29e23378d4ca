"""Benchmark: forward-pass images/s of the image towers (inference, float32, one device).

    .venv/bin/python bench/image_towers.py [--batch 8] [--rounds 5]
        [--models mci0,mci1,mci2,vit_b16]

Towers: MobileCLIP MCi0 / MCi1 / MCi2 at 256 px, each in its train-time form applied with
``train=False`` (BatchNorm running statistics) and in the re-parameterised form from
:func:`models.mobileclip_reparam.reparameterize`; and the CLIP ViT-B/16 tower at 224 px. All have
random weights and a 512-d projection. Each JAX forward is jit-compiled outside the timing, called
once to warm up, then timed as the median of ``--rounds`` calls (bench/timing.py).

When the PyTorch environment exists (.venv-torch or $TORCH_PYTHON), timm's versions of the same
towers (``fastvit_mci*`` before and after ``timm.utils.reparameterize_model``,
``vit_base_patch16_clip_224``; eval mode, ``torch.inference_mode``, float32, same batch and size)
are timed the same way by bench/torch_side/timm_image_tower.py. Interleaving: each torch tower is
measured right after its JAX counterpart (JAX tower, then its torch subprocess, then the next
tower), so that slow drifts in machine load hit both sides of a ratio alike. Prints, per tower,
JAX and torch images/s and the ratio JAX / torch, then the re-parameterised / train-form speed-up
of each MCi.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import harness, timing  # noqa: E402
from models.mobileclip import MobileClipImageTower  # noqa: E402
from models.mobileclip_reparam import reparameterize  # noqa: E402
from models.vit import VisionTransformer  # noqa: E402

OUTPUT_DIM = 512
MCI_IMAGE_SIZE = 256
VIT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class TowerCase:
    """One measured row: a JAX tower (built by ``build``) and its timm counterpart."""

    label: str
    image_size: int
    timm_name: str
    reparameterized: bool
    build: Callable[[], tuple[nn.Module, dict[str, Any]]]


def init_variables(tower: nn.Module, image_size: int) -> dict[str, Any]:
    """Random weights (and, for MCi, BatchNorm running statistics) of ``tower``."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(tower.init)(jax.random.key(0), images)


def mci_builder(variant: str, reparameterized: bool) -> Callable[[], tuple[nn.Module, dict]]:
    def build() -> tuple[nn.Module, dict[str, Any]]:
        tower = MobileClipImageTower.from_variant(variant, output_dim=OUTPUT_DIM)
        variables = init_variables(tower, MCI_IMAGE_SIZE)
        if reparameterized:
            variables, tower = reparameterize(jax.device_get(variables), tower)
        return tower, variables

    return build


def vit_b16() -> tuple[nn.Module, dict[str, Any]]:
    tower = VisionTransformer.from_variant("B/16", output_dim=OUTPUT_DIM)
    return tower, init_variables(tower, VIT_IMAGE_SIZE)


def tower_cases(models: list[str]) -> list[TowerCase]:
    cases = []
    for model in models:
        if model == "vit_b16":
            cases.append(
                TowerCase("ViT-B/16", VIT_IMAGE_SIZE, "vit_base_patch16_clip_224", False, vit_b16)
            )
            continue
        if model not in ("mci0", "mci1", "mci2"):
            raise ValueError(f"unknown model {model!r}; choose from mci0, mci1, mci2, vit_b16")
        for reparameterized in (False, True):
            form = "reparam" if reparameterized else "train-form"
            cases.append(
                TowerCase(
                    f"MCi{model[-1]} {form}",
                    MCI_IMAGE_SIZE,
                    f"fastvit_{model}",
                    reparameterized,
                    mci_builder(model, reparameterized),
                )
            )
    return cases


def time_jax_tower(case: TowerCase, batch: int, rounds: int) -> float:
    """Median seconds of one jit-compiled forward call of ``case``'s tower on ``batch`` images."""
    tower, variables = case.build()
    device = jax.devices()[0]
    variables = jax.device_put(variables, device)
    images = jax.device_put(
        np.random.default_rng(0)
        .standard_normal((batch, case.image_size, case.image_size, 3))
        .astype(np.float32),
        device,
    )

    def forward(variables: dict[str, Any], images: jax.Array) -> jax.Array:
        embedding, _ = tower.apply(variables, images, train=False)
        return embedding

    compiled = jax.jit(forward).lower(variables, images).compile()
    return timing.time_repeated(lambda: compiled(variables, images), rounds).median


def time_torch_tower(python: Path, case: TowerCase, batch: int, rounds: int) -> float | None:
    """Median seconds of timm's forward call, from the torch-side script; None if it failed."""
    args = ["--model", case.timm_name, "--image-size", str(case.image_size)]
    args += ["--output-dim", str(OUTPUT_DIM), "--batch", str(batch), "--rounds", str(rounds)]
    if case.reparameterized:
        args.append("--reparameterize")
    result = harness.run_torch_script(python, "timm_image_tower.py", *args)
    return None if result is None else result["seconds_per_call"]


def format_row(label: str, jax_rate: float, torch_rate: float | None) -> str:
    if torch_rate is None:
        return f"{label:<22} {jax_rate:>10.2f} {'-':>10} {'-':>10}"
    return f"{label:<22} {jax_rate:>10.2f} {torch_rate:>10.2f} {jax_rate / torch_rate:>10.2f}"


def print_reparam_speedups(rates: dict[str, tuple[float, float | None]]) -> None:
    """Re-parameterised / train-form images/s of each MCi measured (JAX, and torch if present)."""
    for label, (jax_rate, torch_rate) in rates.items():
        if not label.endswith(" reparam"):
            continue
        model = label.removesuffix(" reparam")
        train_jax, train_torch = rates.get(f"{model} train-form", (None, None))
        if train_jax is None:
            continue
        line = f"{model} reparam / train-form speed-up: JAX {jax_rate / train_jax:.2f}x"
        if torch_rate is not None and train_torch is not None:
            line += f", torch {torch_rate / train_torch:.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="mci0,mci1,mci2,vit_b16")
    args = parser.parse_args()

    python = harness.torch_python()
    print(
        f"device: {jax.devices()[0].device_kind}, batch {args.batch}, float32, "
        f"median of {args.rounds} calls; torch: {'timm' if python else 'not measured (no env)'}"
    )
    print(f"{'tower':<22} {'JAX im/s':>10} {'torch im/s':>10} {'JAX/torch':>10}", flush=True)
    rates: dict[str, tuple[float, float | None]] = {}
    for case in tower_cases(args.models.split(",")):
        jax_rate = args.batch / time_jax_tower(case, args.batch, args.rounds)
        torch_seconds = time_torch_tower(python, case, args.batch, args.rounds) if python else None
        torch_rate = args.batch / torch_seconds if torch_seconds else None
        rates[case.label] = (jax_rate, torch_rate)
        print(format_row(case.label, jax_rate, torch_rate), flush=True)
    print_reparam_speedups(rates)


if __name__ == "__main__":
    main()
