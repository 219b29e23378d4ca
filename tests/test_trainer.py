"""The train loop: end to end on the tiny config, kill -9 and resume, SIGTERM, NaN, bad data."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_clip_config as tiny_clip
from PIL import Image

from pretrain import modes, sharding, trainer
from pretrain import run as run_lib
from pretrain.checkpoint import Checkpointer
from pretrain.data.webdataset import write_shards
from pretrain.tasks.clip import Task as ClipTask

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "tiny_clip_config.py"


def read_metrics(workdir: Path) -> dict[str, dict[int, float]]:
    by_name: dict[str, dict[int, float]] = {}
    with (workdir / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            by_name.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return by_name


def restore_state(workdir: Path, step: int, *overrides: str):
    """The saved train state; ``overrides`` as given on the command line (--config.a.b=v)."""
    config = tiny_clip.get_config()
    for override in overrides:
        path, value = override.removeprefix("--config.").split("=")
        *parents, leaf = path.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = type(target[leaf])(value)
    _, state = modes.restore_trained(config, str(workdir), str(step))
    return jax.device_get(state)


def restore_params(workdir: Path, step: int):
    return restore_state(workdir, step)["params"]


def launch(workdir: Path, *overrides: str, devices: int = 1) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "pretrain.main",
        f"--config={TINY_CONFIG}",
        f"--workdir={workdir}",
        *overrides,
    ]
    xla_flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finished_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for_checkpoint(process: subprocess.Popen, workdir: Path, step: int, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in finished_steps(workdir)):
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stdout.read()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no checkpoint {step} after {timeout}s:\n{process.stdout.read()}")


def test_tiny_run_end_to_end(tmp_path):
    metrics = trainer.train_and_evaluate(tiny_clip.get_config(), str(tmp_path))
    logged = read_metrics(tmp_path)
    assert set(logged["train/loss"]) == {2, 4, 6, 8, 10, 12}
    assert all(np.isfinite(v) for v in logged["train/loss"].values())
    assert set(logged["eval/scenes/zeroshot_top1"]) == {6, 12}
    assert logged["eval/scenes/num_images"][12] == 64
    assert 0.0 <= metrics["eval/scenes/image_to_text_R@10"] <= 1.0
    assert logged["train/data/skipped_total"][12] == 0
    # keep=2 latest (8, 12) + the best by zero-shot accuracy among the evaluated steps (6, 12).
    assert {8, 12} <= set(finished_steps(tmp_path)) <= {6, 8, 12}
    assert (tmp_path / "tensorboard").is_dir()

    # Standalone evaluation of the saved step 12 reproduces the numbers logged during training.
    standalone = modes.evaluate_checkpoint(tiny_clip.get_config(), str(tmp_path), "12")
    for name, value in standalone.items():
        assert value == pytest.approx(logged[f"eval/{name}"][12], abs=1e-4), name
    # "best" is the evaluated step with the highest zero-shot accuracy.
    scores = logged["eval/scenes/zeroshot_top1"]
    best = Checkpointer(tmp_path / "checkpoints", best_metric="scenes/zeroshot_top1").resolve_step(
        "best"
    )
    assert scores[best] == max(scores.values())
    # Evaluating with a different model than the one trained names the differing fields.
    other = tiny_clip.get_config()
    other.model.image.width = 32
    with pytest.raises(ValueError, match=r"model\.image\.width: trained 64, now 32"):
        modes.restore_trained(other, str(tmp_path))
    exported = modes.export_checkpoint(tiny_clip.get_config(), str(tmp_path), str(tmp_path / "x"))
    assert sorted(p.name for p in Path(exported).iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]


def test_kill_and_resume_gives_identical_parameters(tmp_path):
    # 8 devices (data parallel), 2 data worker processes, EMA on: all of it must resume exactly.
    # Evaluated at 12 and 24 only: evaluation does not touch the state being compared.
    settings = (
        "--config.total_steps=24",
        "--config.eval.every_steps=12",
        "--config.data.worker_count=2",
        "--config.ema_decay=0.99",
    )
    reference = launch(tmp_path / "reference", *settings, devices=8)
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    interrupted = launch(tmp_path / "interrupted", *settings, devices=8)
    wait_for_checkpoint(interrupted, tmp_path / "interrupted", 8, timeout=600)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait(timeout=60)
    assert interrupted.returncode == -signal.SIGKILL
    killed_at = max(finished_steps(tmp_path / "interrupted"))
    assert killed_at < 24, "the run finished before it could be killed"

    resumed = launch(tmp_path / "interrupted", *settings, devices=8)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from checkpoint" in output

    expected = restore_state(tmp_path / "reference", 24, *settings)
    actual = restore_state(tmp_path / "interrupted", 24, *settings)
    for part in ("params", "ema_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, actual[part], expected[part])
    # The resumed run's metrics continue the interrupted run's without duplicates.
    losses = read_metrics(tmp_path / "interrupted")["train/loss"]
    assert sorted(losses) == list(range(2, 25, 2))


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    process = launch(
        tmp_path, "--config.total_steps=100000", "--config.checkpoint.every_steps=1000"
    )
    wait_for_first_log_line(process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert "preempted" in output
    steps = finished_steps(tmp_path)
    assert len(steps) == 1 and 0 < steps[0] < 1000


def wait_for_first_log_line(process: subprocess.Popen) -> None:
    """Read the output until the first progress line (training is running), keep draining it."""
    for line in process.stdout:
        if "| loss" in line:
            return
    raise AssertionError("training ended without a progress line")


class PoisonedClipTask(ClipTask):
    """CLIP whose loss turns NaN from a given batch on (the data carries the poison)."""

    POISON_FROM_BATCH = 7
    batch_fields = (*ClipTask.batch_fields, "poison")

    def train_dataset(self, **kwargs):
        return PoisonedStream(super().train_dataset(**kwargs), self.POISON_FROM_BATCH)

    def loss_fn(self, params, batch, rng, step, frozen=None, model_state=None):
        output = super().loss_fn(params, batch, rng, step, frozen, model_state)
        return output._replace(loss=output.loss + batch["poison"].sum())


class PoisonedStream:
    def __init__(self, dataset, poison_from):
        self.dataset, self.poison_from = dataset, poison_from

    def __iter__(self):
        return PoisonedIterator(iter(self.dataset), self.poison_from)


class PoisonedIterator:
    def __init__(self, iterator, poison_from):
        self.iterator, self.poison_from, self.count = iterator, poison_from, 0

    def __next__(self):
        batch = next(self.iterator)
        self.count += 1
        value = np.nan if self.count >= self.poison_from else 0.0
        return {**batch, "poison": np.full(batch["text"].shape[:1], value, np.float32)}

    # grain's checkpoint handler stores non-grain iterators' states as (JSON) bytes.
    def get_state(self):
        return json.dumps({"inner": self.iterator.get_state(), "count": self.count}).encode()

    def set_state(self, state):
        state = json.loads(state)
        self.iterator.set_state(state["inner"])
        self.count = state["count"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lib, "build_task", lambda config, mesh: PoisonedClipTask(config, mesh))
    config = tiny_clip.get_config()
    config.checkpoint.every_steps = 2
    config.eval.every_steps = 1000
    with pytest.raises(trainer.NonFiniteLossError, match="at step 7"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert max(finished_steps(tmp_path)) == 6
    params = restore_params(tmp_path, 6)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def jpeg_bytes(colour, size=40):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_corrupt_shard_entries_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for index in range(40):
        sample = {"__key__": f"{index:05d}", "txt": f"a photo number {index}"}
        sample["jpg"] = jpeg_bytes(tuple(int(c) for c in rng.integers(0, 255, 3)))
        samples.append(sample)
    samples[3]["jpg"] = b"\xff\xd8 this is not a jpeg"  # corrupt image
    samples[11]["txt"] = "   "  # empty caption
    del samples[17]["jpg"]  # missing image
    shards = write_shards(samples, str(tmp_path / "shards" / "%05d.tar"), samples_per_shard=16)
    config = tiny_clip.get_config()
    config.data.train.update({"source": "webdataset", "shards": "::".join(shards)})
    config.total_steps = 5  # 80 records read: two passes over the 40, 3 bad ones in each
    config.log_every_steps = 5
    config.eval.every_steps = 1000
    config.checkpoint.every_steps = 1000
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    logged = read_metrics(tmp_path / "run")["train/data/skipped_total"][5]
    # 5 batches of 16 = 80 good examples: two whole epochs of 37 good records (3 bad records
    # each) and 6 examples of the third epoch, before which 0 to 3 bad records may come.
    assert 6 <= logged <= 9
    # Exactly what the data stream reported, batch by batch.
    task = ClipTask(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    stream = iter(task.train_dataset(batch_size=16, process_index=0, process_count=1))
    assert logged == sum(next(stream)["skipped"] for _ in range(5))


def test_evaluation_settings_are_checked_before_training(tmp_path):
    config = tiny_clip.get_config()
    config.eval.sets.scenes.source = "tfsd"  # a typo fails at start-up, not at the first eval
    with pytest.raises(ValueError, match="unknown data source 'tfsd'"):
        trainer.train_and_evaluate(config, str(tmp_path / "typo"))
    assert not (tmp_path / "typo" / "checkpoints").exists()

    # A set whose data is not there (ImageNet not prepared) is skipped; training goes on.
    config = tiny_clip.get_config()
    config.total_steps = 2
    config.eval.every_steps = 2
    config.eval.sets["imagenet"] = {
        "source": "tfds",
        "tfds_name": "imagenet2012",
        "split": "validation",
        "classnames": "imagenet",
        "templates": "openai_imagenet",
        "captions": 0,
        "max_examples": 0,
        "data_dir": str(tmp_path / "no_data_here"),
    }
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "missing"))
    assert "eval/scenes/zeroshot_top1" in metrics
    assert not any(name.startswith("eval/imagenet") for name in metrics)
