"""The README's main jobs, as a user runs them: the :runlocal CLIP learns the embedded data set,
then UTA aligns a student to it as the teacher, then the contrastive fine-tuning of that student;
the reinforced run distils it (stored embeddings) with synthetic captions; the MobileCLIP MCi0
tower learns the scenes too; CatLIP learns the captions' synsets and its classifier gives the
linear probe a head start.

The main job (the Quick start's CLIP, about 5 minutes on 2 cores) is marked slow and runs in CI;
the others (about 25 minutes more) are marked nightly: `pytest -m nightly`.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHANCE = 1 / 48  # 8 colours x 6 shapes


def run_main(config: str, workdir: Path, *overrides: str) -> dict[str, dict[int, float]]:
    command = [sys.executable, "-m", "pretrain.main", f"--config={config}", f"--workdir={workdir}"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [*command, *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values: dict[str, dict[int, float]] = {}
    with (workdir / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            values.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return values


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip_runlocal")
    return workdir, run_main("configs/clip_vitb16.py:runlocal", workdir)


@pytest.fixture(scope="module")
def uta_run(tmp_path_factory, clip_run):
    workdir = tmp_path_factory.mktemp("uta_runlocal")
    teacher = f"--config.teacher.workdir={clip_run[0]}"
    return workdir, run_main("configs/uta_vitl.py:runlocal", workdir, teacher)


@pytest.mark.slow
def test_clip_runlocal_reaches_zero_shot_accuracy_far_above_chance(clip_run):
    values = clip_run[1]
    assert values["eval/scenes/zeroshot_top1"][1000] > 10 * CHANCE
    loss = values["train/loss"]
    assert loss[1000] < 0.6 * loss[50], loss


@pytest.mark.nightly
def test_uta_runlocal_aligns_to_the_teacher_and_classifies_zero_shot(uta_run):
    values = uta_run[1]
    loss = values["train/loss"]  # -cosine with the teacher's tokens
    assert loss[1000] < loss[50] - 0.2, loss
    assert values["eval/scenes/zeroshot_top1"][1000] > 10 * CHANCE


@pytest.mark.nightly
def test_uta_contrastive_fine_tuning_keeps_zero_shot_accuracy(tmp_path, clip_run, uta_run):
    values = run_main(
        "configs/uta_ft_vitl.py:runlocal",
        tmp_path,
        f"--config.init.image_from.workdir={uta_run[0]}",
        f"--config.init.text_from.workdir={clip_run[0]}",
    )
    assert values["eval/scenes/zeroshot_top1"][300] > 10 * CHANCE


@pytest.fixture(scope="module")
def catlip_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("catlip_runlocal")
    return workdir, run_main("configs/catlip_vitb16.py:runlocal", workdir)


@pytest.mark.nightly
def test_catlip_runlocal_learns_the_captions_synsets(catlip_run):
    values = catlip_run[1]
    loss = values["train/loss"]  # BCE summed over the vocabulary
    assert loss[1000] < 0.6 * loss[50], loss
    # The classifier's synset columns, mapped to the 48 classes by Transfer Init, classify the
    # held-out scenes without any training on them.
    assert values["eval/scenes/transfer_init_top1"][1000] > 10 * CHANCE


@pytest.mark.nightly
def test_catlip_linear_probe_with_transfer_init_beats_random_init(tmp_path, catlip_run):
    pretrained = f"--config.transfer.pretrained.workdir={catlip_run[0]}"
    probes = {
        head_init: run_main(
            f"configs/catlip_transfer.py:runlocal,head_init={head_init}",
            tmp_path / head_init,
            pretrained,
        )["eval/scenes/top1"]
        for head_init in ("transfer", "random")
    }
    for step in (0, 50, 100):  # equal probe steps, on 1,000 labelled images
        assert probes["transfer"][step] > probes["random"][step], probes


@pytest.mark.nightly
def test_reinforced_runlocal_trains_with_synthetic_captions_and_distillation(tmp_path, clip_run):
    reinforced_dir = tmp_path / "reinforced_scenes"
    values = run_main(
        "configs/clip_reinforced.py:runlocal",
        tmp_path / "run",
        f"--config.reinforce.teachers.clip_runlocal.workdir={clip_run[0]}",
        f"--config.reinforce.output_dir={reinforced_dir}",
        f"--config.data.train.shards={reinforced_dir}/reinforced-*.tar",
    )
    assert values["eval/scenes/zeroshot_top1"][1000] > 10 * CHANCE
    distill = values["train/distill_real"]
    assert distill[1000] < 0.5 * distill[50], distill
    assert values["train/data/skipped_total"][1000] == 0


@pytest.mark.nightly
def test_mci0_runlocal_reaches_zero_shot_accuracy_far_above_chance(tmp_path):
    values = run_main("configs/clip_mci0.py:runlocal", tmp_path)
    assert values["eval/scenes/zeroshot_top1"][1000] > 10 * CHANCE
