"""Does a recipe fit? Ahead-of-time compilation of its train step for the devices here or for a
TPU topology, with no TPU attached (libtpu's topology descriptions, ``pip install "jax[tpu]"``),
and a fit report: per-device memory (arguments, outputs, temporaries) against the device's
memory, FLOPs per step, and the largest per-device batch that fits, found by compiling.

``--mode=compile --config.compile.topology=v5e:16x16`` compiles for 256 v5e chips from a laptop;
without a topology the step is compiled for the local devices (a CPU mesh: host memory shared by
its devices). XLA's own estimates are used: what the compiler allocates, not a formula.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.run import Run
from pretrain.state import count_params

GIB = 2**30
# How a compiler says that a program cannot fit the device (XLA:TPU checks at compile time).
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory")

# Per chip, from the Cloud TPU system architecture pages: HBM (GiB) and peak bf16 TFLOP/s, keyed
# by JAX's device_kind. Chips shown as two devices (one per TensorCore: v2, v3, v4 without
# megacore) give each device half.
TPU_CHIPS: dict[str, tuple[float, float]] = {
    "TPU v2": (16.0, 45.0),
    "TPU v3": (32.0, 123.0),
    "TPU v4": (32.0, 275.0),
    "TPU v5 lite": (16.0, 197.0),  # v5e
    "TPU v5": (95.0, 459.0),  # v5p
    "TPU v6 lite": (32.0, 918.0),  # v6e (Trillium)
}


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a step is compiled for and what one of them offers."""

    name: str
    devices: tuple[Any, ...]
    memory_bytes: float  # per device
    peak_flops: float | None = None  # per device and second (bf16), where known


@dataclasses.dataclass(frozen=True)
class StepCost:
    """XLA's per-device figures of one compiled train step."""

    batch_size: int  # global
    per_device_batch: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments (the train state)
    temp_bytes: int
    code_bytes: int
    flops: float  # per device
    # The compiler's message when it refused the program for want of memory (TPU compilers do
    # when the temporaries alone exceed the chip): then nothing else is known.
    refusal: str = ""

    @property
    def total_bytes(self) -> float:
        """Peak per-device footprint: arguments + temporaries + outputs not aliased to a donated
        argument + the program itself (infinite when the compiler refused the program)."""
        if self.refusal:
            return math.inf
        return (
            self.argument_bytes
            + self.temp_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.code_bytes
        )


def topology_target(topology: str) -> Target:
    """The devices of a TPU slice such as ``v5e:16x16`` or ``v4:4x4x4``, described by libtpu."""
    # Describing a topology uses no TPU: let it load libtpu beside a process that holds one
    # (libtpu otherwise allows one process per machine).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        description = topologies.get_topology_desc(topology, "tpu")
    except Exception as error:  # libtpu missing, or a name it does not know
        raise ValueError(
            f"cannot describe the TPU topology {topology!r} ({error}). It needs libtpu: "
            '`pip install "jax[tpu]==<your jax version>"`; names look like v5e:16x16, v4:4x4x4, '
            "v5p:4x4x8, v6e:8x8"
        ) from error
    devices = tuple(description.devices)
    kind = devices[0].device_kind
    if kind not in TPU_CHIPS:
        raise ValueError(
            f"no memory figure for {kind!r}: set --config.compile.memory_gib (per device)"
        )
    hbm_gib, tflops = TPU_CHIPS[kind]
    cores_per_chip = len({getattr(device, "core_on_chip", 0) for device in devices})
    return Target(
        f"{topology} ({len(devices)} x {kind})",
        devices,
        hbm_gib * GIB / cores_per_chip,
        tflops * 1e12 / cores_per_chip,
    )


def local_target() -> Target:
    """The devices here: an accelerator's memory limit, or for CPU devices the host's memory
    shared among them."""
    devices = tuple(jax.devices())
    stats = None
    try:
        stats = devices[0].memory_stats()
    except Exception:  # CPU devices may not report
        stats = None
    if stats and stats.get("bytes_limit"):
        memory = float(stats["bytes_limit"])
    else:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = host / jax.local_device_count()
    return Target(f"{len(devices)} x {devices[0].device_kind}", devices, memory)


def resolve_target(config: ConfigDict) -> Target:
    """``config.compile``'s target: its topology or the local devices, with ``memory_gib``
    (per device) replacing the known memory when set."""
    options = config.get("compile") or ConfigDict()
    topology = options.get("topology") or ""
    target = topology_target(topology) if topology else local_target()
    memory_gib = float(options.get("memory_gib") or 0)
    if memory_gib > 0:
        target = dataclasses.replace(target, memory_bytes=memory_gib * GIB)
    return target


def with_batch_size(config: ConfigDict, batch_size: int) -> ConfigDict:
    """A copy of ``config`` with another global batch size (the original stays as it is)."""
    copy = config.copy_and_resolve_references()
    copy.batch_size = int(batch_size)
    return copy


def compile_step(config: ConfigDict, devices: Sequence[Any] | None = None) -> tuple[Run, Any]:
    """Build the run over ``devices`` (default: the local ones) and compile one train step on
    abstract, sharded state and batch: no data, no weights, no device memory used."""
    run = Run.build(config, devices)
    batch = {
        name: jax.ShapeDtypeStruct(
            spec.shape, spec.dtype, sharding=sharding.batch_sharding(run.mesh, spec.ndim)
        )
        for name, spec in run.task.batch_spec(int(config.batch_size)).items()
    }
    compiled = run.train_step.lower(run.layout.abstract_with_shardings(), batch).compile()
    return run, compiled


def measure_step(config: ConfigDict, devices: Sequence[Any] | None = None) -> tuple[Run, StepCost]:
    """The run and its step's cost; a step the compiler refuses for want of memory is a cost
    with the refusal (it does not fit), any other compile error is raised."""
    try:
        run, compiled = compile_step(config, devices)
    except jax.errors.JaxRuntimeError as error:
        if not any(sign in str(error) for sign in OUT_OF_MEMORY):
            raise
        run = Run.build(config, devices)
        batch_size = int(config.batch_size)
        per_device = batch_size // sharding.data_parallel_size(run.mesh)
        message = str(error).splitlines()[0]
        return run, StepCost(batch_size, per_device, 0, 0, 0, 0, 0, math.nan, refusal=message)
    return run, step_cost(run, compiled)


def step_cost(run: Run, compiled: Any) -> StepCost:
    """The compiled step's memory and FLOPs per device."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()

    def size(name: str) -> int:
        return int(getattr(memory, f"{name}_size_in_bytes", 0) or 0) if memory else 0

    batch_size = int(run.config.batch_size)
    return StepCost(
        batch_size=batch_size,
        per_device_batch=batch_size // sharding.data_parallel_size(run.mesh),
        argument_bytes=size("argument"),
        output_bytes=size("output"),
        alias_bytes=size("alias"),
        temp_bytes=size("temp"),
        code_bytes=size("generated_code"),
        flops=float((cost or {}).get("flops", float("nan"))),
    )


def largest_fitting(
    memory: Callable[[int], float],
    budget: float,
    start: int,
    multiple: int = 1,
    limit: int = 2**20,
    max_tries: int = 10,
) -> tuple[int, int | None]:
    """The largest per-device batch ``b`` (a multiple of ``multiple``, at most ``limit``) whose
    ``memory(b)`` is within ``budget``, for a memory that grows with the batch; each call of
    ``memory`` is a compilation, so few are made. A step's memory is close to affine in the
    batch (state + per-example activations): the next size tried is where the line through the
    two sizes around the budget (or the last two) meets it, bisecting when that does not halve
    the bracket; the search stops when the bracket is within ``multiple`` or 1/32 of its lower
    end.

    Returns ``(largest that fits, smallest tried that does not)``: ``(0, multiple)`` when none
    fits, ``(b, None)`` when ``limit`` (or ``max_tries``) is reached still fitting.
    """
    measured: dict[int, float] = {}
    low, high = 0, None

    def round_down(batch: float) -> int:
        return int(batch) - int(batch) % multiple

    def measure(batch: int) -> None:
        nonlocal low, high
        measured[batch] = memory(batch)
        if measured[batch] <= budget:
            low = max(low, batch)
        else:
            high = batch if high is None else min(high, batch)

    first = max(multiple, round_down(start))
    measure(first)
    second = min(round_down(limit), first * 2) if low else round_down(first // 2)
    if second < multiple:
        return 0, multiple
    if second != first:
        measure(second)
    last_width = None
    for _ in range(max_tries):
        if high is not None and high - low <= max(multiple, low // 32):
            break
        if high is None and low >= round_down(limit):
            break
        width = None if high is None else high - low
        # Secant through the bracket's ends, else through the two largest sizes with a known
        # memory (a size the compiler refused has none).
        finite = sorted(size for size, value in measured.items() if math.isfinite(value))
        if low and high and math.isfinite(measured[high]):
            a, b = low, high
        else:
            a, b = (finite[-2], finite[-1]) if len(finite) > 1 else (0, 0)
        slope = (measured[b] - measured[a]) / (b - a) if b != a else 0.0
        if slope > 0:
            guess = a + (budget - measured[a]) / slope
        else:
            guess = 2 * max(low, multiple) if high is None else (low + high) / 2
        off_line = high is not None and guess >= high  # the line misses the bracket
        if off_line or (width is not None and last_width is not None and width > last_width / 2):
            guess = (low + high) / 2  # the line is off: halve the bracket instead
        candidate = min(round_down(guess), round_down(limit))
        candidate = max(candidate, low + multiple)
        if high is not None:
            candidate = min(candidate, high - multiple)
        if candidate < multiple:
            break
        last_width = width
        measure(candidate)
    if low == 0 and multiple not in measured:
        measure(multiple)
    if low == 0:
        return 0, multiple
    return low, high


# When to search for the largest per-device batch (several compilations): always, never, or
# only when compiling for a topology (whose memory is known exactly).
BATCH_SEARCH = ("always", "never", "topology")


def fit_report(config: ConfigDict) -> dict[str, Any]:
    """Compile ``config``'s step for its target, compare its memory with the device's, and (as
    ``config.compile.batch_search`` says) find the largest per-device batch that fits."""
    target = resolve_target(config)
    run, cost = measure_step(config, target.devices)
    logging.info(
        "compile: %s, per-device batch %d needs %.3f GiB of %.2f",
        target.name,
        cost.per_device_batch,
        cost.total_bytes / GIB,
        target.memory_bytes / GIB,
    )
    report: dict[str, Any] = {
        "target": target.name,
        "devices": len(target.devices),
        "mesh": dict(run.mesh.shape),
        "parameters": float(count_params(run.layout.abstract["params"])),
        "gflop_per_step": cost.flops / 1e9,  # per device
        "memory_gib": target.memory_bytes / GIB,
        "cost": cost,
        "fits": cost.total_bytes <= target.memory_bytes,
    }
    if target.peak_flops and math.isfinite(cost.flops):
        # A lower bound on the step time: every FLOP at the chip's peak rate.
        report["seconds_per_step_at_peak"] = cost.flops / target.peak_flops
    options = config.get("compile") or ConfigDict()
    search = options.get("batch_search", "topology")
    if search not in BATCH_SEARCH:
        raise ValueError(f"config.compile.batch_search={search!r}: one of {BATCH_SEARCH}")
    if search == "always" or (search == "topology" and options.get("topology")):
        tried = {cost.per_device_batch: cost}
        data_parallel = sharding.data_parallel_size(run.mesh)

        def memory(per_device_batch: int) -> float:
            if per_device_batch not in tried:
                other = with_batch_size(config, per_device_batch * data_parallel)
                tried[per_device_batch] = measure_step(other, target.devices)[1]
                logging.info(
                    "compile: per-device batch %d needs %.3f GiB",
                    per_device_batch,
                    tried[per_device_batch].total_bytes / GIB,
                )
            return tried[per_device_batch].total_bytes

        largest, smallest_not = largest_fitting(
            memory, target.memory_bytes, cost.per_device_batch, multiple=run.grad_accum_steps
        )
        report["largest_per_device_batch"] = largest
        report["smallest_failing_per_device_batch"] = smallest_not
        report["batch_costs"] = dict(sorted(tried.items()))
    return report


def _memory_lines(cost: StepCost, budget: float, report: dict[str, Any]) -> list[str]:
    lines = [
        "memory per device (GiB):",
        f"  arguments     {cost.argument_bytes / GIB:9.3f}",
        f"  outputs       {cost.output_bytes / GIB:9.3f}  ({cost.alias_bytes / GIB:.3f} in place "
        "of donated arguments)",
        f"  temporaries   {cost.temp_bytes / GIB:9.3f}",
        f"  program       {cost.code_bytes / GIB:9.3f}",
        f"  total         {cost.total_bytes / GIB:9.3f}  of {budget:.2f} "
        f"({100 * cost.total_bytes / GIB / budget:.0f}%)",
        f"FLOPs per step  {cost.flops / 1e12:,.2f} TFLOP per device, "
        f"{cost.flops * report['devices'] / 1e15:,.2f} PFLOP in all",
    ]
    if "seconds_per_step_at_peak" in report:
        lines.append(
            f"at peak bf16    {report['seconds_per_step_at_peak']:.3f} s per step (lower bound)"
        )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for the terminal."""
    cost: StepCost = report["cost"]
    budget = report["memory_gib"]
    lines = [
        f"target          {report['target']}, mesh {report['mesh']}",
        f"parameters      {report['parameters'] / 1e6:,.1f} M",
        f"batch           {cost.batch_size:,} global, {cost.per_device_batch:,} per device",
    ]
    if cost.refusal:
        lines.append(
            f"memory          over {budget:.2f} GiB: the compiler refused ({cost.refusal})"
        )
    else:
        lines += _memory_lines(cost, budget, report)
    lines.append("result          " + ("fits" if report["fits"] else "does not fit"))
    if "largest_per_device_batch" in report:
        largest = report["largest_per_device_batch"]
        failing = report["smallest_failing_per_device_batch"]
        devices = math.prod(report["mesh"].get(axis, 1) for axis in sharding.BATCH_AXES)
        beyond = f"; {failing} does not" if failing else " (search limit reached)"
        lines.append(
            f"largest fitting {largest} per device = {largest * devices:,} global{beyond}"
            if largest
            else "largest fitting none: even a per-device batch of 1 does not fit"
        )
    return "\n".join(lines)
