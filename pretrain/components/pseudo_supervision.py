"""CLIPTeX (paper 003): the CLIP task trained, next to its contrastive loss, on hard pseudo-labels
that task experts wrote beside the images (``python -m pretrain.pseudo_label``).

``config.cliptex`` (``enabled``) adds to the CLIP task:

* model: light task heads on the image tower's last spatial feature map
  (models/dense_heads.py's :class:`~models.dense_heads.MultiTaskPSPHeads`: one PSP module shared
  by the tasks, a 1x1 convolution per task, outputs upsampled to the label size by nearest
  neighbour). Their parameters are ``params["pseudo_label_heads"]``, their BatchNorm statistics
  ``model_state["pseudo_label_heads"]``; both are dropped at export (the paper discards the heads
  after training), so the exported model is a plain CLIP;
* batch fields: one map per target (``segmentation`` int32, ``depth`` float32, ``normals``
  float32 x 3) at ``image_size // label_stride``, following the image's crop and flip
  (pretrain/components/pseudo_label_maps.py). An example whose expert gave no label (no member in
  its shard) holds an invalid map (ignore label, zero depth, zero normals): it adds nothing to
  that task's loss, which is the per-example mask;
* loss (paper 003, Eq. 1): ``clip * L_clip + sum_t weight_t * L_t`` with pixel cross-entropy for
  segmentation and L1 for depth and normals, each the mean over the labelled pixels of the GLOBAL
  batch. Every term is logged unweighted (``pseudo_<target>_loss``) with the share of examples
  that have a label (``pseudo_<target>_labelled``). The per-example pixel sums are computed where
  the embeddings are (the CLIP task's ``embed``) and pooled with them, so exact gradient
  accumulation keeps every term exact.

Fields of ``config.cliptex``: ``targets`` (any of segmentation / depth / normals),
``loss_weights`` (``clip`` and one per target; Table 7: 1, 0.1, 1, 1), ``num_classes`` and
``ignore_label`` of the segmentation maps, ``min_depth`` / ``max_depth`` (depth pixels outside
are not trained on), ``label_stride``, ``head`` (``channels``, ``bins``, ``dropout``,
``upsample``, ``bn_groups``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from losses.dense import per_example_pixel_sums, pooled_pixel_mean
from models.dense_heads import MultiTaskPSPHeads
from pretrain.components.dense_targets import DenseTarget
from pretrain.components.feature_maps import feature_maps
from pretrain.components.pseudo_label_maps import PseudoLabelMaps
from pretrain.components.two_tower import BATCH_STATS
from pretrain.data.dense.layout import LABEL_MEMBERS

PARAMS_KEY = "pseudo_label_heads"
TARGET_ORDER = ("segmentation", "depth", "normals")
# The loss of each target: CLIPTeX trains segmentation with cross-entropy, the rest with L1.
TARGET_LOSSES = {"segmentation": "cross_entropy", "depth": "l1", "normals": "l1"}
_LABEL_DTYPES = {"segmentation": jnp.int32, "depth": jnp.float32, "normals": jnp.float32}


@dataclasses.dataclass(frozen=True)
class PseudoSupervision:
    """What CLIPTeX adds to the CLIP task (see the module docstring)."""

    targets: tuple[DenseTarget, ...]
    clip_weight: float
    target_weights: Mapping[str, float]
    label_stride: int
    heads: MultiTaskPSPHeads

    # Config fields that shape the saved state (heads' parameters and statistics).
    STATE_FIELDS = (r"cliptex\.(enabled|targets|num_classes|head\..*)$",)

    @classmethod
    def from_config(cls, config: ConfigDict) -> PseudoSupervision | None:
        section = config.get("cliptex")
        if not section or not section.get("enabled"):
            return None
        names = tuple(section.targets)
        unknown = [n for n in names if n not in TARGET_ORDER]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(
                f"config.cliptex.targets={names}: name distinct targets from {TARGET_ORDER}"
            )
        if config.get("reinforced") and config.reinforced.get("enabled"):
            raise ValueError("config.cliptex and config.reinforced cannot be combined (yet)")
        weights = dict(section.loss_weights)
        missing = [n for n in ("clip", *names) if n not in weights]
        if missing:
            raise ValueError(f"config.cliptex.loss_weights lacks {missing}")
        targets = tuple(
            DenseTarget(
                name=name,
                loss=TARGET_LOSSES[name],
                num_classes=int(section.num_classes) if name == "segmentation" else 0,
                ignore_label=int(section.ignore_label),
                min_depth=float(section.min_depth),
                max_depth=float(section.max_depth),
            )
            for name in TARGET_ORDER
            if name in names
        )
        head = dict(section.head)
        heads = MultiTaskPSPHeads(
            outputs=tuple((t.name, t.num_outputs) for t in targets),
            channels=int(head["channels"]),
            bins=tuple(int(b) for b in head["bins"]),
            dropout=float(head["dropout"]),
            bn_groups=int(head.get("bn_groups", 1)),
            upsample=str(head["upsample"]),
            dtype=jnp.dtype(config.model.dtype),
            param_dtype=jnp.dtype(config.model.param_dtype),
        )
        return cls(
            targets=targets,
            clip_weight=float(weights["clip"]),
            target_weights={n: float(weights[n]) for n in names},
            label_stride=int(section.label_stride),
            heads=heads,
        )

    # -- data -----------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)

    def label_size(self, image_size: int) -> int:
        return max(1, image_size // self.label_stride)

    def batch_spec(self, batch_size: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        side = self.label_size(image_size)
        spec = {}
        for name in self.names:
            channels = (3,) if name == "normals" else ()
            spec[name] = jax.ShapeDtypeStruct(
                (batch_size, side, side, *channels), _LABEL_DTYPES[name]
            )
        return spec

    def record_fields(self) -> PseudoLabelMaps:
        """The pipeline's record plug-in that turns a record's label members into the maps."""
        ignore = self.targets[0].ignore_label
        return PseudoLabelMaps(self.names, stride=self.label_stride, ignore_label=ignore)

    @staticmethod
    def read_members() -> tuple[str, ...]:
        """The shard members the training source must read."""
        return LABEL_MEMBERS

    # -- model ----------------------------------------------------------------------------------

    def init(
        self, rng: jax.Array, intermediates: Mapping[str, jax.Array], image_size: int
    ) -> tuple[Any, Any]:
        """The heads' ``(params, batch_stats)`` for the tower's ``intermediates`` (shapes)."""
        maps = [jnp.zeros(m.shape, m.dtype) for m in feature_maps(intermediates)]
        side = self.label_size(image_size)
        variables = self.heads.init({"params": rng, "dropout": rng}, maps, (side, side))
        return variables["params"], variables[BATCH_STATS]

    def per_example_losses(
        self,
        params: Any,
        heads_state: Any,
        intermediates: Mapping[str, jax.Array],
        batch: Mapping[str, jax.Array],
        rng: jax.Array,
    ) -> tuple[dict[str, jax.Array], Any]:
        """Per example (B,): each target's pixel-loss sum and labelled-pixel count, as
        ``pseudo_<target>_sum`` / ``pseudo_<target>_pixels``, and the heads' updated BatchNorm
        statistics (batch statistics, dropout: training mode)."""
        label_size = tuple(batch[self.names[0]].shape[1:3])
        outputs, updated = self.heads.apply(
            {"params": params[PARAMS_KEY], BATCH_STATS: heads_state},
            feature_maps(intermediates),
            label_size,
            train=True,
            rngs={"dropout": rng},
            mutable=[BATCH_STATS],
        )
        sums = {}
        for target in self.targets:
            pixel, valid = target.pixel_losses(outputs[target.name], batch[target.name])
            total, count = per_example_pixel_sums(pixel, valid)
            sums[f"pseudo_{target.name}_sum"] = total
            sums[f"pseudo_{target.name}_pixels"] = count
        return sums, updated[BATCH_STATS]

    def loss(
        self, contrastive: jax.Array, embeddings: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Paper 003's Eq. 1 over the global batch from the per-example sums; the unweighted
        terms and the labelled shares as metrics."""
        total = self.clip_weight * contrastive
        metrics = {}
        for name in self.names:
            sums = embeddings[f"pseudo_{name}_sum"]
            counts = embeddings[f"pseudo_{name}_pixels"]
            value = pooled_pixel_mean(sums, counts)
            total = total + self.target_weights[name] * value
            metrics[f"pseudo_{name}_loss"] = value
            metrics[f"pseudo_{name}_labelled"] = jnp.mean((counts > 0).astype(jnp.float32))
        return total, metrics


def split_model_state(model_state: Any) -> tuple[Any, Any]:
    """``(tower state or None, heads' statistics or None)`` of a CLIPTeX train state."""
    if not model_state or PARAMS_KEY not in model_state:
        return model_state, None
    rest = {k: v for k, v in model_state.items() if k != PARAMS_KEY}
    return rest or None, model_state[PARAMS_KEY]


def join_model_state(tower_state: Any, heads_state: Any) -> Any:
    """The train state's ``model_state`` from the tower's and the heads' statistics."""
    if heads_state is None:
        return tower_state
    return {**(tower_state or {}), PARAMS_KEY: heads_state}


def prepare_pseudo_labelled_data(config: ConfigDict) -> None:
    """Make the pseudo-labelled shards first when the recipe says so
    (``pseudo_label.build_if_missing``, the :runlocal recipes, CLIP-FT's too) and they are not
    complete yet (pretrain/pseudo_label.py)."""
    settings = config.get("pseudo_label")
    if not settings or not settings.get("build_if_missing"):
        return
    from pretrain import pseudo_label  # the experts' models are needed only here

    pseudo_label.prepare_pseudo_labels(config)
