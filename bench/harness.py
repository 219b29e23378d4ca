"""What the JAX benches share besides timing (bench/timing.py): a config's train step compiled for
one device on a fixed batch, random CLIP batches, XLA's FLOP count of a compiled program, and the
PyTorch-side scripts (bench/torch_side/, run with the separate PyTorch environment).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.optim import make_optimizer
from pretrain.state import init_state
from pretrain.task import Task, build_task
from pretrain.train_step import make_train_step

REPO = Path(__file__).resolve().parents[1]
TORCH_SIDE = REPO / "bench" / "torch_side"
CLIP_START_TOKEN, CLIP_END_TOKEN = 49_406, 49_407


def flops(compiled: Any) -> float:
    """XLA's cost-analysis FLOP count of a compiled program (NaN when the backend reports none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def random_clip_batch(batch: int, image_size: int, context_length: int) -> dict[str, np.ndarray]:
    """Random uint8 images and token rows (start / end tokens at the ends), seed 0."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 49_000, (batch, context_length), dtype=np.int32)
    tokens[:, 0], tokens[:, -1] = CLIP_START_TOKEN, CLIP_END_TOKEN
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    return {"image": images, "text": tokens}


def one_device_task(config: ConfigDict) -> tuple[Task, Mesh]:
    """``config``'s task on a one-device data mesh (the benches time one chip)."""
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return build_task(config, mesh), mesh


@dataclasses.dataclass
class TrainStep:
    """A compiled train step on a fixed batch. Each call runs one step on the state the previous
    call returned (the step donates its input state, as the trainer's does) and returns the
    step's metrics."""

    compiled: Any
    state: Any
    batch: Any
    gflop: float

    def __call__(self) -> Any:
        self.state, metrics = self.compiled(self.state, self.batch)
        return metrics


def compiled_train_step(
    config: ConfigDict,
    task: Task,
    mesh: Mesh,
    local_batch: dict[str, np.ndarray],
    frozen: Any = None,
) -> TrainStep:
    """The trainer's step of ``task`` (forward, backward, optimizer, EMA when ``config`` has an
    ``ema_decay``) from a seed-0 initial state, compiled for ``local_batch``; ``frozen``: the
    task's frozen variables (e.g. a teacher), if it has any."""
    tx, schedule = make_optimizer(config)
    use_ema = bool(config.get("ema_decay"))  # the trainer's rule
    build = init_state(task, tx, seed=0, use_ema=use_ema)
    state = jax.jit(build)() if frozen is None else jax.jit(build)(frozen)
    step = make_train_step(
        task, tx, schedule, mesh, ema_decay=float(config.ema_decay) if use_ema else None
    )
    batch = sharding.global_batch_from_local(local_batch, mesh)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    return TrainStep(compiled, state, batch, flops(compiled) / 1e9)


def torch_python() -> Path | None:
    """The PyTorch environment's interpreter ($TORCH_PYTHON, else .venv-torch/bin/python), or
    None when there is none."""
    python = Path(os.environ.get("TORCH_PYTHON", REPO / ".venv-torch" / "bin" / "python"))
    return python if python.exists() else None


def run_torch_script(python: Path, script: str, *args: str) -> dict[str, Any] | None:
    """The JSON object that bench/torch_side/``script`` prints last, run by ``python``; None
    (with the end of its stderr printed) when it fails."""
    command = [str(python), str(TORCH_SIDE / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"{script} {' '.join(args)} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])
