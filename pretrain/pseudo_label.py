"""Write pseudo-labelled shards: an image-text data set plus the dense labels task experts predict
for it (CLIPTeX, paper 003).

    python -m pretrain.pseudo_label --config=configs/cliptex.py:runlocal

reads ``config.pseudo_label`` and writes webdataset tar shards that CLIPTeX training reads
(``config.cliptex``) and the dense reader reads too (``source=webdataset`` in
configs/dense_probe.py). Per sample: the image (its original bytes; decoded sources such as TFDS
as PNG), ``txt`` (the captions, one per line), ``json`` (the source's metadata and label) and one
label member per target that its expert labelled (pretrain/pseudo_labels/members.py: ``seg.png``,
``depth.png`` or ``depth.npy``, ``normals.png`` or ``normals.npy``), all at the image's size, or
with its longer side ``label_max_side`` when the image is larger (same aspect ratio: training
aligns them with the image's crops).

``config.pseudo_label``: ``source`` (a data source config, see pretrain/data/image_text.py),
``output_dir``, ``samples_per_shard``, ``experts`` (target -> expert spec, see
pretrain/pseudo_labels/experts.py: runs of this project or PyTorch experts), ``torch_python``
(the torch environment's interpreter; default ``.venv-torch/bin/python``), ``batch_size``,
``label_max_side`` (0: the image's own size), ``min_labelled_fraction``, ``relative_depth``
(depth divided by each image's median), ``depth_member``, ``normals_member``,
``build_if_missing`` (CLIPTeX's :runlocal makes its shards before training).

Shards are written one at a time under temporary names and renamed; finished ones are kept, so an
interrupted job resumes (pretrain/data/webdataset/shard_job.py). ``pseudo_label_job.json`` holds
the job's description: a different job refuses the folder. ``pseudo_labels.json``, written last
by a single-process job, marks the set complete with its counts (written, skipped by reason, and
per target how many samples got a label and their mean labelled share of pixels). With several
processes, process ``p`` writes the shards ``k`` with ``k % P == p``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from PIL import Image

from pretrain.data import image_text
from pretrain.data.webdataset.shard_job import check_same_job, run_shard_job, write_shard
from pretrain.data.webdataset.source_samples import SourceSample, source_sample
from pretrain.pseudo_labels.experts import Expert, open_experts
from pretrain.pseudo_labels.members import LabelEncoding, label_members

MANIFEST = "pseudo_labels.json"
JOB_FILE = "pseudo_label_job.json"
SHARD_PATTERN = "pseudo-%05d.tar"


def label_image(image: Image.Image, max_side: int) -> np.ndarray:
    """The image the experts label: uint8 (H, W, 3), its longer side at most ``max_side`` (0:
    as it is), aspect ratio kept."""
    longer = max(image.height, image.width)
    if max_side and longer > max_side:
        scale = max_side / longer
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image.convert("RGB"))


def predict_all(experts: Sequence[Expert], images: Sequence[np.ndarray]) -> list[dict]:
    """Per image, every expert's predictions merged ({target: array})."""
    merged: list[dict[str, np.ndarray]] = [{} for _ in images]
    for expert in experts:
        for row, predictions in zip(merged, expert.predict(images)):
            row.update(predictions)
    return merged


def _make_shard(
    path: Path,
    source: Any,
    records: range,
    experts: Sequence[Expert],
    settings: ConfigDict,
) -> dict[str, Any]:
    samples: list[SourceSample] = []
    skipped: dict[str, int] = {}
    for index in records:
        outcome = source_sample(index, source[index])
        if isinstance(outcome, str):
            skipped[outcome] = skipped.get(outcome, 0) + 1
        else:
            samples.append(outcome)
    max_side = int(settings.label_max_side)
    images = [label_image(sample.image, max_side) for sample in samples]
    storage = label_encoding(settings)
    written, labelled, shares = [], {}, {}
    for sample, predictions in zip(samples, predict_all(experts, images)):
        members, sample_shares = label_members(predictions, storage)
        written.append({**sample.members(), **members})
        for target, share in sample_shares.items():
            labelled[target] = labelled.get(target, 0) + int(storage.keeps(share))
            shares[target] = shares.get(target, 0.0) + share
    write_shard(written, path)
    return {"written": len(written), "skipped": skipped, "labelled": labelled, "shares": shares}


def label_encoding(settings: ConfigDict) -> LabelEncoding:
    return LabelEncoding(
        depth_member=str(settings.depth_member),
        normals_member=str(settings.normals_member),
        ignore_label=int(settings.get("ignore_label", 255)),
        min_labelled_fraction=float(settings.min_labelled_fraction),
        relative_depth=bool(settings.relative_depth),
    )


def job_description(settings: ConfigDict) -> dict[str, Any]:
    """What determines the shards' contents (kept beside them, checked when resuming)."""
    return {
        "source": settings.source.to_dict(),
        "experts": settings.experts.to_dict(),
        "samples_per_shard": int(settings.samples_per_shard),
        "label_max_side": int(settings.label_max_side),
        "min_labelled_fraction": float(settings.min_labelled_fraction),
        "depth_member": str(settings.depth_member),
        "normals_member": str(settings.normals_member),
        "relative_depth": bool(settings.relative_depth),
    }


def is_complete(output_dir: str) -> bool:
    """Whether a pseudo-label job finished writing ``output_dir``."""
    return (Path(output_dir) / MANIFEST).exists()


def pseudo_label(
    config: ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> dict[str, Any]:
    """Write the pseudo-labelled shards of ``config.pseudo_label`` (resuming); returns the
    counts (the manifest, written by a single-process job)."""
    settings = config.pseudo_label
    output = Path(settings.output_dir)
    label_encoding(settings)  # a wrong member name fails before the experts load
    source = image_text.make_source(settings.source)
    with open_experts(
        settings.experts,
        torch_python=str(settings.get("torch_python", "")),
        batch_size=int(settings.batch_size),
    ) as experts:
        # After the experts loaded: a job whose experts cannot be built leaves no job file.
        output.mkdir(parents=True, exist_ok=True)
        check_same_job(output, JOB_FILE, job_description(settings))
        totals = run_shard_job(
            output,
            num_records=len(source),
            per_shard=int(settings.samples_per_shard),
            shard_pattern=SHARD_PATTERN,
            make_shard=lambda path, records: _make_shard(path, source, records, experts, settings),
            process_index=process_index,
            process_count=process_count,
            what="pseudo-labelled shard",
        )
    written = max(totals["written"], 1)
    manifest = {
        **totals,
        "targets": sorted(settings.experts),
        "shares": {t: s / written for t, s in totals.get("shares", {}).items()},
    }
    if process_count == 1:
        (output / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def prepare_pseudo_labels(config: ConfigDict) -> None:
    """Make the pseudo-labelled shards first when the recipe says so
    (``pseudo_label.build_if_missing``: the :runlocal recipe) and they are not complete yet;
    process 0 makes them (resuming)."""
    settings = config.get("pseudo_label")
    if not settings or not settings.get("build_if_missing"):
        return
    if is_complete(settings.output_dir):
        check_same_job(Path(settings.output_dir), JOB_FILE, job_description(settings))
        return
    if jax.process_index() == 0:
        logging.info("making the pseudo-labelled shards in %s", settings.output_dir)
        pseudo_label(config)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pseudo-labelled shards made")


def _define_flags() -> Any:
    # Defined only when run as a program: the trainer imports this module and has its own
    # --config flag.
    return config_flags.DEFINE_config_file("config", None, "Recipe with a pseudo_label section.")


def main(config_flag: Any) -> None:
    manifest = pseudo_label(
        config_flag.value, process_index=jax.process_index(), process_count=jax.process_count()
    )
    logging.info(
        "pseudo-labelled: %s",
        json.dumps({k: manifest[k] for k in ("written", "skipped", "labelled", "shares")}),
    )


if __name__ == "__main__":
    _config_flag = _define_flags()
    flags.mark_flag_as_required("config")
    app.run(lambda argv: main(_config_flag))
