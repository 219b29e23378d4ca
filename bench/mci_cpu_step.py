"""Benchmark: where the CPU time of a MobileCLIP MCi train step goes, and what
``depthwise_impl="shifts"`` (models/depthwise.py) changes.

    .venv/bin/python bench/mci_cpu_step.py [--batch 64] [--image-size 64] [--rounds 3]
        [--no-layers] [--no-train-step]

The tower is configs/clip_mci0.py:runlocal's image tower (depths (1, 1, 1, 1), widths (32, 64,
128, 256), 512-d head), float32, on one CPU device, applied with ``train=True`` (BatchNorm batch
statistics, running statistics updated). "fwd" is the loss sum(sin(embedding)); "fwd+bwd" its
gradient with respect to the parameters (what a train step computes for the image tower). Tower
variants:

* conv / shifts: every depthwise conv through ``lax.conv_general_dilated`` (feature_group_count)
  or through :func:`models.depthwise.depthwise_conv_shifts`;
* centre-tap: every depthwise conv replaced by its kernel's centre tap alone (strided input times
  a per-channel scale: not the model's math, a timing ablation): the time left without the
  depthwise convs;
* bn_groups=8: GroupedBatchNorm with 8 groups of 8 rows instead of one group of 64;
* reparameterised: the inference form (:func:`models.mobileclip_reparam.reparameterize`: no
  branches, no BatchNorm in the stem / mixers / patch embeddings), still trained with batch
  statistics in the remaining BatchNorms.

Then, per distinct depthwise conv of the tower (kernel, stride, channel multiplier, input map):
forward, input gradient and kernel gradient, lax conv against shifts. And XLA's cost analysis of
the two fwd+bwd programs (flops, so GFLOP/s).

Last, the whole CLIP train step of configs/clip_mci0.py:runlocal (both towers, loss, AdamW; batch
64 of random pixels and tokens, one device) with the tower's ``depthwise_impl`` "conv" and
"shifts": the step that ``pretrain.main --config=configs/clip_mci0.py:runlocal`` runs.

Every program is jit-compiled and called once before timing; timings are medians over
``--rounds`` calls, the rounds going over all variants in turn (bench/timing.py). Ratios are
against "shifts fwd+bwd" measured in the same run. Before timing, the conv and shifts towers'
outputs and gradients are compared (largest difference relative to each leaf's largest magnitude).

Measured on a 2-core CPU when the shifts were written: XLA:CPU's grouped convs ran at ~2 GFLOP/s,
and the kernel gradient of a depthwise conv with a channel multiplier (patch embeddings, final
conv) ~100x slower still: the 64 px train step of the runlocal tower took over 5 s with "conv",
0.25 s with "shifts". Within the shifts: for a 7x7 kernel XLA's depthwise kernel gradient (no
channel multiplier) beat 49 per-tap reductions ~4x, for 9 taps or fewer the reductions won ~2x
(``models.depthwise.MAX_TAPS_REDUCED``); without the gather that materialises each shifted sum,
XLA:CPU recomputed it per consumer (~1.6x the tower's fwd+bwd time).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import harness, timing  # noqa: E402
from configs import clip_mci0  # noqa: E402
from models import mobileclip  # noqa: E402
from models.depthwise import depthwise_conv_shifts  # noqa: E402
from models.mobileclip import MobileClipImageTower  # noqa: E402

RUNLOCAL_TOWER = {"depths": (1, 1, 1, 1), "widths": (32, 64, 128, 256), "output_dim": 512}
NHWC = ("NHWC", "HWIO", "NHWC")


def centre_tap_conv(lhs, rhs, window_strides, padding, **kwargs: Any) -> jax.Array:
    """Timing ablation with a depthwise conv's signature and output shape: the kernel's centre
    tap only (each output reads one input element: strided input times a per-channel scale)."""
    del kwargs
    kernel_h, kernel_w, _, features = rhs.shape
    multiplier = features // lhs.shape[-1]
    x = jnp.repeat(lhs, multiplier, axis=-1) if multiplier > 1 else lhs
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_hw = [
        (size - kernel) // stride + 1
        for size, kernel, stride in zip(x.shape[1:3], (kernel_h, kernel_w), window_strides)
    ]
    start = (kernel_h // 2, kernel_w // 2)
    limits = [first + step * (n - 1) + 1 for first, step, n in zip(start, window_strides, out_hw)]
    window = jax.lax.slice(
        x, (0, *start, 0), (x.shape[0], *limits, x.shape[-1]), (1, *window_strides, 1)
    )
    return window * rhs[kernel_h // 2, kernel_w // 2, 0]


@contextlib.contextmanager
def shifts_replaced_by(function: Callable[..., jax.Array]) -> Iterator[None]:
    """While tracing: the towers' "shifts" depthwise convs call ``function`` instead (the towers'
    layers look ``depthwise_conv_shifts`` up in models.mobileclip when they are traced)."""
    original = mobileclip.depthwise_conv_shifts
    mobileclip.depthwise_conv_shifts = function
    try:
        yield
    finally:
        mobileclip.depthwise_conv_shifts = original


def tower_programs(
    tower: MobileClipImageTower, images: jax.Array, seed: int = 0
) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    """(forward, forward+backward, compiled forward+backward) of ``tower`` in train mode, each a
    no-argument call on fixed random variables and ``images``, compiled here."""
    variables = tower.init(jax.random.key(seed), images[:1])
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params, stats, images):
        (embedding, _), updates = tower.apply(
            {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(embedding)), updates

    forward = jax.jit(lambda p, s, x: loss(p, s, x)[0]).lower(params, stats, images).compile()
    gradient = jax.jit(jax.grad(loss, has_aux=True)).lower(params, stats, images).compile()
    return (
        lambda: forward(params, stats, images),
        lambda: gradient(params, stats, images),
        gradient,
    )


def max_relative_difference(tree_a: Any, tree_b: Any) -> float:
    def leaf(a, b) -> float:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    return max(jax.tree.leaves(jax.tree.map(leaf, tree_a, tree_b)))


def tower_report(batch: int, image_size: int, rounds: int) -> None:
    images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
    towers = {
        "conv": MobileClipImageTower(**RUNLOCAL_TOWER, depthwise_impl="conv"),
        "shifts": MobileClipImageTower(**RUNLOCAL_TOWER, depthwise_impl="shifts"),
        "conv bn_groups=8": MobileClipImageTower(
            **RUNLOCAL_TOWER, depthwise_impl="conv", bn_groups=8
        ),
        "shifts bn_groups=8": MobileClipImageTower(
            **RUNLOCAL_TOWER, depthwise_impl="shifts", bn_groups=8
        ),
        "conv reparameterised": MobileClipImageTower(
            **RUNLOCAL_TOWER, depthwise_impl="conv", reparameterized=True
        ),
        "shifts reparameterised": MobileClipImageTower(
            **RUNLOCAL_TOWER, depthwise_impl="shifts", reparameterized=True
        ),
    }
    programs, compiled = {}, {}
    for name, tower in towers.items():
        forward, gradient, compiled[name] = tower_programs(tower, images)
        programs[f"{name}: fwd"], programs[f"{name}: fwd+bwd"] = forward, gradient
    with shifts_replaced_by(centre_tap_conv):
        tower = MobileClipImageTower(**RUNLOCAL_TOWER, depthwise_impl="shifts")
        forward, gradient, _ = tower_programs(tower, images)
        programs["centre-tap: fwd"], programs["centre-tap: fwd+bwd"] = forward, gradient

    # Same parameters (same init seed), so the two implementations must agree.
    (conv_grads, conv_stats), (shift_grads, shift_stats) = (
        programs["conv: fwd+bwd"](),
        programs["shifts: fwd+bwd"](),
    )
    print(
        "shifts vs conv, largest relative difference per leaf: gradients "
        f"{max_relative_difference(shift_grads, conv_grads):.1e}, running statistics "
        f"{max_relative_difference(shift_stats, conv_stats):.1e}"
    )

    timings = timing.time_interleaved(programs, rounds)
    medians = timing.medians(timings)
    reference = medians["shifts: fwd+bwd"]
    print(f"\nrunlocal MCi0 tower, batch {batch}, {image_size} px, train-mode BatchNorm")
    print(f"{'variant':34s} {'ms':>9s} {'/ shifts fwd+bwd':>17s} {'spread':>7s}")
    for name, seconds in medians.items():
        spread = timings[name].spread
        print(f"{name:34s} {seconds * 1e3:9.1f} {seconds / reference:17.2f} {spread:7.0%}")
    print(
        f"\nconv / shifts, fwd+bwd: {medians['conv: fwd+bwd'] / reference:.1f}x; "
        f"fwd: {medians['conv: fwd'] / medians['shifts: fwd']:.1f}x"
    )
    for name in ("conv", "shifts"):
        work = harness.flops(compiled[name])
        seconds = medians[f"{name}: fwd+bwd"]
        print(
            f"XLA cost analysis, {name} fwd+bwd: {work / 1e9:.2f} GFLOP, "
            f"{work / seconds / 1e9:.2f} GFLOP/s"
        )


# (label, input height = width, input channels, channel multiplier, kernel, stride): the distinct
# depthwise convs of the runlocal tower at 64 px.
LAYERS = (
    ("stem_1 3x3 s2", 32, 32, 1, 3, 2),
    ("RepMixer 3x3 (stage 0)", 16, 32, 1, 3, 1),
    ("ConvMlp 7x7 (stage 0)", 16, 32, 1, 7, 1),
    ("patch embed 7x7 s2 x2 (stage 1)", 16, 32, 2, 7, 2),
    ("patch embed 3x3 s2 x2 (stage 1)", 16, 32, 2, 3, 2),
    ("ConvMlp 7x7 (stage 1)", 8, 64, 1, 7, 1),
    ("RepCPE 7x7 (stage 3, 2x2)", 2, 256, 1, 7, 1),
    ("final conv 3x3 x2 (2x2)", 2, 256, 2, 3, 1),
)


def layer_programs(batch: int, size, channels, multiplier, kernel, stride, implementation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kernel, kernel, 1, channels * multiplier)), jnp.float32)
    pad = kernel // 2

    def conv(x, k):
        return implementation(
            x,
            k,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=NHWC,
            feature_group_count=channels,
        )

    g = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, k).shape), jnp.float32)
    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g))
    kernel_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g))
    return {
        "fwd": lambda: forward(x, k),
        "d input": lambda: input_grad(x, k, g),
        "d kernel": lambda: kernel_grad(x, k, g),
    }


def layer_report(batch: int, rounds: int) -> None:
    implementations = {"conv": jax.lax.conv_general_dilated, "shifts": depthwise_conv_shifts}
    programs = {}
    for label, *shape in LAYERS:
        for impl_name, implementation in implementations.items():
            parts = layer_programs(batch, *shape, implementation)
            for part, program in parts.items():
                programs[(label, part, impl_name)] = program
    medians = timing.medians(timing.time_interleaved(programs, rounds))
    print(f"\ndepthwise convs of the tower, batch {batch}: ms conv / ms shifts (ratio)")
    print(f"{'layer':32s} {'fwd':>22s} {'d input':>22s} {'d kernel':>22s}")
    for label, *_ in LAYERS:
        cells = []
        for part in ("fwd", "d input", "d kernel"):
            conv, shifts = (medians[(label, part, name)] * 1e3 for name in ("conv", "shifts"))
            cells.append(f"{conv:7.1f} /{shifts:6.1f} ({conv / shifts:5.1f})")
        print(f"{label:32s} " + " ".join(f"{cell:>22s}" for cell in cells))


def train_step_program(depthwise_impl: str) -> harness.TrainStep:
    """The compiled runlocal CLIP train step with the given depthwise implementation, on a fixed
    random batch."""
    config = clip_mci0.get_config("runlocal")
    config.model.image.depthwise_impl = depthwise_impl
    task, mesh = harness.one_device_task(config)
    local_batch = harness.random_clip_batch(
        config.batch_size, config.data.image_size, config.model.text.context_length
    )
    return harness.compiled_train_step(config, task, mesh, local_batch)


def train_step_report(rounds: int) -> None:
    programs = {impl: train_step_program(impl) for impl in ("conv", "shifts")}
    timings = timing.time_interleaved(programs, rounds)
    medians = timing.medians(timings)
    print("\nCLIP train step of configs/clip_mci0.py:runlocal (batch 64, 64 px), seconds per step")
    for impl, seconds in medians.items():
        print(f"depthwise_impl={impl:7s} {seconds:7.3f} s ({timings[impl].describe()})")
    print(f"conv / shifts: {medians['conv'] / medians['shifts']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument(
        "--no-train-step", action="store_true", help="skip the whole CLIP train step"
    )
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    tower_report(args.batch, args.image_size, args.rounds)
    if not args.no_layers:
        layer_report(args.batch, args.rounds)
    if not args.no_train_step:
        train_step_report(args.rounds)


if __name__ == "__main__":
    main()
