"""Benchmark: the UTA train step with masking vs without, measured in one run.

    .venv/bin/python bench/uta_step.py [--size large] [--mask 0.5] [--batch 4] [--steps 3]

The student is the recipe's (configs/uta_vit{b,l}.py, 224 px); the teacher is a ViT-B/16 CLIP of
this project's recipe with random weights (the same in both runs). Prints the measured step-time
ratio (mask / no mask) beside the ideal ratio from XLA's cost analysis (FLOPs) of the two
compiled steps. Token dropping works when the measured ratio is close to the ideal one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.uta_common import uta_config  # noqa: E402
from pretrain import sharding, trainer  # noqa: E402
from pretrain.data import masking  # noqa: E402
from pretrain.optim import make_optimizer  # noqa: E402
from pretrain.tasks.uta import Task  # noqa: E402


def random_frozen(task: Task) -> dict:
    images = jnp.zeros((1, task.teacher.image_size, task.teacher.image_size, 3))
    tokens = jnp.zeros((1, task.teacher.context_length), jnp.int32)
    params = jax.jit(task.teacher.model.init)(jax.random.key(1), images, tokens)["params"]
    return {"teacher": jax.tree.map(lambda x: x.astype(task.teacher.dtype), params)}


def time_step(size: str, mask_ratio: float, batch_size: int, steps: int, dtype: str) -> dict:
    config = uta_config(size, None)
    config.masking.mask_ratio = mask_ratio
    config.batch_size = batch_size
    config.model.dtype = dtype
    config.teacher.update({"source": "workdir", "config": "configs/clip_vitb16.py", "dtype": dtype})
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    task = Task(config, mesh)
    tx, schedule = make_optimizer(config)
    build = trainer.init_state(task, tx, seed=0, use_ema=False)
    state = jax.jit(build)(random_frozen(task))
    rng = np.random.default_rng(0)
    keep = np.stack(
        [masking.reversed_block_mask_indices(rng, task.grid, mask_ratio) for _ in range(batch_size)]
    )
    size_px = task.image_size
    batch = sharding.global_batch_from_local(
        {
            "image": rng.integers(0, 256, (batch_size, size_px, size_px, 3), dtype=np.uint8),
            "keep_indices": keep.astype(np.int32),
        },
        mesh,
    )
    step = trainer.make_train_step(task, tx, schedule, mesh)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return {
        "seconds": (time.perf_counter() - start) / steps,
        "gflop": cost.get("flops", float("nan")) / 1e9,
        "kept": keep.shape[1],
        "patches": task.grid[0] * task.grid[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=["base", "large"])
    parser.add_argument("--mask", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="bfloat16 on accelerators")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, UTA-{args.size} student, batch {args.batch}")
    masked = time_step(args.size, args.mask, args.batch, args.steps, args.dtype)
    full = time_step(args.size, 0.0, args.batch, args.steps, args.dtype)
    for name, result in ((f"mask {args.mask:.2f}", masked), ("no mask", full)):
        print(
            f"{name}: {result['kept']}/{result['patches']} patches, "
            f"{result['seconds']:.3f} s/step, {result['gflop']:.1f} GFLOP/step"
        )
    measured = masked["seconds"] / full["seconds"]
    ideal = masked["gflop"] / full["gflop"]
    print(f"step time ratio (mask / no mask): measured {measured:.3f}, ideal (FLOPs) {ideal:.3f}")
    print(f"measured / ideal: {measured / ideal:.3f}")


if __name__ == "__main__":
    main()
