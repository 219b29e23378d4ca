"""Dense probes and dense fine-tuning of an image tower: segmentation, depth, surface normals.

Papers 000 and 003 judge an image tower by dense tasks: paper 003 probes FROZEN towers with a
linear, DeepLabV3 or PSPNet head (Table 8), paper 000 fine-tunes with UperNet (Tables 14, 15).
The tower comes from ``config.tower`` (a run of this project, a randomly initialised recipe, or
open_clip / timm weights: pretrain/components/image_towers.py); its spatial feature maps
(pretrain/components/feature_maps.py) feed a head of models/dense_heads.py, trained on one target
(pretrain/components/dense_targets.py: loss, predictions, metrics).

``config.dense.mode``:

* ``"probe"``: the tower is a frozen variable of the train state (no gradient, no optimizer
  state, features behind ``stop_gradient``); only the head trains;
* ``"finetune"``: tower and head train together (``image_encoder`` and ``head`` parameters, so
  layer-wise learning-rate decay applies to the tower). A BatchNorm tower's running statistics
  stay frozen (evaluation-mode BatchNorm, as detection and segmentation fine-tuning commonly do:
  small per-device batches make batch statistics noisy).

Heads with BatchNorm (DeepLabV3, PSPNet, UperNet) keep their running statistics as the train
state's ``model_state``. Evaluation: the target's metrics on every ``config.eval.sets`` entry at
``config.data.eval_size``, and a figure of a few examples (image, prediction, truth) written to
the run's directory (pretrain/evaluate/dense_eval.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import ConfigDict

from models.dense_heads import DENSE_HEADS
from pretrain import task as base
from pretrain.components.dense_targets import dense_target
from pretrain.components.feature_maps import tower_feature_maps
from pretrain.components.image_towers import build_image_tower
from pretrain.components.two_tower import BATCH_STATS
from pretrain.data import dense as dense_data
from pretrain.data.transforms import normalize
from pretrain.evaluate.dense_eval import DenseEvaluator

MODES = ("probe", "finetune")


class Task(base.Task):
    # What is trained, what is frozen, the tower's and the head's shapes.
    state_fields = (
        r"dense\.(mode|target|loss|num_classes|head\..*|pyramid)$",
        r"tower\.(source|config|workdir|open_clip_dir|open_clip_model|timm_dir)$",
    )
    image_tower_entry = None  # a head on someone else's tower: no tower of its own to take

    def __init__(self, config: ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        dense = config.dense
        if dense.mode not in MODES:
            raise ValueError(f"dense.mode={dense.mode!r}; choose from {MODES}")
        self.mode = dense.mode
        self.target = dense_target(dense)
        self.batch_fields = ("image", self.target.name)
        self.tower = build_image_tower(
            config.tower, dtype=config.model.dtype, param_dtype=config.model.param_dtype
        )
        head_fields = dict(dense.head)
        head_name = head_fields.pop("name")
        if head_name not in DENSE_HEADS:
            raise ValueError(f"dense.head.name={head_name!r}; choose from {sorted(DENSE_HEADS)}")
        self.head = DENSE_HEADS[head_name](
            num_outputs=self.target.num_outputs,
            dtype=jnp.dtype(config.model.dtype),
            param_dtype=jnp.dtype(config.model.param_dtype),
            **head_fields,
        )
        self.pyramid = bool(dense.get("pyramid", False))
        self.crop_size = tuple(int(v) for v in config.data.crop_size)

    # -- variables ------------------------------------------------------------------------------

    def _head_variables(self, rng: jax.Array) -> dict[str, Any]:
        # The head is shaped by the tower's feature maps: their shapes, without running it.
        images = jnp.zeros((1, *self.crop_size, 3), jnp.float32)
        shapes = jax.eval_shape(
            lambda: tower_feature_maps(
                self.tower.module,
                self.tower.init_variables(jax.random.key(0)),
                images,
                pyramid=self.pyramid,
            )
        )
        maps = [jnp.zeros(shape.shape, shape.dtype) for shape in shapes]
        return dict(self.head.init({"params": rng, "dropout": rng}, maps, self.crop_size))

    def init_variables(self, rng: jax.Array) -> tuple[Any, Any]:
        tower_rng, head_rng = jax.random.split(rng)
        head = self._head_variables(head_rng)
        params = {"head": head["params"]}
        if self.mode == "finetune":
            params["image_encoder"] = self.tower.init_variables(tower_rng)["params"]
        model_state = {"head": head[BATCH_STATS]} if BATCH_STATS in head else None
        return params, model_state

    def frozen_spec(self) -> Any:
        spec = self.tower.variables_spec()
        if self.mode == "finetune":
            spec = {k: v for k, v in spec.items() if k != "params"}
        return {"image_encoder": spec} if spec else None

    def load_frozen(self) -> Any:
        if self.frozen_spec() is None:
            return None
        variables = self.tower.load_variables()
        if self.mode == "finetune":
            variables = {k: v for k, v in variables.items() if k != "params"}
        return {"image_encoder": variables}

    def load_pretrained(self) -> Any:
        if self.mode != "finetune":
            return None
        return {"image_encoder": self.tower.load_variables()["params"]}

    # -- model and loss -------------------------------------------------------------------------

    def _tower_variables(self, params: Any, frozen: Any) -> dict[str, Any]:
        variables = dict((frozen or {}).get("image_encoder", {}))
        if self.mode == "finetune":
            variables["params"] = params["image_encoder"]
        return variables

    def feature_maps(self, params: Any, images_uint8: jax.Array, frozen: Any) -> list[jax.Array]:
        """The tower's feature maps of a batch (behind stop_gradient when probing)."""
        variables = self._tower_variables(params, frozen)
        maps = tower_feature_maps(
            self.tower.module, variables, normalize(images_uint8), pyramid=self.pyramid
        )
        if self.mode == "probe":
            maps = jax.lax.stop_gradient(maps)
        return maps

    def outputs(
        self,
        params: Any,
        images_uint8: jax.Array,
        output_size: tuple[int, int],
        *,
        frozen: Any = None,
        model_state: Any = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """Head outputs (B, H, W, num_outputs) float32 at ``output_size`` and the head's updated
        BatchNorm statistics; ``rng`` given: training (dropout, batch statistics)."""
        maps = self.feature_maps(params, images_uint8, frozen)
        variables = {"params": params["head"]}
        if model_state is not None:
            variables[BATCH_STATS] = model_state["head"]
        train = rng is not None
        if train and model_state is not None:
            outputs, updated = self.head.apply(
                variables,
                maps,
                output_size,
                train=True,
                rngs={"dropout": rng},
                mutable=[BATCH_STATS],
            )
            return outputs.astype(jnp.float32), {"head": updated[BATCH_STATS]}
        rngs = {"dropout": rng} if train else {}
        outputs = self.head.apply(variables, maps, output_size, train=train, rngs=rngs)
        return outputs.astype(jnp.float32), model_state

    def loss_fn(
        self,
        params: Any,
        batch: base.Batch,
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
        model_state: Any = None,
    ) -> base.LossOutput:
        del step
        labels = batch[self.target.name]
        outputs, model_state = self.outputs(
            params,
            batch["image"],
            tuple(labels.shape[1:3]),
            frozen=frozen,
            model_state=model_state,
            rng=rng,
        )
        loss = self.target.loss_value(outputs, labels, self.mesh)
        return base.LossOutput(loss, {}, model_state)

    # -- data -----------------------------------------------------------------------------------

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        height, width = self.crop_size
        labels = {
            "segmentation": ((batch_size, height, width), jnp.int32),
            "depth": ((batch_size, height, width), jnp.float32),
            "normals": ((batch_size, height, width, 3), jnp.float32),
        }[self.target.name]
        return {
            "image": jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.uint8),
            self.target.name: jax.ShapeDtypeStruct(*labels),
        }

    def train_dataset(self, *, batch_size: int, process_index: int, process_count: int) -> Any:
        data = self.config.data
        return dense_data.dense_dataset(
            dense_data.make_dense_source(data.train),
            batch_size_per_process=batch_size,
            seed=int(self.config.seed),
            train=True,
            targets=(self.target.name,),
            augmentation=dense_augmentation(data),
            process_index=process_index,
            process_count=process_count,
            workers=dense_data.Workers(
                count=int(data.worker_count), buffer_size=int(data.worker_buffer_size)
            ),
            ignore_label=self.target.ignore_label,
        )

    # -- evaluation -----------------------------------------------------------------------------

    def make_evaluator(self) -> DenseEvaluator:
        return DenseEvaluator(
            self.config.eval,
            mesh=self.mesh,
            target=self.target,
            augmentation=dense_augmentation(self.config.data),
            predict_fn=lambda v, images, size: self.target.predict(
                self.outputs(
                    v["params"], images, size, frozen=v["frozen"], model_state=v["model_state"]
                )[0]
            ),
        )

    def evaluate(
        self, params: Any, step: int, frozen: Any = None, model_state: Any = None
    ) -> dict[str, float]:
        variables = {"params": params, "frozen": frozen, "model_state": model_state}
        return self.evaluator(variables, step=step, output_dir=self.output_dir)


def dense_augmentation(data: ConfigDict) -> Any:
    """The training crops and the evaluation size of ``config.data``."""
    return dense_data.DenseAugmentation(
        scale_range=tuple(data.scale_range),
        crop_size=tuple(data.crop_size),
        horizontal_flip=bool(data.random_horizontal_flip),
        eval_size=tuple(data.eval_size),
    )
