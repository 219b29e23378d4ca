"""The torch experts' server: loads the configured experts once, then answers requests as JSON
lines on stdin / stdout. Torch environment only; run it by path (it imports its sibling modules,
never ``pretrain``)::

    <torch python> pretrain/pseudo_labels/torch_experts/server.py '<experts JSON>'

The experts JSON (``pretrain/pseudo_labels/torch_client.py`` documents every field)::

    {"segmentation": {"kind": "mask_rcnn", "weights": PATH, ...},
     "depth": {"kind": "dpt", "weights": DIR, ...},
     "normals": {"kind": "nll_angmf", "weights": PATH, ...},
     "device": "auto"}

Protocol (one JSON object per line; stdout carries nothing else, logs go to stderr):

* after loading: ``{"ready": true, "targets": [...], "device": "cuda"}``, or ``{"ready": false,
  "error": "..."}`` and exit status 1 when an expert cannot be built or loaded;
* request ``{"input": "/path/in.npz", "output": "/path/out.npz"}``: ``in.npz`` holds ``image_0 ..
  image_{n-1}``, uint8 (H_i, W_i, 3) RGB; the server writes ``out.npz`` with ``segmentation_i``
  int32 (H_i, W_i), ``depth_i`` float32 (H_i, W_i) and ``normals_i`` float32 (H_i, W_i, 3) for
  each configured target, then replies ``{"ok": true}``; a bad request (or a failure on its
  images) gets ``{"ok": false, "error": "..."}`` and the server stays up;
* end of stdin: the server exits with status 0.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from common import log, resolve_device

TARGET_ORDER = ("segmentation", "depth", "normals")
KINDS = {"segmentation": "mask_rcnn", "depth": "dpt", "normals": "nll_angmf"}
TOP_LEVEL = ("device",)


def build_experts(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Target name -> expert (in ``TARGET_ORDER``); unknown targets or kinds are errors."""
    unknown = sorted(set(config) - set(TARGET_ORDER) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"unknown experts config entries {unknown}; known: {TARGET_ORDER}")
    experts = {}
    for target in TARGET_ORDER:
        if target not in config:
            continue
        entry = config[target]
        if not isinstance(entry, dict) or entry.get("kind") != KINDS[target]:
            raise ValueError(f"{target}: expected an entry with kind {KINDS[target]!r}")
        # Import each expert only when configured: each needs its own library (torchvision,
        # transformers, timm).
        if target == "segmentation":
            from mask_rcnn import SegmentationExpert as expert_class
        elif target == "depth":
            from dpt import DepthExpert as expert_class
        else:
            from nll_angmf import NormalsExpert as expert_class
        log(f"loading {target} expert ({entry['kind']}) from {entry.get('weights')}")
        experts[target] = expert_class(entry, device)
    if not experts:
        raise ValueError(f"no expert configured; give one or more of {TARGET_ORDER}")
    return experts


def read_images(path: Path) -> list[np.ndarray]:
    """``image_0 .. image_{n-1}`` of an npz file, each checked to be uint8 (H, W, 3)."""
    with np.load(path, allow_pickle=False) as members:
        names = set(members.files)
        count = len(names)
        expected = {f"image_{i}" for i in range(count)}
        if names != expected:
            wanted = f"image_0..image_{count - 1}"
            raise ValueError(f"{path} must hold exactly {wanted}, not {sorted(names)}")
        images = [members[f"image_{i}"] for i in range(count)]
    for index, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            got = f"{image.dtype} {image.shape}"
            raise ValueError(f"image_{index}: need uint8 (H, W, 3), got {got}")
    return images


def answer(request: dict[str, Any], experts: dict[str, Any]) -> None:
    """Run every expert on the request's images and write its output file."""
    if not isinstance(request, dict) or not {"input", "output"} <= set(request):
        raise ValueError('a request is {"input": PATH, "output": PATH}')
    images = read_images(Path(request["input"]))
    outputs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for target, expert in experts.items():
            for index, array in enumerate(expert.predict(images) if images else []):
                outputs[f"{target}_{index}"] = array
    output = Path(request["output"])
    partial = output.with_name(output.name + ".partial.npz")
    np.savez(partial, **outputs)
    os.replace(partial, output)  # the client never sees a half-written file


def serve(experts: dict[str, Any], replies: TextIO) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer(json.loads(line), experts)
            reply: dict[str, Any] = {"ok": True}
        except Exception as error:  # a bad request must not end the server
            log(f"request failed: {line.strip()}\n{traceback.format_exc()}")
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv: list[str]) -> int:
    # The protocol gets a private copy of stdout; anything a library prints goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk, never the hub
    try:
        if len(argv) != 2:
            raise ValueError("usage: server.py '<experts JSON>'")
        config = json.loads(argv[1])
        device = resolve_device(config.get("device", "auto"))
        experts = build_experts(config, device)
    except Exception as error:
        log(f"start-up failed\n{traceback.format_exc()}")
        replies.write(json.dumps({"ready": False, "error": f"{type(error).__name__}: {error}"}))
        replies.write("\n")
        replies.flush()
        return 1
    replies.write(
        json.dumps({"ready": True, "targets": list(experts), "device": str(device)}) + "\n"
    )
    replies.flush()
    log(f"ready on {device}: {', '.join(experts)}")
    serve(experts, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
