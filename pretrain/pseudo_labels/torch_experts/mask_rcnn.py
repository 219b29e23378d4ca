"""Segmentation: torchvision's Mask R-CNN (COCO, 91 category ids) -> a semantic class map with
COCO's 80 thing classes numbered 1..80 and 0 = background (``instances.py`` has the order and the
instance -> semantic rule). Torch environment only.

The weights are a state-dict file on disk (e.g. torchvision's
``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``), loaded strictly into
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)`` (or ``_v2`` with
``model="maskrcnn_resnet50_fpn_v2"``). The model resizes each image itself (``min_size`` /
``max_size``, torchvision's 800 / 1333 by default) and returns at most ``max_instances`` (100)
instances, with mask probabilities at the image's own size, so images of any size go in one
list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from common import batched, existing_path, expert_fields, image_tensor
from instances import OVERLAP_RULES, semantic_from_instances
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

BUILDERS = {
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
}
DEFAULTS = {
    "model": "maskrcnn_resnet50_fpn",
    "score_threshold": 0.5,
    "mask_threshold": 0.5,
    "overlap": "score",
    "min_size": 800,
    "max_size": 1333,
    "max_instances": 100,
    "batch_size": 4,
}
COCO_CATEGORY_IDS = 91


class SegmentationExpert:
    target = "segmentation"

    def __init__(self, config: dict[str, Any], device: torch.device):
        fields = expert_fields(config, self.target, DEFAULTS)
        if fields["model"] not in BUILDERS:
            raise ValueError(f"segmentation: model must be one of {sorted(BUILDERS)}")
        if fields["overlap"] not in OVERLAP_RULES:
            raise ValueError(f"segmentation: overlap must be one of {OVERLAP_RULES}")
        path = existing_path(fields["weights"], self.target)
        self.rule = {
            "score_threshold": float(fields["score_threshold"]),
            "mask_threshold": float(fields["mask_threshold"]),
            "overlap": fields["overlap"],
        }
        self.batch_size = int(fields["batch_size"])
        self.device = device
        model = BUILDERS[fields["model"]](
            weights=None,
            weights_backbone=None,
            num_classes=COCO_CATEGORY_IDS,
            min_size=int(fields["min_size"]),
            max_size=int(fields["max_size"]),
            box_detections_per_img=int(fields["max_instances"]),
            # Keep every detection the rule could keep (torchvision drops scores below 0.05).
            box_score_thresh=min(0.05, self.rule["score_threshold"]),
        )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.to(device).eval()

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return batched(self._predict_batch, images, self.batch_size)

    def _predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        detections = self.model([image_tensor(image, self.device) for image in images])
        results = []
        for found in detections:
            # Only instances the rule keeps leave the device: full-size masks are large.
            keep = found["scores"] >= self.rule["score_threshold"]
            results.append(
                semantic_from_instances(
                    found["masks"][keep, 0].float().cpu().numpy(),
                    found["labels"][keep].cpu().numpy(),
                    found["scores"][keep].float().cpu().numpy(),
                    **self.rule,
                )
            )
        return results
