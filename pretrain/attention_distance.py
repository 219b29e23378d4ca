"""Mean attention distance per layer and head of a ViT image tower (paper 000, Fig. 3).

    python -m pretrain.attention_distance --output_dir=DIR \\
        --tower.source=open_clip --tower.open_clip_dir=/weights/ViT-B-16 \\
        [--data.source=synthetic_scenes --data.split=test] [--num_images=256] [--image_size=224]

The tower comes from ``pretrain.components.image_towers`` (``--tower.*``: a run of this project,
``source=workdir``; a randomly initialised recipe tower, ``source=recipe``; open_clip or timm
weights); the images are the first ``--num_images`` of a data source's evaluation split
(``--data.*``, as ``pretrain/data/image_text.py`` reads them; default the embedded scenes' test
split), resized and centre-cropped to ``--image_size`` (default: the tower's), normalised like
every tower's input. For each layer and head: the attention-weighted pixel distance between a
query patch and the key patches, averaged over the query patches and then over the images; the
class token is removed from queries and keys and the remaining weights are not renormalised
unless ``--renormalize`` (definition: pretrain/evaluate/attention_distance.py).

Writes ``attention_distance.csv`` (layer, head, mean_distance_px) and ``attention_distance.png``
into ``--output_dir`` and prints min / mean / max over the heads of every layer. Towers other than
a ViT (ResNet, MobileCLIP's MCi) are refused: they have no attention over patches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict, config_dict, config_flags

from models.vit import VisionTransformer
from pretrain.components.image_towers import ImageTower, build_image_tower, tower_source_config
from pretrain.data import image_text, transforms
from pretrain.evaluate.attention_distance import (
    attention_distances,
    plot_attention_distances,
    write_csv,
)

CSV_NAME = "attention_distance.csv"
PNG_NAME = "attention_distance.png"


class SettingsError(ValueError):
    """A tower or setting this command cannot measure (reported without a traceback)."""


def data_source_config() -> ConfigDict:
    """``--data``: a source config of pretrain/data/image_text.py with the fields a command line
    may set (unused ones keep their defaults); the embedded scenes' test split by default."""
    return ConfigDict(
        {
            "source": "synthetic_scenes",
            "split": "test",
            "data_dir": "",
            "scenes_config": "base",
            "shards": "",
            "txt_captions": "",
            "json_caption_fields": config_dict.placeholder(str),
            "index_cache_dir": "",
            "strict": config_dict.placeholder(bool),
            "tfds_name": "",
            "image_field": "image",
            "caption_field": "",
            "label_field": "label",
        }
    )


def define_flags() -> dict[str, Any]:
    """The command's flags, by name. Defined only when run as a program, so that importing this
    module (tests, other tools) adds no global flags."""
    holders = {
        "tower": config_flags.DEFINE_config_dict(
            "tower", tower_source_config(), "Where the image tower comes from (--tower.source=)."
        ),
        "data": config_flags.DEFINE_config_dict(
            "data", data_source_config(), "The images: a data source config (evaluation split)."
        ),
        "output_dir": flags.DEFINE_string(
            "output_dir", None, "Where the CSV and the PNG are written."
        ),
        "num_images": flags.DEFINE_integer(
            "num_images", 256, "How many images (the first of the split)."
        ),
        "image_size": flags.DEFINE_integer("image_size", 0, "Input resolution; 0: the tower's."),
        "batch_size": flags.DEFINE_integer("batch_size", 32, "Images per forward pass."),
        "renormalize": flags.DEFINE_bool(
            "renormalize",
            False,
            "Renormalise each query's weights on the patch keys to sum to 1 (default: as the "
            "public notebooks, not renormalised after removing the class token).",
        ),
        "title": flags.DEFINE_string("title", "", "Figure title (default: the tower's source)."),
        "worker_count": flags.DEFINE_integer(
            "worker_count", 0, "Data worker processes (0: in-process)."
        ),
    }
    flags.mark_flags_as_required(["output_dir"])
    return holders


def describe_source(source: ConfigDict) -> str:
    """A short name of a tower source for the figure's title."""
    kind = source.get("source", "")
    if kind == "workdir":
        return f"run {os.path.basename(os.path.normpath(source.workdir))} (step {source.step})"
    if kind == "recipe":
        return f"random init of {source.config}"
    if kind == "open_clip":
        name = source.get("open_clip_model") or os.path.basename(source.open_clip_dir)
        return f"open_clip {name}"
    if kind == "timm":
        return f"timm {os.path.basename(os.path.normpath(source.timm_dir))}"
    return str(kind)


def format_table(distances: np.ndarray) -> str:
    """Per layer, min / mean / max over the heads of a (layers, heads) array, in pixels."""
    lines = [f"{'layer':>5} {'min':>9} {'mean':>9} {'max':>9}"]
    for layer, row in enumerate(np.asarray(distances), start=1):
        lines.append(f"{layer:>5} {row.min():>9.2f} {row.mean():>9.2f} {row.max():>9.2f}")
    return "\n".join(lines)


def compute_attention_distances(
    tower_source: ConfigDict,
    data_source: ConfigDict,
    *,
    num_images: int = 256,
    image_size: int = 0,
    batch_size: int = 32,
    renormalize: bool = False,
    worker_count: int = 0,
) -> tuple[np.ndarray, int, ImageTower]:
    """``(distances (layers, heads), number of images read, the ImageTower)`` for a tower source
    and a data source config; raises SettingsError for a tower that is not a ViT."""
    tower = build_image_tower(tower_source)
    if not isinstance(tower.module, VisionTransformer):
        raise SettingsError(
            f"the tower of {describe_source(tower_source)} is a {type(tower.module).__name__}: "
            "mean attention distance is defined for ViT towers (attention over patches) only"
        )
    size = int(image_size or tower.image_size)
    if size % tower.module.patch_size:
        raise SettingsError(
            f"image size {size} is not divisible by the patch size {tower.module.patch_size}"
        )
    if num_images < 1 or batch_size < 1:
        raise SettingsError(f"num_images={num_images} and batch_size={batch_size} must be positive")
    variables = tower.load_variables()
    source = image_text.make_source(data_source)
    read = 0

    def images() -> Iterator[np.ndarray]:
        nonlocal read
        for batch in image_text.eval_batches(
            source,
            image_size=size,
            context_length=0,  # no text is read (with_text=False)
            batch_size=min(batch_size, num_images),
            max_examples=num_images,
            worker_count=worker_count,
            with_text=False,
        ):
            read += len(batch["image"])
            yield transforms.normalize(np.asarray(batch["image"]))

    distances = attention_distances(
        tower.module, variables, images(), prefix_tokens=1, renormalize=renormalize
    )
    return distances, read, tower


def write_outputs(
    distances: np.ndarray, output_dir: str, *, title: str, count: int, renormalize: bool
) -> tuple[str, str]:
    """``attention_distance.csv`` and ``.png`` in ``output_dir`` (created); their paths."""
    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, CSV_NAME)
    png_path = os.path.join(output_dir, PNG_NAME)
    weights = "renormalised" if renormalize else "not renormalised"
    write_csv(csv_path, distances)
    plot_attention_distances(distances, png_path, f"{title}\n{count} images, weights {weights}")
    return csv_path, png_path


def main(argv: list[str], values: dict[str, Any]) -> None:
    """The command, with ``values`` the flags' values by name (see :func:`define_flags`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        distances, count, tower = compute_attention_distances(
            values["tower"],
            values["data"],
            num_images=values["num_images"],
            image_size=values["image_size"],
            batch_size=values["batch_size"],
            renormalize=values["renormalize"],
            worker_count=values["worker_count"],
        )
    except SettingsError as error:
        # A wrong tower or setting is the user's to fix: one line and exit status 1, not a
        # traceback (nor absl's full usage text, which would bury the line).
        raise SystemExit(f"attention_distance: {error}") from error
    csv_path, png_path = write_outputs(
        distances,
        values["output_dir"],
        title=values["title"] or describe_source(values["tower"]),
        count=count,
        renormalize=values["renormalize"],
    )
    weights = "renormalised" if values["renormalize"] else "not renormalised"
    size = values["image_size"] or tower.image_size
    print(
        f"mean attention distance (pixels at {size} px, patch {tower.module.patch_size}) over "
        f"{count} images; keys: patches (class token removed), weights {weights}"
    )
    print(format_table(distances))
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    _holders = define_flags()
    app.run(lambda argv: main(argv, {name: holder.value for name, holder in _holders.items()}))
