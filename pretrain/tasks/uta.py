"""UTA (paper 004): an EVA-02-style ViT that encodes only the unmasked tokens and aligns them to
a frozen CLIP teacher's tokens at the same positions.

Per image: reversed block-wise masking keeps an exact number K of patches (made in the data
workers, ``keep_indices``); the student embeds all patches, runs its transformer on the class
token and the K kept ones (cost falls with the mask ratio), and projects them to the teacher's
embedding size. The teacher sees the whole image (bf16, no gradient) and gives its per-token
features after its final LayerNorm and projection; the loss is -cosine between student and teacher
tokens at the kept positions (class token included), mean over tokens and the global batch.

Zero-shot: the student's projected class token against the teacher's text tower (the paper's
protocol), through the same evaluator as CLIP. A teacher whose patch grid differs from the
student's (a /14 teacher for a /16 student) is matched by resizing the teacher's token map to the
student's grid (``teacher.grid_match="interpolate_tokens"``) or by resizing its input image so that
its grid equals the student's (``"resize_input"``, the teacher's position embeddings interpolated).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from losses.alignment import token_alignment_loss
from models.two_tower import TwoTowerModel, l2_normalize
from pretrain import sharding
from pretrain import task as base
from pretrain.components.modules import build_module
from pretrain.components.teachers import build_teacher
from pretrain.data import masking
from pretrain.data.transforms import normalize, normalize_unit, unit_images
from pretrain.evaluate import image_text_eval
from pretrain.export import timm_eva

GRID_MATCHES = ("interpolate_tokens", "resize_input")


class KeepIndices:
    """Picklable grain extra: the sorted indices of the patches an image keeps."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float, reverse_probability: float):
        self.grid = grid
        self.mask_ratio = mask_ratio
        self.reverse_probability = reverse_probability

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        keep = masking.reversed_block_mask_indices(
            rng, self.grid, self.mask_ratio, reverse_probability=self.reverse_probability
        )
        return {"keep_indices": keep.astype(np.int32)}


class Task(base.Task):
    batch_fields = ("image", "keep_indices")
    state_fields = (r"teacher\.(source|open_clip_model|config|dtype)$",)  # the teacher's shapes
    image_tower_entry = "student"

    def __init__(self, config: ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        self.teacher = build_teacher(config.teacher)
        if getattr(self.teacher.model.image_encoder, "pool", "cls") != "cls":
            # Its class token is its CLIP embedding only when it pools the class token.
            raise ValueError("UTA needs a teacher whose image tower pools its class token")
        self.grid_match = config.teacher.get("grid_match", "interpolate_tokens")
        if self.grid_match not in GRID_MATCHES:
            raise ValueError(f"teacher.grid_match={self.grid_match!r}; use one of {GRID_MATCHES}")
        model = config.model
        self.student = build_module(
            model.student,
            output_dim=self.teacher.embed_dim,
            dtype=jnp.dtype(model.dtype),
            param_dtype=jnp.dtype(model.param_dtype),
            remat_policy=model.remat_policy,
        )
        self.image_size = int(config.data.image_size)
        patch = int(self.student.patch_size)
        if self.image_size % patch:
            raise ValueError(f"image size {self.image_size} is not a multiple of patch {patch}")
        self.grid = (self.image_size // patch, self.image_size // patch)
        self.mask_ratio = float(config.masking.mask_ratio)

    # -- parameters -----------------------------------------------------------------------------

    def init_variables(self, rng: jax.Array) -> tuple[Any, None]:
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return self.student.init(rng, images)["params"], None

    def frozen_spec(self) -> Any:
        return {"teacher": self.teacher.spec()}

    def load_frozen(self) -> Any:
        return {"teacher": self.teacher.load()}

    # -- teacher targets ------------------------------------------------------------------------

    def teacher_input_size(self) -> int:
        if self.grid_match == "resize_input":
            return self.grid[0] * self.teacher.patch_size
        return self.teacher.image_size

    def teacher_tokens(self, teacher_params: Any, images: jax.Array) -> jax.Array:
        """The teacher's projected tokens on the student's grid: (B, 1 + N_student, E), class
        token first, from normalised [0, 1]-range images (B, H, W, 3)."""
        size = self.teacher_input_size()
        if images.shape[1] != size:
            images = jax.image.resize(
                images, (images.shape[0], size, size, 3), method="bicubic", antialias=True
            )
        _, intermediates = self.teacher.model.apply(
            {"params": teacher_params},
            normalize_unit(images).astype(self.teacher.dtype),
            method=TwoTowerModel.encode_image,
        )
        tokens = intermediates["projected_tokens"]
        class_token, patches = tokens[:, :1], tokens[:, 1:]
        side = round(patches.shape[1] ** 0.5)
        if (side, side) != self.grid:
            patches = patches.reshape(patches.shape[0], side, side, -1)
            patches = jax.image.resize(
                patches, (patches.shape[0], *self.grid, patches.shape[-1]), method="bilinear"
            )
            patches = patches.reshape(patches.shape[0], self.grid[0] * self.grid[1], -1)
        return jnp.concatenate([class_token, patches], axis=1)

    # -- loss -----------------------------------------------------------------------------------

    def loss_fn(
        self,
        params: Any,
        batch: base.Batch,
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
        model_state: Any = None,
    ) -> base.LossOutput:
        del rng, step, model_state
        images = unit_images(batch["image"])
        keep = batch["keep_indices"]
        _, intermediates = self.student.apply(
            {"params": params}, normalize_unit(images), keep_indices=keep
        )
        student = intermediates["projected_tokens"]  # (B, 1 + K, E)
        teacher = self.teacher_tokens(frozen["teacher"], images)
        kept_positions = jnp.concatenate([jnp.zeros_like(keep[:, :1]), keep + 1], axis=1)
        targets = jnp.take_along_axis(teacher, kept_positions[:, :, None], axis=1)
        loss = sharding.batch_loss(token_alignment_loss, self.mesh, student, targets)
        return base.LossOutput(loss, {"cosine": -loss})

    # -- data -----------------------------------------------------------------------------------

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        kept = masking.num_kept(self.grid, self.mask_ratio)
        size = self.image_size
        return {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
            "keep_indices": jax.ShapeDtypeStruct((batch_size, kept), jnp.int32),
        }

    def train_data_options(self) -> dict[str, Any]:
        masks = KeepIndices(
            self.grid, self.mask_ratio, float(self.config.masking.reverse_probability)
        )
        return {"example_extras": masks}  # images only: the teacher gives the targets

    # -- evaluation and export ------------------------------------------------------------------

    def encode_images(self, variables: Any, images_uint8: jax.Array) -> jax.Array:
        """Zero-shot image embedding: the student's projected class token, normalised."""
        images = normalize(images_uint8)
        embedding, _ = self.student.apply({"params": variables["student"]}, images)
        return l2_normalize(embedding)

    def encode_texts(self, variables: Any, tokens: jax.Array) -> jax.Array:
        """The teacher's text tower: the student was aligned to its embedding space."""
        embedding, _ = self.teacher.model.apply(
            {"params": variables["teacher"]}, tokens, method=TwoTowerModel.encode_text
        )
        return embedding

    def make_evaluator(self) -> image_text_eval.ImageTextEvaluator:
        return image_text_eval.ImageTextEvaluator(
            self.config.eval,
            mesh=self.mesh,
            image_size=self.image_size,
            context_length=self.teacher.context_length,
            encode_images=self.encode_images,
            encode_texts=self.encode_texts,
        )

    def evaluate(
        self, params: Any, step: int, frozen: Any = None, model_state: Any = None
    ) -> dict[str, float]:
        del step, model_state
        return self.evaluator({"student": params, "teacher": frozen["teacher"]})

    def export(self, params: Any, directory: str, model_state: Any = None) -> str:
        """The student in timm's eva.py layout (see pretrain/export/timm_eva.py)."""
        return str(timm_eva.save_timm(directory, params, self.student, image_size=self.image_size))
