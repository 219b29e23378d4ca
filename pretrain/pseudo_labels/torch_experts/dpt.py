"""Depth: transformers' ``DPTForDepthEstimation`` from a local directory (a user's copy of e.g.
Intel/dpt-hybrid-midas or Intel/dpt-large: ``config.json`` + weights, and usually
``preprocessor_config.json``), loaded with nothing downloaded and no missing (but the unreachable
``UNREACHABLE_PREFIX``), unexpected or mismatched weight. Torch environment only.

Each image goes through the directory's ``DPTImageProcessor`` (when the directory has none: its
defaults, which are Intel/dpt-large's and Intel/dpt-hybrid-midas's settings: 384 x 384, bicubic,
mean = std = 0.5). Not "keep the aspect ratio" by default: transformers' ViT and hybrid DPTs
reshape their tokens to a square grid (only DPTs on a ``backbone_config``, e.g. DINOv2, take
other shapes), so a processor config that keeps the aspect ratio suits those alone. Images of
equal processed size run as one batch. The output,
relative inverse depth, is resized back to the image (bicubic, as the processor's
``post_process_depth_estimation`` does) and turned into relative depth with median 1
(``conventions.relative_depth``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import batched, existing_path, expert_fields, group_by_shape
from conventions import relative_depth
from transformers import DPTForDepthEstimation, DPTImageProcessor

DEFAULTS = {"min_inverse_fraction": 0.01, "batch_size": 8}
PROCESSOR_FILE = "preprocessor_config.json"
# Used only when the directory has no processor config (spelt out, not left to the library's
# defaults, so that a transformers release that changes them changes nothing here).
DEFAULT_PROCESSOR = {
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "keep_aspect_ratio": False,
    "resample": 3,  # bicubic
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


# The first fusion layer never gets a residual input, so its residual_layer1 is unreachable;
# transformers still registers it and Intel's checkpoints (the original DPT layout) omit it
# (transformers issue 28292). Its absence is the only one tolerated.
UNREACHABLE_PREFIX = "neck.fusion_stage.layers.0.residual_layer1."


def load_dpt(directory: str) -> DPTForDepthEstimation:
    """The model in ``directory``, loaded strictly: every reachable weight present, none left
    over, no shape mismatch."""
    model, info = DPTForDepthEstimation.from_pretrained(
        directory, local_files_only=True, output_loading_info=True
    )
    missing = [k for k in info["missing_keys"] if not k.startswith(UNREACHABLE_PREFIX)]
    problems = {
        "missing_keys": sorted(missing),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": sorted(map(str, info["mismatched_keys"])),
        "error_msgs": list(info["error_msgs"]),
    }
    if any(problems.values()):
        found = {k: v for k, v in problems.items() if v}
        raise ValueError(f"depth: {directory} does not match its DPT config: {found}")
    return model


class DepthExpert:
    target = "depth"

    def __init__(self, config: dict[str, Any], device: torch.device):
        fields = expert_fields(config, self.target, DEFAULTS)
        directory = existing_path(fields["weights"], self.target, directory=True)
        self.min_inverse_fraction = float(fields["min_inverse_fraction"])
        self.batch_size = int(fields["batch_size"])
        self.device = device
        if (directory / PROCESSOR_FILE).is_file():
            self.processor = DPTImageProcessor.from_pretrained(directory, local_files_only=True)
        else:
            self.processor = DPTImageProcessor(**DEFAULT_PROCESSOR)
        self.model = load_dpt(str(directory)).to(device).eval()

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        pixels = [
            self.processor(
                images=torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                return_tensors="pt",
                device=self.device,
            )["pixel_values"][0]
            for image in images
        ]
        results: list[np.ndarray | None] = [None] * len(images)
        for indices in group_by_shape([p.shape for p in pixels]).values():
            outputs = batched(
                lambda chunk: list(self.model(pixel_values=torch.stack(chunk)).predicted_depth),
                [pixels[i] for i in indices],
                self.batch_size,
            )
            for index, inverse in zip(indices, outputs):
                resized = F.interpolate(
                    inverse[None, None].float(),
                    size=images[index].shape[:2],
                    mode="bicubic",
                    align_corners=False,
                )[0, 0]
                results[index] = relative_depth(resized.cpu().numpy(), self.min_inverse_fraction)
        return results
