"""Flax modules built from config entries: a config names a module class by its import path."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def import_object(path: str) -> Any:
    """``"models.vit.VisionTransformer"`` -> the class (configs name modules by path)."""
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {path!r} named in the config: {error}") from error


def build_module(spec: Mapping[str, Any], **common: Any) -> Any:
    """Build a Flax module from a config entry ``{"module": path, "variant": name, **fields}``.

    ``variant`` (if non-empty) goes through the class's ``from_variant``; other fields and the
    ``common`` ones (dtype, output size...) are passed as keyword arguments, fields winning.
    """
    fields = dict(spec)
    module_cls = import_object(fields.pop("module"))
    variant = fields.pop("variant", "")
    kwargs = {**common, **fields}
    try:
        return module_cls.from_variant(variant, **kwargs) if variant else module_cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"bad fields for {spec['module']}: {error}") from error
