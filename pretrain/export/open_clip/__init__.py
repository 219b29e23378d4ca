"""The project's CLIP / SigLIP two-tower models <-> PyTorch open_clip (``CLIP`` and
``CustomTextCLIP``), both ways: configs, state dicts, export directories, and the command line
``python -m pretrain.export.open_clip`` (whose ``--help`` shows how to load an export in PyTorch,
files.LOADING_INSTRUCTIONS).

Modules, one concern each: families.py (the table of image-tower families: vit.py open_clip's
ViT, eva_trunk.py timm EVA trunks with timm_trunks.py's architectures, resnet.py the
ModifiedResNet, mobileclip.py MobileCLIP's FastViT), text.py (the text tower), transformer.py
(the residual blocks both share), defaults.py (open_clip's config defaults), config.py (the model
config), state_dict.py (the state dict), files.py (export directories), two_tower.py (a whole
model, as a task exports it), cli.py. The names below are the package's public interface.
"""

from pretrain.export.open_clip.cli import main
from pretrain.export.open_clip.config import jax_model_kwargs, open_clip_model_config
from pretrain.export.open_clip.files import (
    CONFIG_FILE_NAME,
    LOADING_INSTRUCTIONS,
    WEIGHTS_FILE_NAME,
    WEIGHTS_FILE_NAMES,
    default_preprocess_config,
    find_open_clip_weights,
    load_open_clip,
    load_open_clip_variables,
    load_open_clip_weights,
    read_model_config,
    save_open_clip,
)
from pretrain.export.open_clip.state_dict import (
    check_state_dict_matches_config,
    from_open_clip_state_dict,
    from_open_clip_variables,
    open_clip_state_dict_shapes,
    to_open_clip_state_dict,
)
from pretrain.export.open_clip.two_tower import save_two_tower_model
from pretrain.export.tree_io import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

__all__ = [
    "CONFIG_FILE_NAME",
    "LOADING_INSTRUCTIONS",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "WEIGHTS_FILE_NAME",
    "WEIGHTS_FILE_NAMES",
    "check_state_dict_matches_config",
    "default_preprocess_config",
    "find_open_clip_weights",
    "from_open_clip_state_dict",
    "from_open_clip_variables",
    "jax_model_kwargs",
    "load_open_clip",
    "load_open_clip_variables",
    "load_open_clip_weights",
    "main",
    "open_clip_model_config",
    "open_clip_state_dict_shapes",
    "read_model_config",
    "save_open_clip",
    "save_two_tower_model",
    "to_open_clip_state_dict",
]
