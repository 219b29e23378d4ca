"""Make reinforced (DataCompDR-style) shards: a data set plus a CLIP teacher ensemble's embeddings.

    python -m pretrain.reinforce --config=configs/clip_reinforced.py:runlocal

reads ``config.reinforce`` and writes webdataset tar shards that reinforced training reads
(``config.reinforced``; MobileCLIP's reads them too). Per sample, as DataCompDR-12M/1B lay it out:
the image (its original bytes; decoded sources such as TFDS as PNG), ``txt`` (the real captions,
one per line), ``json`` (the source's metadata and label, if any) and the reinforcements
(``pretrain/data/webdataset/datacompdr.py``): the record's synthetic captions, the crop boxes of
``num_augmentations`` random resized crops (torchvision's sampling, in the image's pixels) and
the teachers' embeddings of those views and of the real then the synthetic captions; with several
teachers their L2-normalised embeddings stand side by side (D = sum of their dimensions), stored
as ``storage_dtype``.

``config.reinforce``: ``teachers`` (named teacher specs, see pretrain/components/teachers.py: a run
of this project or open_clip weights), ``ensemble_order`` (their names in the order their
embeddings stand side by side; default: sorted), ``source`` (a data
source config, see pretrain/data/image_text.py), ``output_dir``, ``samples_per_shard``,
``num_augmentations``, ``crop_scale`` / ``crop_ratio``, ``seed``, ``batch_size`` (teacher batch),
``storage_dtype``. Shards are written one at a time under temporary names and renamed, and
existing ones are kept: an interrupted job resumes where it stopped. ``reinforcement.json``,
written last, marks the set complete (teachers, dimensions, counts of written and skipped
records). With several processes, process ``p`` writes the shards ``k`` with ``k % P == p``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from models.two_tower import TwoTowerModel
from pretrain.batched import apply_in_batches
from pretrain.components.runs import restore_run_variables
from pretrain.components.teachers import build_teacher
from pretrain.data import image_text, transforms
from pretrain.data.tokenizer import ClipTokenizer
from pretrain.data.webdataset import datacompdr
from pretrain.data.webdataset.shard_job import check_same_job, run_shard_job, write_shard
from pretrain.data.webdataset.source_samples import SourceSample, source_sample

MANIFEST = "reinforcement.json"
SHARD_PATTERN = "reinforced-%05d.tar"


@dataclasses.dataclass
class LoadedTeacher:
    """A CLIP teacher ready to embed: its weights and jitted encoders of uint8 images / tokens."""

    name: str
    spec: ConfigDict
    image_size: int
    context_length: int
    variables: Any
    image_encoder: Any  # (variables, uint8 images) -> L2-normalised embeddings
    text_encoder: Any  # (variables, tokens) -> L2-normalised embeddings

    def __post_init__(self) -> None:
        self.tokenizer = ClipTokenizer(self.context_length)
        # Weights are arguments, not constants folded into the compiled programs.
        self._images = jax.jit(self.image_encoder)
        self._texts = jax.jit(self.text_encoder)

    def encode_images(self, images_uint8: np.ndarray) -> np.ndarray:
        return np.asarray(self._images(self.variables, images_uint8), np.float32)

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self._texts(self.variables, tokens), np.float32)

    @property
    def embed_dim(self) -> int:
        images = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.uint8)
        return int(jax.eval_shape(self.image_encoder, self.variables, images).shape[-1])


def _open_clip_teacher(name: str, spec: ConfigDict) -> LoadedTeacher:
    teacher = build_teacher(spec)
    model, dtype = teacher.model, teacher.dtype

    def encode_images(params: Any, images_uint8: jax.Array) -> jax.Array:
        images = transforms.normalize(images_uint8).astype(dtype)
        embeds, _ = model.apply({"params": params}, images, method=TwoTowerModel.encode_image)
        return embeds.astype(jnp.float32)

    def encode_texts(params: Any, tokens: jax.Array) -> jax.Array:
        embeds, _ = model.apply({"params": params}, tokens, method=TwoTowerModel.encode_text)
        return embeds.astype(jnp.float32)

    return LoadedTeacher(
        name,
        spec,
        teacher.image_size,
        teacher.context_length,
        teacher.load(),
        encode_images,
        encode_texts,
    )


def _run_teacher(name: str, spec: ConfigDict) -> LoadedTeacher:
    """A CLIP run of this project with any image tower (ViT, ResNet, MCi: BatchNorm statistics
    included), encoding as its own task evaluates."""
    task, params, model_state = restore_run_variables(
        spec.config, spec.workdir, str(spec.step), spec.get("use_ema")
    )
    if not (hasattr(task, "encode_images") and hasattr(task, "encode_texts")):
        raise ValueError(f"the run in {spec.workdir} is not a CLIP run (no image/text encoders)")
    return LoadedTeacher(
        name,
        spec,
        int(task.image_size),
        int(task.context_length),
        {"params": params, "model_state": model_state},
        task.encode_images,
        task.encode_texts,
    )


def load_teachers(teachers_config: ConfigDict, order: Sequence[str] = ()) -> list[LoadedTeacher]:
    """The ensemble in ``order`` (ConfigDict sorts its keys: the order must be given when it
    matters, e.g. to match DataCompDR's); open_clip teachers compute in float32 unless their
    spec says otherwise, runs of this project as they were trained."""
    if not teachers_config:
        raise ValueError("config.reinforce.teachers is empty: name at least one CLIP teacher")
    names = list(order) or sorted(teachers_config)
    if sorted(names) != sorted(teachers_config):
        raise ValueError(
            f"config.reinforce.ensemble_order {names} does not name the teachers "
            f"{sorted(teachers_config)}"
        )
    loaded = []
    for name in names:
        spec = ConfigDict({"dtype": "float32", **teachers_config[name].to_dict()})
        if spec.source == "workdir":
            loaded.append(_run_teacher(name, spec))
        else:
            loaded.append(_open_clip_teacher(name, spec))
    return loaded


@dataclasses.dataclass
class PreparedRecord:
    """A source record ready to embed: the sample it becomes and its crop boxes."""

    sample: SourceSample
    boxes: list[tuple[int, int, int, int]]


def prepare_record(
    index: int,
    record: Any,
    *,
    num_augmentations: int,
    seed: int,
    crop_scale: Sequence[float],
    crop_ratio: Sequence[float],
) -> PreparedRecord | str:
    """A record with its sampled crop boxes, or the reason it is skipped (the example maker's)."""
    sample = source_sample(index, record)
    if isinstance(sample, str):
        return sample
    rng = np.random.default_rng([seed, index])
    scale, ratio = tuple(crop_scale), tuple(crop_ratio)
    height, width = sample.image.height, sample.image.width
    boxes = [
        transforms.sample_crop_box(height, width, rng, scale, ratio)
        for _ in range(num_augmentations)
    ]
    return PreparedRecord(sample, boxes)


def embed_records(
    records: Sequence[PreparedRecord], teachers: Sequence[LoadedTeacher], batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per record ``(image_emb (A, D), text_emb (T, D))``: the teachers side by side."""
    if not records:  # a shard whose records were all skipped
        return []
    image_parts, text_parts = [], []
    for teacher in teachers:
        size = teacher.image_size
        views = np.stack(
            [
                transforms.crop_and_resize(record.sample.image, box, size)
                for record in records
                for box in record.boxes
            ]
        )
        texts = [
            c
            for record in records
            for c in (*record.sample.captions, *record.sample.synthetic_captions)
        ]
        tokens = np.asarray(teacher.tokenizer(texts), np.int32)
        image_parts.append(apply_in_batches(teacher.encode_images, views, batch_size))
        text_parts.append(apply_in_batches(teacher.encode_texts, tokens, batch_size))
    images, texts = np.concatenate(image_parts, axis=1), np.concatenate(text_parts, axis=1)
    out, image_row, text_row = [], 0, 0
    for record in records:
        views = len(record.boxes)
        count = len(record.sample.captions) + len(record.sample.synthetic_captions)
        out.append((images[image_row : image_row + views], texts[text_row : text_row + count]))
        image_row, text_row = image_row + views, text_row + count
    return out


def shard_sample(
    record: PreparedRecord, image_emb: np.ndarray, text_emb: np.ndarray, dtype: str
) -> dict[str, Any]:
    """The webdataset members of one reinforced sample."""
    return {
        **record.sample.members(),
        **datacompdr.reinforcement_members(
            record.sample.synthetic_captions, record.boxes, image_emb, text_emb, dtype
        ),
    }


def _make_shard(
    path: Path,
    source: Any,
    records: range,
    teachers: Sequence[LoadedTeacher],
    settings: ConfigDict,
) -> dict[str, Any]:
    """Reinforce ``records`` of ``source`` into the shard ``path``; returns what was written
    and skipped (by the pipeline's reasons)."""
    prepared, skipped = [], {}
    for index in records:
        outcome = prepare_record(index, source[index], **crop_options(settings))
        if isinstance(outcome, str):
            skipped[outcome] = skipped.get(outcome, 0) + 1
        else:
            prepared.append(outcome)
    embeddings = embed_records(prepared, teachers, int(settings.batch_size))
    dtype = str(settings.storage_dtype)
    write_shard([shard_sample(r, *e, dtype) for r, e in zip(prepared, embeddings)], path)
    return {"written": len(prepared), "skipped": skipped}


JOB_FILE = "reinforce_job.json"


def crop_options(settings: ConfigDict) -> dict[str, Any]:
    """How the stored views are drawn (``prepare_record``'s keyword arguments)."""
    return {
        "num_augmentations": int(settings.num_augmentations),
        "seed": int(settings.seed),
        "crop_scale": tuple(settings.crop_scale),
        "crop_ratio": tuple(settings.crop_ratio),
    }


def job_description(settings: ConfigDict) -> dict[str, Any]:
    """What determines the shards' contents (kept beside them, checked when resuming)."""
    return json.loads(
        json.dumps(
            {
                "source": settings.source.to_dict(),
                "teachers": settings.teachers.to_dict(),
                "ensemble_order": list(settings.get("ensemble_order") or ()),
                "samples_per_shard": int(settings.samples_per_shard),
                "storage_dtype": str(settings.storage_dtype),
                **crop_options(settings),
            },
            default=str,
        )
    )


def is_complete(output_dir: str | os.PathLike) -> bool:
    """Whether a reinforcement job finished writing ``output_dir``."""
    return (Path(output_dir) / MANIFEST).exists()


def reinforce(
    config: ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> dict[str, Any]:
    """Write the reinforced shards of ``config.reinforce`` (resuming); returns the manifest."""
    settings = config.reinforce
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    check_same_job(output, JOB_FILE, job_description(settings))
    # Synthetic captions already in the source's shards (syn.json) are kept.
    source = image_text.make_source(settings.source, read_reinforcements=True)
    teachers = load_teachers(settings.teachers, settings.get("ensemble_order") or ())
    totals = run_shard_job(
        output,
        num_records=len(source),
        per_shard=int(settings.samples_per_shard),
        shard_pattern=SHARD_PATTERN,
        make_shard=lambda path, records: _make_shard(path, source, records, teachers, settings),
        process_index=process_index,
        process_count=process_count,
        what="reinforced shard",
    )
    manifest = {
        "teachers": [
            {"name": t.name, "embed_dim": t.embed_dim, "spec": t.spec.to_dict()} for t in teachers
        ],
        "embed_dim": sum(t.embed_dim for t in teachers),
        "num_teachers": len(teachers),
        "num_augmentations": int(settings.num_augmentations),
        "num_shards": totals["num_shards"],
        "written": totals["written"],
        "skipped": totals["skipped"],
        "storage_dtype": str(settings.storage_dtype),
    }
    if process_count == 1:
        (output / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def _define_flags() -> Any:
    # Defined only when run as a program: the trainer imports this module and has its own
    # --config flag.
    return config_flags.DEFINE_config_file("config", None, "Recipe with a reinforce section.")


def main(config_flag: Any) -> None:
    manifest = reinforce(
        config_flag.value, process_index=jax.process_index(), process_count=jax.process_count()
    )
    logging.info("reinforced: %s", json.dumps({k: manifest[k] for k in ("written", "skipped")}))


if __name__ == "__main__":
    _config_flag = _define_flags()
    flags.mark_flag_as_required("config")
    app.run(lambda argv: main(_config_flag))
