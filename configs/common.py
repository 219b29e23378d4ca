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
