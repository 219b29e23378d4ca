"""An open_clip export directory: ``open_clip_model.safetensors`` (the state dict) and
``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``), the two files open_clip
reads from a local directory or a Hugging Face Hub repository, plus ``<name>.json`` (the bare model
config open_clip's registry takes) when named; written, found and read here, with open_clip
checkpoints from elsewhere (safetensors, or torch ``.pt``/``.bin`` where torch is installed).
:data:`LOADING_INSTRUCTIONS` says how a user loads one in PyTorch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export.open_clip.state_dict import from_open_clip_variables, to_open_clip_state_dict
from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    StateDict,
    write_json,
    write_safetensors,
)

WEIGHTS_FILE_NAME = "open_clip_model.safetensors"
CONFIG_FILE_NAME = "open_clip_config.json"
# The names open_clip and the Hugging Face Hub give the weights of a model, in order of preference.
WEIGHTS_FILE_NAMES = (
    WEIGHTS_FILE_NAME,
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

ParamTree = Mapping[str, Any]

LOADING_INSTRUCTIONS = f"""\
Load an export directory in PyTorch:

  import open_clip
  model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/export")
  tokenizer = open_clip.get_tokenizer("local-dir:/path/to/export")
  model.eval()

(after uploading the directory's files to a Hub repository: "hf-hub:<user>/<repo>" instead),
or, with a named config (written by save_open_clip(..., name=NAME)):

  open_clip.add_model_config("/path/to/export/NAME.json")
  weights = "/path/to/export/{WEIGHTS_FILE_NAME}"
  model = open_clip.create_model("NAME", pretrained=weights)
"""


def default_preprocess_config(image_size: int | list[int]) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` (resize, crop, normalise) with OpenAI's statistics."""
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def save_open_clip(
    path_dir: str | Path,
    params: ParamTree,
    model_config: Mapping[str, Any],
    name: str | None = None,
    *,
    preprocess_cfg: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
    batch_stats: ParamTree | None = None,
) -> Path:
    """Write an open_clip export directory; returns its path.

    Files: ``open_clip_model.safetensors`` (the state dict), ``open_clip_config.json``
    (``{"model_cfg", "preprocess_cfg"}``, what ``local-dir:`` and ``hf-hub:`` read) and, when
    ``name`` is given, ``<name>.json`` (the bare model config for ``open_clip.add_model_config``).
    ``preprocess_cfg`` entries override the defaults (OpenAI mean/std, bicubic, the model's size).
    ``params`` and ``batch_stats`` as in :func:`to_open_clip_state_dict` (``batch_stats`` for a
    ResNet or MobileCLIP image tower).
    """
    state = to_open_clip_state_dict(
        params, model_config=model_config, dtype=dtype, batch_stats=batch_stats
    )
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    image_size = model_config["vision_cfg"]["image_size"]
    config = {
        "model_cfg": dict(model_config),
        "preprocess_cfg": {**default_preprocess_config(image_size), **(preprocess_cfg or {})},
    }
    write_safetensors(path_dir / WEIGHTS_FILE_NAME, state)
    write_json(path_dir / CONFIG_FILE_NAME, config)
    if name is not None:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ValueError(
                f"model name {name!r} must be a plain file stem (letters, digits, -_.)"
            )
        write_json(path_dir / f"{name}.json", dict(model_config))
    return path_dir


def _load_safetensors(path: Path) -> StateDict:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(str(path))
    except (KeyError, TypeError, ValueError):
        # safetensors' NumPy reader has no bfloat16; its Flax reader does (ml_dtypes on the host).
        import safetensors.flax

        return {
            key: np.asarray(value) for key, value in safetensors.flax.load_file(str(path)).items()
        }


def _load_torch_file(path: Path) -> StateDict:
    try:
        import torch
    except ImportError as error:
        # The JAX environment has no torch on purpose (its CUDA wheels conflict with JAX's).
        raise ImportError(
            f"reading {path} needs PyTorch, which this environment does not have; safetensors "
            'files do not. Convert it once where torch is installed: python -c "import torch; '
            "from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', map_location='cpu'); "
            "sd = sd.get('state_dict', sd); "
            "save_file({k.removeprefix('module.'): v.contiguous() for k, v in sd.items() "
            f"if torch.is_tensor(v)}}, '{path.with_name(WEIGHTS_FILE_NAME)}')\" "
            "(or pip install torch, CPU wheel)"
        ) from error
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    # open_clip training checkpoints wrap the weights; DDP prefixes every key with "module.".
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    return {
        key.removeprefix("module."): value.detach().float().numpy()
        for key, value in checkpoint.items()
        if hasattr(value, "detach")
    }


def load_open_clip_weights(path: str | Path) -> StateDict:
    """Read an open_clip state dict: safetensors with NumPy; .pt, .pth and .bin need torch."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return _load_torch_file(path)
    raise ValueError(
        f"unknown checkpoint format {path.suffix!r}: use .safetensors, .pt, .pth or .bin"
    )


def find_open_clip_weights(path_dir: str | Path) -> Path:
    """The weights file of a model directory: one of :data:`WEIGHTS_FILE_NAMES` (open_clip's and
    the Hub's names, safetensors first), else its only ``.safetensors``/``.bin``/``.pt``/``.pth``
    file."""
    path_dir = Path(path_dir)
    for name in WEIGHTS_FILE_NAMES:
        if (path_dir / name).is_file():
            return path_dir / name
    candidates = sorted(
        path for path in path_dir.iterdir() if path.is_file() and path.suffix in WEIGHTS_SUFFIXES
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"no open_clip weights in {path_dir}: expected {', '.join(WEIGHTS_FILE_NAMES)} or a "
            f"single file ending in {', '.join(WEIGHTS_SUFFIXES)}"
        )
    raise FileNotFoundError(
        f"several weight files in {path_dir} ({', '.join(p.name for p in candidates)}): keep one, "
        f"or name it {WEIGHTS_FILE_NAME}"
    )


def read_model_config(path_dir: str | Path) -> dict[str, Any] | None:
    """The model config of ``path_dir/open_clip_config.json`` (``{"model_cfg": ...}`` or a bare
    model config), or ``None`` when the directory has none."""
    config_path = Path(path_dir) / CONFIG_FILE_NAME
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    return config.get("model_cfg", config)


def load_open_clip(
    path_dir: str | Path, model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an open_clip model directory (ours or a Hub snapshot): ``(model_cfg, params)``.

    ``model_config`` (e.g. from pretrain/export/open_clip_configs.py) replaces the directory's
    ``open_clip_config.json``, which is then not needed. A model with BatchNorm (a ResNet or
    MobileCLIP image tower) needs :func:`load_open_clip_variables`.
    """
    model_config, variables = load_open_clip_variables(path_dir, model_config)
    if "batch_stats" in variables:
        raise ValueError(
            f"{path_dir} holds BatchNorm running statistics (a ResNet or MobileCLIP image tower): "
            "read it with load_open_clip_variables"
        )
    return model_config, variables["params"]


def load_open_clip_variables(
    path_dir: str | Path, model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`load_open_clip` for any model: ``(model_cfg, variables)``, the variables holding
    ``params`` and, for a ResNet or MobileCLIP image tower, ``batch_stats``."""
    if model_config is None:
        model_config = read_model_config(path_dir)
        if model_config is None:
            raise FileNotFoundError(
                f"{path_dir} has no {CONFIG_FILE_NAME}: pass the model config (or, for a teacher, "
                "name the model with teacher.open_clip_model)"
            )
    model_config = dict(model_config)
    state_dict = load_open_clip_weights(find_open_clip_weights(path_dir))
    return model_config, from_open_clip_variables(state_dict, model_config=model_config)
