"""The config a workdir was trained with (``WORKDIR/config.json``), and the check that a run
resuming, evaluating or exporting it describes the same saved state."""

from __future__ import annotations

import json
import re
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

from pretrain.task import task_class

CONFIG_FILE = "config.json"
# Config fields that decide the structure and shapes of every run's saved state (learning rates
# or schedules may change between runs; these may not). A task adds its own (Task.state_fields).
COMMON_STATE_FIELDS = (
    r"task$",
    r"model\.",
    r"loss\.",
    r"optimizer\.(name|layer_decay|text_layer_decay)$",
)


def _flatten_json(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten_json(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], state_fields: tuple[str, ...]
) -> list[str]:
    """State-defining fields (``COMMON_STATE_FIELDS`` + ``state_fields``) whose values differ; a
    field only one config has is not compared (configs gain fields over time), except whether
    EMA is on."""
    patterns = (*COMMON_STATE_FIELDS, *state_fields)
    was, now = _flatten_json(saved), _flatten_json(current)
    differences = [
        f"  {field}: trained {was[field]!r}, now {now[field]!r}"
        for field in sorted(set(was) & set(now))
        if any(re.match(pattern, field) for pattern in patterns) and was[field] != now[field]
    ]
    if bool(saved.get("ema_decay")) != bool(current.get("ema_decay")):
        differences.append(
            f"  ema_decay: trained {saved.get('ema_decay')!r}, now {current.get('ema_decay')!r}"
        )
    return differences


def check_matches_training_config(config: ConfigDict, workdir: str) -> None:
    """Fail with the differing fields when the model described now is not the one trained."""
    saved_path = epath.Path(workdir) / CONFIG_FILE
    if not saved_path.exists():
        return
    differences = config_differences(
        json.loads(saved_path.read_text()),
        json.loads(config.to_json_best_effort()),
        task_class(config).state_fields,
    )
    if differences:
        raise ValueError(
            f"the config differs from the one {saved_path} was trained with:\n"
            + "\n".join(differences)
            + "\nPass the same config arguments and overrides as for training."
        )


def save_training_config(config: ConfigDict, workdir: str) -> None:
    """Keep the config beside the checkpoints (process 0 writes)."""
    if jax.process_index() == 0:
        (epath.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
