"""Optimizers and learning-rate schedule from ``config.optimizer`` / ``config.schedule``.

* AdamW (``name="adamw"``) with linear warm-up and cosine decay. Weight decay skips biases and 1-D
  parameters (norm scales, class embedding, logit scale), as open_clip does; more names can be
  excluded with ``no_decay_patterns`` (regexes searched in the parameter's path, e.g.
  :data:`EMBEDDING_NO_DECAY_PATTERNS` for position and class embeddings).
* LAMB (``name="lamb"``): Adam's bias-corrected direction plus decoupled weight decay, rescaled
  per parameter array by the trust ratio ``|w| / |update|``, clamped to ``[min_trust,
  max_trust]`` ([0.01, 10] is DeepSpeed's FusedLamb, which EVA-CLIP trains with; unset: no clamp,
  optax's LAMB). A ratio is 1 where either norm is 0 (zero-initialised biases), as in the LAMB
  reference codes; ``trust_ratio_for_no_decay=False`` skips it on parameters without decay.
* Layer-wise learning-rate decay (``layer_decay`` for the image tower, ``text_layer_decay`` for
  the text tower, e.g. a pretrained text tower fine-tuned beside a freshly trained image tower;
  None: off): a parameter of layer ``i`` of a tower with ``L`` blocks has its update multiplied by
  ``decay ** (L + 1 - i)`` (EVA-CLIP's rule). Embeddings and ``ln_pre`` are layer 0, block ``k``
  is layer ``k + 1``, everything after the blocks is layer ``L + 1``; ``L`` is read off the
  parameter tree; parameters outside both towers keep multiplier 1. Scaling the update equals
  scaling that parameter's learning rate (weight decay included), as PyTorch's per-group
  ``lr_scale`` does. Which names are towers, embeddings and blocks: regexes in
  ``layer_decay_patterns`` (keys of :data:`DEFAULT_LAYER_DECAY_PATTERNS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from pretrain.sharding import path_to_name

__all__ = [
    "DEFAULT_LAYER_DECAY_PATTERNS",
    "EMBEDDING_NO_DECAY_PATTERNS",
    "LayerDecayRule",
    "layer_decay_multipliers",
    "layer_decay_rules",
    "layer_id",
    "learning_rate_schedule",
    "make_optimizer",
    "num_blocks",
    "scale_by_clamped_trust_ratio",
    "scale_by_layer_decay",
    "weight_decay_mask",
]

# EVA-CLIP's recipes: no weight decay on position and class embeddings (2-D position embeddings are
# not caught by the 1-D rule). Both this project's names and timm/EVA names.
EMBEDDING_NO_DECAY_PATTERNS = (
    r"(^|/)positional_embedding$",
    r"(^|/)class_embedding$",
    r"(^|/)pos_embed$",
    r"(^|/)cls_token$",
)

# Regexes over parameter paths ("image_encoder/transformer/resblocks_3/attn/query/kernel").
DEFAULT_LAYER_DECAY_PATTERNS = {
    # Which parameters belong to each tower.
    "image_tower": r"^image_encoder/",
    "text_tower": r"^text_encoder/",
    # Layer 0: what runs before the first block.
    "embedding": (
        r"/(conv1|patch_embed|class_embedding|cls_token|positional_embedding|pos_embed"
        r"|token_embedding|ln_pre)(/|$)"
    ),
    # Block k (layer k + 1): the first group is the block index.
    "block": r"/(?:res)?blocks_(\d+)/",
}


SCHEDULES = ("cosine", "polynomial", "constant")


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    """Linear warm-up from ``schedule.warmup_init_lr`` (default 0) to ``peak_lr`` over
    ``warmup_steps``, then ``decay``: "cosine" or "polynomial" (``power``, default 1: linear, as
    mmsegmentation's poly schedule) to ``end_lr`` at ``total_steps``, or "constant"."""
    schedule = config.schedule
    total_steps = int(config.total_steps)
    warmup_steps = min(int(schedule.warmup_steps), total_steps)
    init_lr = float(schedule.get("warmup_init_lr", 0.0))
    peak_lr = float(schedule.peak_lr)
    if schedule.decay not in SCHEDULES:
        raise ValueError(f"unknown schedule.decay {schedule.decay!r}; choose from {SCHEDULES}")
    if schedule.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=init_lr,
            peak_value=peak_lr,
            warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1),
            end_value=float(schedule.end_lr),
        )
    warmup = optax.linear_schedule(init_lr, peak_lr, max(warmup_steps, 1))
    if schedule.decay == "polynomial":
        after = optax.polynomial_schedule(
            peak_lr,
            float(schedule.end_lr),
            power=float(schedule.get("power", 1.0)),
            transition_steps=max(total_steps - warmup_steps, 1),
        )
    else:
        after = optax.constant_schedule(peak_lr)
    return optax.join_schedules([warmup, after], [warmup_steps])


def weight_decay_mask(params: Any, no_decay_patterns: Sequence[str] = ()) -> Any:
    """True where weight decay applies: matrices and kernels, not biases, norms or scalars."""

    def decays(path: Sequence[Any], leaf: Any) -> bool:
        name = path_to_name(path)
        if leaf.ndim < 2 or name.endswith("bias"):
            return False
        return not any(re.search(pattern, name) for pattern in no_decay_patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


# ------------------------------------------------------------------------------- LAMB ----


def _norm(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x))


def scale_by_clamped_trust_ratio(
    min_ratio: float = 0.0,
    max_ratio: float = math.inf,
    mask: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """LAMB's per-array trust ratio ``clip(|param| / |update|, min_ratio, max_ratio)``.

    The ratio is 1 where either norm is 0 (a zero-initialised parameter would otherwise never
    move), and where ``mask(params)`` is False. Norms are float32. Stateless.
    """
    if not 0.0 <= min_ratio <= max_ratio:
        raise ValueError(f"need 0 <= min_ratio <= max_ratio, got {min_ratio}, {max_ratio}")

    def scale(update: jax.Array, param: jax.Array, adapt: bool) -> jax.Array:
        if not adapt:
            return update
        param_norm, update_norm = _norm(param), _norm(update)
        both_positive = (param_norm > 0) & (update_norm > 0)
        ratio = param_norm / jnp.where(both_positive, update_norm, 1.0)
        ratio = jnp.where(both_positive, jnp.clip(ratio, min_ratio, max_ratio), 1.0)
        return update * ratio.astype(update.dtype)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("the LAMB trust ratio needs the parameters: call update(g, s, params)")
        adapt = mask(params) if mask is not None else jax.tree.map(lambda _: True, params)
        return jax.tree.map(scale, updates, params, adapt), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _lamb(
    learning_rate: optax.ScalarOrSchedule,
    opt: ConfigDict,
    decay_mask: Callable[[Any], Any],
) -> optax.GradientTransformation:
    trust_mask = None if opt.get("trust_ratio_for_no_decay", True) else decay_mask
    min_trust = opt.get("min_trust")
    max_trust = opt.get("max_trust")
    return optax.chain(
        optax.scale_by_adam(b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps)),
        optax.add_decayed_weights(float(opt.weight_decay), mask=decay_mask),
        scale_by_clamped_trust_ratio(
            min_ratio=0.0 if min_trust is None else float(min_trust),
            max_ratio=math.inf if max_trust is None else float(max_trust),
            mask=trust_mask,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


# --------------------------------------------------------- layer-wise learning-rate decay ----


class LayerDecayRule(NamedTuple):
    """Layer-wise decay of one tower: parameters whose path matches ``tower`` (a regex)."""

    tower: str
    decay: float
    embedding: str = DEFAULT_LAYER_DECAY_PATTERNS["embedding"]
    block: str = DEFAULT_LAYER_DECAY_PATTERNS["block"]


def layer_id(name: str, num_layers: int, embedding_pattern: str, block_pattern: str) -> int:
    """0 for embeddings, ``k + 1`` for block ``k``, ``num_layers + 1`` for the rest."""
    if re.search(embedding_pattern, name):
        return 0
    block = re.search(block_pattern, name)
    if block:
        return int(block.group(1)) + 1
    return num_layers + 1


def num_blocks(names: Sequence[str], tower_pattern: str, block_pattern: str) -> int:
    """1 + the largest block index among the tower's parameter names (0 if none match)."""
    indices = [
        int(match.group(1))
        for name in names
        if re.search(tower_pattern, name)
        for match in [re.search(block_pattern, name)]
        if match
    ]
    return 1 + max(indices) if indices else 0


def _multiplier_by_name(names: Sequence[str], rules: Sequence[LayerDecayRule]) -> dict[str, float]:
    towers = {rule.tower: num_blocks(names, rule.tower, rule.block) for rule in rules}
    for rule in rules:
        in_tower = any(re.search(rule.tower, name) for name in names)
        if rule.decay != 1.0 and in_tower and towers[rule.tower] == 0:
            raise ValueError(
                f"layer decay: no parameter of tower {rule.tower!r} matches the block pattern "
                f"{rule.block!r}; set optimizer.layer_decay_patterns"
            )
    multipliers = {}
    for name in names:
        multipliers[name] = 1.0
        for rule in rules:
            if re.search(rule.tower, name):
                num_layers = towers[rule.tower]
                depth = num_layers + 1 - layer_id(name, num_layers, rule.embedding, rule.block)
                multipliers[name] = float(rule.decay) ** depth
                break
    return multipliers


def layer_decay_multipliers(tree: Any, rules: Sequence[LayerDecayRule]) -> Any:
    """A tree like ``tree`` of Python floats: each parameter's learning-rate multiplier.

    The first rule whose tower matches a path decides; paths in no tower get 1.0.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    by_name = _multiplier_by_name([path_to_name(path) for path, _ in leaves], rules)
    return jax.tree_util.tree_map_with_path(lambda path, _: by_name[path_to_name(path)], tree)


def scale_by_layer_decay(rules: Sequence[LayerDecayRule]) -> optax.GradientTransformation:
    """Multiply each update by its layer's multiplier (static: computed from the tree's paths)."""

    def update_fn(updates, state, params=None):
        del params
        multipliers = layer_decay_multipliers(updates, rules)
        scaled = jax.tree.map(
            lambda update, multiplier: update if multiplier == 1.0 else update * multiplier,
            updates,
            multipliers,
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def layer_decay_rules(opt: ConfigDict | Mapping[str, Any]) -> list[LayerDecayRule]:
    """The towers with a layer decay set in the optimizer config (empty: no layer decay)."""
    patterns = dict(DEFAULT_LAYER_DECAY_PATTERNS)
    overrides = dict(opt.get("layer_decay_patterns") or {})
    unknown = set(overrides) - set(patterns)
    if unknown:
        raise ValueError(
            f"unknown optimizer.layer_decay_patterns keys {sorted(unknown)}; "
            f"available: {sorted(patterns)}"
        )
    patterns.update(overrides)
    rules = []
    for tower, field in (("image_tower", "layer_decay"), ("text_tower", "text_layer_decay")):
        decay = opt.get(field)
        if decay is None:
            continue
        if not float(decay) > 0:
            raise ValueError(f"optimizer.{field} must be positive, got {decay}")
        rules.append(
            LayerDecayRule(patterns[tower], float(decay), patterns["embedding"], patterns["block"])
        )
    return rules


# ---------------------------------------------------------------------------- factory ----


def make_optimizer(config: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    opt = config.optimizer
    schedule = learning_rate_schedule(config)
    no_decay = tuple(opt.get("no_decay_patterns", ()))
    mask = lambda params: weight_decay_mask(params, no_decay)
    if opt.name == "adamw":
        core = optax.adamw(
            schedule,
            b1=float(opt.b1),
            b2=float(opt.b2),
            eps=float(opt.eps),
            weight_decay=float(opt.weight_decay),
            mask=mask,
        )
    elif opt.name == "lamb":
        core = _lamb(schedule, opt, mask)
    else:
        raise ValueError(f"unknown optimizer.name {opt.name!r}; available: 'adamw', 'lamb'")
    chain = []
    if opt.get("grad_clip_norm"):
        chain.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    chain.append(core)
    rules = layer_decay_rules(opt)
    # Only when configured, so the optimizer state of existing recipes keeps its structure.
    if rules:
        chain.append(scale_by_layer_decay(rules))
    return optax.chain(*chain), schedule
