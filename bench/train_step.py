"""Benchmark: the CLIP ViT-B/16 train step (forward, backward, AdamW, EMA) on this machine.

    .venv/bin/python bench/train_step.py [--batch 8] [--steps 3] [--dtypes float32,bfloat16]

Prints examples/s and achieved FLOP/s (XLA's cost analysis of the compiled step) for each compute
dtype, and, when the PyTorch environment exists (.venv-torch or $TORCH_PYTHON), the same step of
open_clip's ViT-B-16 in PyTorch with the same batch, measured in the same run, as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs.clip_vitb16 import get_config  # noqa: E402
from pretrain import sharding, trainer  # noqa: E402
from pretrain.optim import make_optimizer  # noqa: E402
from pretrain.tasks.clip import Task  # noqa: E402


def random_batch(batch: int, image_size: int, context_length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 49_000, (batch, context_length), dtype=np.int32)
    tokens[:, 0], tokens[:, -1] = 49_406, 49_407
    return {
        "image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
        "text": tokens,
    }


def time_jax_step(batch_size: int, steps: int, dtype: str) -> dict[str, float]:
    config = get_config()
    config.model.dtype = dtype
    config.batch_size = batch_size
    # The same work as the open_clip step: towers, CLIP loss, AdamW, EMA (no RangeAugment).
    config.range_augment.enabled = False
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    task = Task(config, mesh)
    tx, schedule = make_optimizer(config)
    build = trainer.init_state(task, tx, seed=0, use_ema=True)
    state = jax.jit(build)()
    step_fn = trainer.make_train_step(task, tx, schedule, mesh, ema_decay=config.ema_decay)
    batch = sharding.global_batch_from_local(
        random_batch(batch_size, config.data.image_size, config.model.text.context_length), mesh
    )
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return {
        "seconds_per_step": seconds,
        "examples_per_second": batch_size / seconds,
        "gflop_per_step": cost.get("flops", float("nan")) / 1e9,
    }


def time_open_clip_step(batch_size: int, steps: int) -> dict[str, float] | None:
    python = Path(os.environ.get("TORCH_PYTHON", REPO / ".venv-torch" / "bin" / "python"))
    if not python.exists():
        return None
    script = REPO / "bench" / "torch_side" / "open_clip_train_step.py"
    result = subprocess.run(
        [str(python), str(script), "--batch", str(batch_size), "--steps", str(steps)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        print(f"open_clip benchmark failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch}")
    results = {}
    for dtype in args.dtypes.split(","):
        results[dtype] = time_jax_step(args.batch, args.steps, dtype)
        r = results[dtype]
        print(
            f"JAX ViT-B/16 CLIP step ({dtype}): {r['examples_per_second']:.2f} examples/s, "
            f"{r['seconds_per_step']:.2f} s/step, {r['gflop_per_step']:.0f} GFLOP/step, "
            f"{r['gflop_per_step'] / r['seconds_per_step']:.1f} GFLOP/s"
        )
    torch_result = time_open_clip_step(args.batch, args.steps)
    if torch_result is None:
        print("open_clip (PyTorch) step: not measured (no torch environment)")
        return
    print(
        f"open_clip ViT-B-16 step (PyTorch float32): "
        f"{torch_result['examples_per_second']:.2f} examples/s, "
        f"{torch_result['seconds_per_step']:.2f} s/step"
    )
    if "float32" in results:
        ratio = results["float32"]["examples_per_second"] / torch_result["examples_per_second"]
        print(f"ratio JAX float32 / open_clip float32 examples/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
