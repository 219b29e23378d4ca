"""Benchmark: the CLIP ViT-B/16 train step (forward, backward, AdamW, EMA) on this machine.

    .venv/bin/python bench/train_step.py [--batch 8] [--steps 3] [--dtypes float32,bfloat16]

Prints examples/s and achieved FLOP/s (XLA's cost analysis of the compiled step) for each compute
dtype, and, when the PyTorch environment exists (.venv-torch or $TORCH_PYTHON), the same step of
open_clip's ViT-B-16 in PyTorch with the same batch, measured in the same run, as a ratio. Each
step is called once to warm up, then timed as the median of ``--steps`` steps (bench/timing.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from bench import harness, timing  # noqa: E402
from configs.clip_vitb16 import get_config  # noqa: E402


def time_jax_step(batch_size: int, steps: int, dtype: str) -> dict[str, float]:
    config = get_config()
    config.model.dtype = dtype
    config.batch_size = batch_size
    # The same work as the open_clip step: towers, CLIP loss, AdamW, EMA (no RangeAugment).
    config.range_augment.enabled = False
    task, mesh = harness.one_device_task(config)
    local_batch = harness.random_clip_batch(
        batch_size, config.data.image_size, config.model.text.context_length
    )
    step = harness.compiled_train_step(config, task, mesh, local_batch)
    measured = timing.time_repeated(step, steps)
    return {
        "seconds_per_step": measured.median,
        "examples_per_second": batch_size / measured.median,
        "gflop_per_step": step.gflop,
        "spread": measured.spread,
    }


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
            f"{r['gflop_per_step'] / r['seconds_per_step']:.1f} GFLOP/s "
            f"(median of {args.steps}, spread {r['spread']:.0%})"
        )
    python = harness.torch_python()
    torch_result = python and harness.run_torch_script(
        python, "open_clip_train_step.py", "--batch", str(args.batch), "--steps", str(args.steps)
    )
    if not torch_result:
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
