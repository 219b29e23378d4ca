"""Trained towers exported to PyTorch and imported back, one format per module or package:

* ``open_clip/``: CLIP / SigLIP two-tower models <-> open_clip (its ``__init__`` lists its modules);
  ``open_clip_configs.py``: open_clip's named model configs, as data.
* ``timm_vit.py`` (+ ``timm_vit_args.py``): the CLIP-style ViT <-> timm's VisionTransformer.
* ``timm_eva.py`` (+ ``timm_eva_args.py``): the EVA-02-style ViT <-> timm's Eva.
* ``timm_fastvit.py`` (+ ``fastvit_layout.py``): the MobileCLIP MCi tower <-> timm's FastVit.

Shared by them: ``tree_io.py`` (parameter trees and layout conversions), ``state_dict_shapes.py``
(expected state dicts and the one check against them), ``vit_fields.py`` (reading the ViT's
fields), ``timm_common.py`` (what timm's ViT and Eva lay out alike), ``timm_hub.py`` (timm's
export directory, and how a user loads one).
"""
