"""Optimizer and learning-rate schedule from the config.

The CLIP recipe (paper 000, Table 11): AdamW with betas (0.9, 0.95), weight decay 0.2, peak lr 1e-3
after 2k linear warm-up steps, cosine decay to 1e-6. Weight decay skips biases and 1-D parameters
(LayerNorm scales, class embedding, logit scale), as open_clip does; more names can be excluded
with ``optimizer.no_decay_patterns``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from pretrain.sharding import path_to_name


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    schedule = config.schedule
    total_steps = int(config.total_steps)
    warmup_steps = min(int(schedule.warmup_steps), total_steps)
    if schedule.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=float(schedule.peak_lr),
            warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1),
            end_value=float(schedule.end_lr),
        )
    if schedule.decay == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, float(schedule.peak_lr), max(warmup_steps, 1)),
                optax.constant_schedule(float(schedule.peak_lr)),
            ],
            [warmup_steps],
        )
    raise ValueError(f"unknown schedule.decay {schedule.decay!r}; use 'cosine' or 'constant'")


def weight_decay_mask(params: Any, no_decay_patterns: Sequence[str] = ()) -> Any:
    """True where weight decay applies: matrices and kernels, not biases, norms or scalars."""

    def decays(path: Sequence[Any], leaf: Any) -> bool:
        name = path_to_name(path)
        if leaf.ndim < 2 or name.endswith("bias"):
            return False
        return not any(re.search(pattern, name) for pattern in no_decay_patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


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
    else:
        raise ValueError(f"unknown optimizer.name {opt.name!r}; available: 'adamw'")
    chain = []
    if opt.get("grad_clip_norm"):
        chain.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    chain.append(core)
    return optax.chain(*chain), schedule
