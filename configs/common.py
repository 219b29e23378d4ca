"""Small helpers for config files: argument parsing and shared defaults (plain values only)."""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict, config_dict


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parse a config argument such as ``"runlocal,variant=L/14,loss=sigmoid"``.

    Bare words set boolean flags to True; ``key=value`` pairs are converted to the type of the
    default. Unknown keys fail with the list of known ones, so a typo is caught at start-up.
    """
    parsed = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes", "on")
        elif default is None:
            parsed[key] = value
        else:
            parsed[key] = type(default)(value)
    return ConfigDict(parsed)


def checkpoint_config(every_steps: int, keep: int = 3, best_metric: str = "") -> ConfigDict:
    return ConfigDict(
        {
            "every_steps": every_steps,
            "keep": keep,
            "best_metric": best_metric,
            "best_mode": "max",
            "async_save": True,
        }
    )


def eval_config(every_steps: int, sets: dict[str, Any], **fields: Any) -> ConfigDict:
    """``config.eval`` of a full recipe: evaluated every ``every_steps`` on ``sets``, in batches
    of 1024 read by 8 workers; ``fields`` add or override (``include_ema``, ``at_start``...)."""
    return ConfigDict(
        {"every_steps": every_steps, "batch_size": 1024, "worker_count": 8, "sets": sets, **fields}
    )


def set_run_defaults(config: ConfigDict) -> None:
    """What every full recipe logs and runs on: a log line every 100 steps, all devices
    data-parallel, jax.distributed started when a multi-host launch is detected."""
    config.log_every_steps = 100
    config.mesh = ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    config.distributed = "auto"
    # --mode=compile: for a TPU topology (e.g. "v5e:16x16", with libtpu installed) instead of the
    # local devices; memory per device in GiB (0: the chip's HBM, or host memory / CPU devices);
    # when to search the largest per-device batch that fits (always, never, topology).
    config.compile = ConfigDict({"topology": "", "memory_gib": 0.0, "batch_search": "topology"})


def set_runlocal_evaluation(config: ConfigDict, sets: dict[str, Any], best_metric: str) -> None:
    """A :runlocal recipe's evaluation and checkpoints on the embedded scenes (in-process data,
    an evaluation and a checkpoint every 250 steps, the best one kept by ``best_metric``)."""
    config.data.worker_count = 0
    config.eval.update({"every_steps": 250, "batch_size": 200, "worker_count": 0})
    config.eval.sets = ConfigDict(sets)
    config.checkpoint.update({"every_steps": 250, "keep": 2, "best_metric": best_metric})
    config.log_every_steps = 50


def placeholder(kind: type) -> Any:
    """A typed empty field that a command-line override can fill (``--config.x=...``)."""
    return config_dict.placeholder(kind)


def imagenet_eval_set(**fields: Any) -> dict[str, Any]:
    """ImageNet-1k validation from TFDS (``imagenet2012``, prepared by the user) as an eval set."""
    return {
        "source": "tfds",
        "tfds_name": "imagenet2012",
        "split": "validation",
        "classnames": "imagenet",
        "max_examples": 0,
        **fields,
    }


def scenes_eval_set(**fields: Any) -> dict[str, Any]:
    """The embedded scenes' held-out split (first 1,000 images, 48 classes) as an eval set."""
    return {
        "source": "synthetic_scenes",
        "scenes_config": "base",
        "split": "test",
        "classnames": "synthetic_scenes",
        "max_examples": 1_000,
        **fields,
    }
