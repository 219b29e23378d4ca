"""Benchmark: the UTA train step with masking vs without, measured in one run.

    .venv/bin/python bench/uta_step.py [--size large] [--mask 0.5] [--batch 4] [--steps 3]

The student is the recipe's (configs/uta_vit{b,l}.py, 224 px); the teacher is a ViT-B/16 CLIP of
this project's recipe with random weights (the same in both runs). Prints the measured step-time
ratio (mask / no mask) beside the ideal ratio from XLA's cost analysis (FLOPs) of the two
compiled steps. Token dropping works when the measured ratio is close to the ideal one. Both steps
are compiled first, called once to warm up, then timed in alternating rounds (medians of
``--steps`` steps each: bench/timing.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import harness, timing  # noqa: E402
from configs.uta_common import uta_config  # noqa: E402
from pretrain.data import masking  # noqa: E402
from pretrain.tasks.uta import Task  # noqa: E402


def random_frozen(task: Task) -> dict:
    images = jnp.zeros((1, task.teacher.image_size, task.teacher.image_size, 3))
    tokens = jnp.zeros((1, task.teacher.context_length), jnp.int32)
    params = jax.jit(task.teacher.model.init)(jax.random.key(1), images, tokens)["params"]
    return {"teacher": jax.tree.map(lambda x: x.astype(task.teacher.dtype), params)}


def masked_step(size: str, mask_ratio: float, batch_size: int, dtype: str) -> dict:
    """The compiled step with ``mask_ratio`` of the patches dropped, and its token counts."""
    config = uta_config(size, None)
    config.masking.mask_ratio = mask_ratio
    config.batch_size = batch_size
    config.model.dtype = dtype
    config.teacher.update({"source": "workdir", "config": "configs/clip_vitb16.py", "dtype": dtype})
    task, mesh = harness.one_device_task(config)
    rng = np.random.default_rng(0)
    keep = np.stack(
        [masking.reversed_block_mask_indices(rng, task.grid, mask_ratio) for _ in range(batch_size)]
    )
    size_px = task.image_size
    local_batch = {
        "image": rng.integers(0, 256, (batch_size, size_px, size_px, 3), dtype=np.uint8),
        "keep_indices": keep.astype(np.int32),
    }
    return {
        "step": harness.compiled_train_step(config, task, mesh, local_batch, random_frozen(task)),
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
    masked = f"mask {args.mask:.2f}"
    runs = {
        masked: masked_step(args.size, args.mask, args.batch, args.dtype),
        "no mask": masked_step(args.size, 0.0, args.batch, args.dtype),
    }
    timings = timing.time_interleaved({name: run["step"] for name, run in runs.items()}, args.steps)
    for name, run in runs.items():
        print(
            f"{name}: {run['kept']}/{run['patches']} patches, "
            f"{timings[name].median:.3f} s/step ({timings[name].describe()}), "
            f"{run['step'].gflop:.1f} GFLOP/step"
        )
    measured = timings[masked].median / timings["no mask"].median
    ideal = runs[masked]["step"].gflop / runs["no mask"]["step"].gflop
    print(f"step time ratio (mask / no mask): measured {measured:.3f}, ideal (FLOPs) {ideal:.3f}")
    print(f"measured / ideal: {measured / ideal:.3f}")


if __name__ == "__main__":
    main()
