"""The README's main job, as a user runs it: the :runlocal CLIP learns the embedded data set.

Slow (about 5 minutes on 2 cores): run with `pytest -m slow` (CI's nightly-style stage).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHANCE = 1 / 48  # 8 colours x 6 shapes


@pytest.mark.slow
def test_runlocal_reaches_zero_shot_accuracy_far_above_chance(tmp_path):
    command = [
        sys.executable,
        "-m",
        "pretrain.main",
        "--config=configs/clip_vitb16.py:runlocal",
        f"--workdir={tmp_path}",
    ]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values: dict[str, dict[int, float]] = {}
    with (tmp_path / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            values.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    accuracy = values["eval/scenes/zeroshot_top1"]
    assert accuracy[1000] > 10 * CHANCE, accuracy
    loss = values["train/loss"]
    assert loss[1000] < 0.6 * loss[50], loss
