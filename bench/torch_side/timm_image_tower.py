"""Runs in the PyTorch environment: times the forward pass of one timm image tower (CPU).

    python bench/torch_side/timm_image_tower.py --model fastvit_mci0 --image-size 256 \
        [--reparameterize] [--batch 8] [--rounds 5]

Random weights, ``num_classes`` = the CLIP embedding width (timm's ``head.fc``, which open_clip's
MobileCLIP configs use as the projection), eval mode, ``torch.inference_mode``, float32. With
``--reparameterize`` the model is first converted by ``timm.utils.reparameterize_model`` (the
inference form of FastViT / MobileOne blocks). One warm-up call, then the median of ``--rounds``
timed calls. Prints one JSON line.
"""

import argparse
import json
import statistics
import time

import timm
import torch
from timm.utils import reparameterize_model


def build_model(name: str, output_dim: int, reparameterize: bool) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=output_dim)
    model.eval()
    if reparameterize:
        model = reparameterize_model(model)
    return model


def median_seconds(model: torch.nn.Module, images: torch.Tensor, rounds: int) -> float:
    with torch.inference_mode():
        model(images)  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--output-dim", type=int, default=512)
    parser.add_argument("--reparameterize", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, args.output_dim, args.reparameterize)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    seconds = median_seconds(model, images, args.rounds)
    print(
        json.dumps(
            {
                "seconds_per_call": seconds,
                "images_per_second": args.batch / seconds,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
