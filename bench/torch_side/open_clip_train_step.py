"""Runs in the PyTorch environment: times open_clip's ViT-B-16 CLIP train step (float32, CPU).

Same work as bench/train_step.py's JAX step: forward of both towers, the CLIP loss, backward,
AdamW (betas 0.9/0.95, weight decay 0.2), and an EMA update; timed as that step is (one warm-up
step, then the median of ``--steps`` steps: bench/timing.py). Prints one JSON line.
"""

import argparse
import json
import sys
from pathlib import Path

import open_clip
import torch

# bench/timing.py imports only the standard library: usable here, where JAX is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import timing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16")
    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.2)
    ema = [p.detach().clone() for p in model.parameters()]
    images = torch.randn(args.batch, 3, 224, 224)
    tokens = torch.randint(1, 49_000, (args.batch, 77))
    tokens[:, 0], tokens[:, -1] = 49_406, 49_407

    def step() -> None:
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for average, parameter in zip(ema, model.parameters()):
                average.lerp_(parameter, 1 - 0.9995)

    seconds = timing.time_repeated(step, args.steps, wait=timing.no_wait).median
    print(json.dumps({"seconds_per_step": seconds, "examples_per_second": args.batch / seconds}))


if __name__ == "__main__":
    main()
