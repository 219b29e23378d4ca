"""``--mode=compile``'s fit report (pretrain/compile_fit.py): the search for the largest batch
that fits, the per-device memory of a step compiled for the 8 CPU devices (checked against the
state's and batch's shard sizes), and a step compiled for a TPU topology with no TPU attached
(needs libtpu, slow: skipped without it unless REQUIRE_LIBTPU=1, as in CI's slow tests)."""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import numpy as np
import pytest
import tiny_clip_config

from pretrain import compile_fit, modes, sharding
from pretrain.run import Run


def brute_force_largest(memory, budget, multiple, limit):
    sizes = [b for b in range(multiple, limit + 1, multiple) if memory(b) <= budget]
    return max(sizes, default=0)


# (memory of a per-device batch, budget, the recipe's batch, multiple, affine): affine memories
# are found exactly in a handful of compilations; for the others the bracket is checked.
CASES = {
    "affine": (lambda b: 1e9 + 3e6 * b, 16e9, 256, 1, True),  # state + activations per row
    "accumulation": (lambda b: 10 + 3 * b, 400, 8, 4, True),  # multiples of 4 micro-batches
    "recipe too large": (lambda b: 10 + 3 * b, 400, 4096, 1, True),
    "padded to 8 rows": (lambda b: 100 + 40 * math.ceil(b / 8), 2000, 2, 1, False),
    "convex": (lambda b: 10 + b + 0.01 * b * b, 5000, 8, 1, False),
    # Beyond 200 the compiler refuses the program: no memory figure.
    "refused": (lambda b: 10 + 3 * b if b <= 200 else math.inf, 10_000, 8, 1, False),
    "nothing fits": (lambda b: 1000 + b, 500, 8, 1, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_largest_fitting_batch_is_bracketed_in_few_compilations(case):
    memory, budget, start, multiple, affine = CASES[case]
    calls = []

    def counted(batch):
        calls.append(batch)
        return memory(batch)

    limit = 20_000
    largest, smallest_failing = compile_fit.largest_fitting(
        counted, budget, start, multiple, limit=limit
    )
    truth = brute_force_largest(memory, budget, multiple, limit)
    assert largest % multiple == 0 and smallest_failing % multiple == 0
    assert largest <= truth < smallest_failing
    assert len(calls) == len(set(calls)) <= 12
    if not truth:
        assert (largest, smallest_failing) == (0, multiple)
    elif affine:
        assert largest == truth and smallest_failing == truth + multiple and len(calls) <= 5
    else:
        assert memory(largest) <= budget < memory(smallest_failing)
        assert smallest_failing - largest <= max(multiple, largest // 6)


def test_largest_fitting_stops_at_its_limit():
    assert compile_fit.largest_fitting(lambda b: b, 1e12, 8, limit=1024) == (1024, None)


def shard_bytes(tree, shardings):
    """Bytes one device holds of a sharded tree, from shapes and partitions alone."""
    leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(
        math.prod(spec.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf, spec in zip(leaves, specs, strict=True)
    )


def test_cpu_mesh_report_holds_the_state_and_batch_shards_and_judges_the_fit():
    config = tiny_clip_config.get_config()
    config.mesh.update({"data": 4, "fsdp": 2})
    report = modes.compile_train_step(config)
    cost = report["cost"]

    run = Run.build(config)
    state_bytes = shard_bytes(run.layout.abstract, run.layout.shardings)
    batch = run.task.batch_spec(int(config.batch_size))
    batch_bytes = shard_bytes(
        batch, {name: sharding.batch_sharding(run.mesh, spec.ndim) for name, spec in batch.items()}
    )
    # The arguments are this device's shard of the state and of the batch; the new state is
    # written over the donated one.
    assert cost.argument_bytes == state_bytes + batch_bytes
    assert cost.alias_bytes == state_bytes
    assert cost.temp_bytes > 0 and cost.flops > 0
    assert report["target"] == "8 x cpu" and report["mesh"] == {"data": 4, "fsdp": 2, "model": 1}
    assert cost.per_device_batch == 2 and report["fits"]

    # The same step against a memory half its size (the compilation comes from the cache).
    config.compile.memory_gib = cost.total_bytes / 2 / compile_fit.GIB
    small = modes.compile_train_step(config)
    assert small["cost"] == cost and not small["fits"]
    text = compile_fit.format_report(small)
    assert "does not fit" in text and "(200%)" in text


def libtpu_or_skip():
    if importlib.util.find_spec("libtpu") is None:
        if os.environ.get("REQUIRE_LIBTPU") == "1":
            pytest.fail("REQUIRE_LIBTPU=1 but libtpu is not installed (launch/setup.sh --libtpu)")
        pytest.skip('needs libtpu (`pip install "jax[tpu]"`)')


@pytest.mark.slow  # minutes of TPU compilation on a small CPU
def test_step_compiles_for_a_tpu_topology_without_a_tpu():
    """A v5e 2x2 slice described by libtpu: the step compiles for its 4 chips from this CPU, the
    report takes the chip's 16 GiB of HBM and its peak FLOP/s, and the state's shards are those
    of the same mesh on 4 CPU devices (the TPU may pad them into its tiles)."""
    libtpu_or_skip()
    config = tiny_clip_config.get_config()
    config.mesh.update({"data": 2, "fsdp": 2})
    config.compile.topology = "v5e:2x2"
    config.compile.batch_search = "never"
    report = modes.compile_train_step(config)
    cost = report["cost"]
    assert report["target"] == "v5e:2x2 (4 x TPU v5 lite)" and report["devices"] == 4
    assert report["memory_gib"] == 16.0 and report["fits"]
    assert report["seconds_per_step_at_peak"] == pytest.approx(cost.flops / 197e12)

    run = Run.build(config, jax.devices()[:4])
    state_bytes = shard_bytes(run.layout.abstract, run.layout.shardings)
    assert state_bytes <= cost.alias_bytes <= cost.argument_bytes < 4 * state_bytes + 2**20
    assert cost.flops > 0 and cost.temp_bytes > 0
