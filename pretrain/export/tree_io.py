"""Parameter trees as the exporters read and write them: flat ``a/b/c`` paths, entries handed out
once each, model fields read from a module or a mapping, the layout conversions every format
shares (Dense / Linear, LayerNorm, convolutions, attention heads) and atomic file writes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The normalisation CLIP models are trained with (OpenAI's), written into exported configs.
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

StateDict = dict[str, np.ndarray]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def contiguous_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested tree of flat entries, each a C-contiguous array (transposes leave views)."""
    return unflatten({key: np.ascontiguousarray(value) for key, value in flat.items()})


def unwrap_variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept ``variables`` ({"params": ...}) as well as the bare ``params`` tree."""
    return params["params"] if set(params) == {"params"} else params


def block_count(keys: Sequence[str] | Any, pattern: str, what: str) -> int:
    """Number of blocks whose index ``pattern`` captures, checking they run 0..n-1."""
    found = sorted({int(m.group(1)) for key in keys if (m := re.match(pattern, key))})
    if found != list(range(len(found))):
        raise ValueError(f"{what}: block indices are not contiguous from 0: {found}")
    return len(found)


class Entries:
    """Hands out the entries of a flat mapping once each, so that unmapped leftovers (a layout
    mistake, or a model the format cannot hold) are reported instead of silently dropped."""

    def __init__(self, flat: Mapping[str, Any], convert: Callable[[Any], np.ndarray], what: str):
        self._remaining = dict(flat)
        self._convert = convert
        self._what = what

    def take(self, key: str) -> np.ndarray:
        if key not in self._remaining:
            raise KeyError(f"{self._what} has no {key!r}")
        return self._convert(self._remaining.pop(key))

    def take_under(self, prefix: str) -> dict[str, np.ndarray]:
        """Every entry under ``prefix``, keyed without it."""
        return {key.removeprefix(prefix): self.take(key) for key in self.keys_under(prefix)}

    def has(self, key: str) -> bool:
        return key in self._remaining

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self._remaining if key.startswith(prefix)]

    def block_count(self, pattern: str) -> int:
        return block_count(self._remaining, pattern, self._what)

    def check_all_taken(self) -> None:
        if self._remaining:
            raise ValueError(f"{self._what} entries with no mapping: {sorted(self._remaining)}")


def as_arrays(dtype: Any) -> Callable[[Any], np.ndarray]:
    """The conversion of :class:`Entries` values to NumPy arrays of ``dtype``."""
    return lambda value: np.asarray(value, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Model fields
# --------------------------------------------------------------------------------------------------


def module_field(module: Any, name: str, default: Any = None) -> Any:
    """A field of a model given as a Flax module instance (a dataclass) or a mapping of fields."""
    if isinstance(module, Mapping):
        return module.get(name, default)
    return getattr(module, name, default)


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image or grid size as (height, width)."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def size_value(value: int | tuple[int, int] | list[int]) -> int | list[int]:
    """A size as JSON configs write it: an int when square, else [height, width]."""
    height, width = as_pair(value)
    return height if height == width else [height, width]


# timm's SwiGLU towers state 4 * 2 / 3, its other towers 4.0: those are the values to write.
TIMM_MLP_RATIOS = (4 * 2 / 3, 4.0)


def mlp_ratio_for(width: int, mlp_dim: int, preferred: Sequence[float] = TIMM_MLP_RATIOS) -> float:
    """An ``mlp_ratio`` for which ``int(width * mlp_ratio)`` (timm's and open_clip's rule) gives
    back ``mlp_dim``: one of ``preferred``, else ``mlp_dim / width``, nudged by half a unit when
    the float product lands a hair below the integer and truncates (2.6667-style ratios)."""
    for ratio in (*preferred, mlp_dim / width, (mlp_dim + 0.5) / width):
        if int(width * ratio) == mlp_dim:
            return ratio
    raise ValueError(f"no mlp_ratio gives {mlp_dim} hidden units at width {width}")


# --------------------------------------------------------------------------------------------------
# Layout conversions (Flax <-> torch)
# --------------------------------------------------------------------------------------------------


def linear_to_torch(entries: Entries, jax: str, torch: str, bias: bool = True) -> StateDict:
    """Dense ``kernel`` (in, out) -> Linear ``weight`` (out, in), and the bias."""
    state = {f"{torch}.weight": entries.take(f"{jax}/kernel").T}
    if bias:
        state[f"{torch}.bias"] = entries.take(f"{jax}/bias")
    return state


def linear_from_torch(entries: Entries, torch: str, jax: str, bias: bool = True) -> StateDict:
    flat = {f"{jax}/kernel": entries.take(f"{torch}.weight").T}
    if bias:
        flat[f"{jax}/bias"] = entries.take(f"{torch}.bias")
    return flat


def layer_norm_to_torch(entries: Entries, jax: str, torch: str) -> StateDict:
    """LayerNorm ``scale`` -> ``weight`` (flattened: a per-head norm is one vector in torch)."""
    return {
        f"{torch}.weight": entries.take(f"{jax}/scale").reshape(-1),
        f"{torch}.bias": entries.take(f"{jax}/bias").reshape(-1),
    }


def layer_norm_from_torch(
    entries: Entries, torch: str, jax: str, shape: tuple[int, ...] = (-1,)
) -> StateDict:
    return {
        f"{jax}/scale": entries.take(f"{torch}.weight").reshape(shape),
        f"{jax}/bias": entries.take(f"{torch}.bias").reshape(shape),
    }


def conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax conv kernel HWIO -> torch weight OIHW."""
    return kernel.transpose(3, 2, 0, 1)


def conv_from_torch(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)


# Attention projections: Flax keeps heads as an axis, torch concatenates them head-major, which is
# exactly what flattening the (H, D) axes does.


def heads_to_torch(kernel: np.ndarray) -> np.ndarray:
    """A q/k/v kernel (width, heads, head_dim) -> torch Linear weight (heads * head_dim, width)."""
    return kernel.reshape(kernel.shape[0], -1).T


def heads_from_torch(weight: np.ndarray, num_heads: int) -> np.ndarray:
    return weight.T.reshape(weight.shape[1], num_heads, -1)


def heads_out_to_torch(kernel: np.ndarray) -> np.ndarray:
    """An output kernel (heads, head_dim, width) -> Linear weight (width, heads * head_dim)."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def heads_out_from_torch(weight: np.ndarray, num_heads: int) -> np.ndarray:
    return weight.T.reshape(num_heads, -1, weight.shape[0])


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name, so that an interrupted export never looks complete."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    temporary.replace(path)


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    write_atomically(path, lambda file: file.write_text(json.dumps(content, indent=2) + "\n"))


def write_safetensors(path: Path, state: Mapping[str, np.ndarray]) -> None:
    """A state dict as PyTorch reads it (``safetensors.torch.load_file``)."""
    from safetensors.numpy import save_file

    write_atomically(
        path, lambda file: save_file(dict(state), str(file), metadata={"format": "pt"})
    )
