"""Surface normals: NLL-AngMF (Bae, Budvytis, Cipolla, "Estimating and Exploiting the Aleatoric
Uncertainty in Surface Normal Estimation", ICCV 2021), written from the paper and the facts of
its released model so that the authors' checkpoints (``scannet.pt``: ``norm="BN"``, ``nyu.pt``:
``norm="GN"``) load strictly. Torch environment only.

The network (module and parameter names follow the release):

* ``encoder.original_model``: an EfficientNet (``tf_efficientnet_b5_ap`` in the release, built
  here by timm with ``pretrained=False`` and no classifier; timm's parameter names are those of
  the release's gen-efficientnet). Skip features: the output of the last block of each stride
  (timm's ``feature_info``: blocks 0, 1, 2, 4 at strides 2, 4, 8, 16) and ``conv_head``'s output
  (stride 32, before its BatchNorm).
* ``decoder``: ``conv2`` (1x1, C -> C, C = the encoder's head width, 2048 for B5), four
  ``up{1..4}`` blocks (bilinear upsampling with aligned corners to the skip's size, concatenation,
  two 3x3 convolutions each followed by BatchNorm, or GroupNorm(8) over weight-standardised
  convolutions, and LeakyReLU) to C/2, C/4, C/8, C/16 channels; ``out_conv_res8`` (3x3 on the
  stride-8 features -> 4 channels), then per-pixel MLPs ``out_conv_res4/res2/res1`` (1x1 Conv1d
  layers: in -> 128 -> 128 -> 128 -> 4, ReLU between) that refine the 2x-upsampled previous
  prediction concatenated with the 2x-upsampled decoder features of that resolution.
* Each 4-channel output: the first three L2-normalised (the normal), the fourth
  ``kappa = elu(k) + 1.01`` (the angular-vonMF concentration; larger = more certain).

Inference follows the release's test path: the MLPs run on *every* pixel (the uncertainty-guided
sampling of a subset of pixels is a training-time device only), and the full-resolution output
is the prediction. The release feeds 480 x 640 images normalised with ImageNet's mean and std
(``input_size``); the output is resized back to each image with bilinear interpolation (aligned
corners, as the release's evaluation does) and converted to our frame (``conventions.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from common import batched, existing_path, expert_fields, image_tensor
from conventions import camera_normals
from torch import nn

DEFAULTS = {
    "encoder": "tf_efficientnet_b5_ap",
    "norm": "BN",
    "decoder_width": None,  # None: the encoder's head width (2048 for B5, as released)
    "input_size": [480, 640],
    "min_kappa": 0.0,
    "batch_size": 4,
}
MIN_KAPPA_OFFSET = 0.01  # kappa = elu(k) + 1 + 0.01, as released
MLP_WIDTH = 128
SKIP_STRIDES = (2, 4, 8, 16)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (zero mean, unit std + 1e-5) before
    use: the release's GroupNorm decoder (``nyu.pt``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        std = weight.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return F.conv2d(x, weight / std, self.bias, self.stride, self.padding)


class UpSample(nn.Module):
    """Upsample to the skip's size, concatenate, two conv-norm-LeakyReLU layers (``_net``)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        conv = nn.Conv2d if norm == "BN" else WeightStandardizedConv2d

        def normalization() -> nn.Module:
            return nn.BatchNorm2d(out_channels) if norm == "BN" else nn.GroupNorm(8, out_channels)

        self._net = nn.Sequential(
            conv(in_channels, out_channels, kernel_size=3, padding=1),
            normalization(),
            nn.LeakyReLU(),
            conv(out_channels, out_channels, kernel_size=3, padding=1),
            normalization(),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([up, skip], dim=1))


def pixel_mlp(in_channels: int) -> nn.Sequential:
    """The per-pixel refinement MLP as 1x1 Conv1d layers (the release's parameter shapes)."""
    return nn.Sequential(
        nn.Conv1d(in_channels, MLP_WIDTH, kernel_size=1),
        nn.ReLU(),
        nn.Conv1d(MLP_WIDTH, MLP_WIDTH, kernel_size=1),
        nn.ReLU(),
        nn.Conv1d(MLP_WIDTH, MLP_WIDTH, kernel_size=1),
        nn.ReLU(),
        nn.Conv1d(MLP_WIDTH, 4, kernel_size=1),
    )


def normalize_output(raw: torch.Tensor) -> torch.Tensor:
    """(B, 4, ...) raw outputs -> unit normal (channels 0-2) and kappa = elu + 1.01 (channel 3)."""
    normal, kappa = raw[:, :3], raw[:, 3:]
    normal = normal / (torch.linalg.vector_norm(normal, dim=1, keepdim=True) + 1e-10)
    return torch.cat([normal, F.elu(kappa) + 1.0 + MIN_KAPPA_OFFSET], dim=1)


class Encoder(nn.Module):
    """A timm EfficientNet (random weights) tapped at the release's skip points."""

    def __init__(self, name: str):
        super().__init__()
        self.original_model = timm.create_model(name, pretrained=False, num_classes=0)
        stages = {info["reduction"]: info for info in self.original_model.feature_info}
        missing = [s for s in SKIP_STRIDES if s not in stages]
        if missing or not hasattr(self.original_model, "conv_head"):
            raise ValueError(f"encoder {name!r} is not an EfficientNet with strides 2..32")
        # The block index whose output is each stride's skip feature ("blocks.4" -> 4).
        self.skip_blocks = tuple(int(stages[s]["module"].split(".")[1]) for s in SKIP_STRIDES)
        self.skip_channels = tuple(stages[s]["num_chs"] for s in SKIP_STRIDES)
        self.head_channels = self.original_model.conv_head.out_channels

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        model = self.original_model
        x = model.bn1(model.conv_stem(x))  # timm's bn1 includes the release's act1
        skips = []
        for index, block in enumerate(model.blocks):
            x = block(x)
            if index in self.skip_blocks:
                skips.append(x)
        return skips, model.conv_head(x)


class Decoder(nn.Module):
    def __init__(
        self, skip_channels: Sequence[int], head_channels: int, width: int | None, norm: str
    ):
        super().__init__()
        if norm not in ("BN", "GN"):
            raise ValueError(f"norm must be 'BN' or 'GN', got {norm!r}")
        c = width or head_channels
        if c % 16 or (norm == "GN" and (c // 16) % 8):
            raise ValueError(f"decoder width {c} must be a multiple of 16 (of 128 with GN)")
        s2, s4, s8, s16 = skip_channels
        self.conv2 = nn.Conv2d(head_channels, c, kernel_size=1)
        self.up1 = UpSample(c + s16, c // 2, norm)
        self.up2 = UpSample(c // 2 + s8, c // 4, norm)
        self.up3 = UpSample(c // 4 + s4, c // 8, norm)
        self.up4 = UpSample(c // 8 + s2, c // 16, norm)
        self.out_conv_res8 = nn.Conv2d(c // 4, 4, kernel_size=3, padding=1)
        self.out_conv_res4 = pixel_mlp(c // 4 + 4)
        self.out_conv_res2 = pixel_mlp(c // 8 + 4)
        self.out_conv_res1 = pixel_mlp(c // 16 + 4)

    def forward(self, skips: Sequence[torch.Tensor], head: torch.Tensor) -> torch.Tensor:
        """The full-resolution (input size) output (B, 4, H, W) of the release's test path."""
        s2, s4, s8, s16 = skips
        d1 = self.up1(self.conv2(head), s16)
        d2 = self.up2(d1, s8)
        d3 = self.up3(d2, s4)
        d4 = self.up4(d3, s2)
        out = normalize_output(self.out_conv_res8(d2))  # stride 8
        refinements = ((d2, self.out_conv_res4), (d3, self.out_conv_res2), (d4, self.out_conv_res1))
        for features, mlp in refinements:
            up = torch.cat([_double(features), _double(out)], dim=1)
            b, c, h, w = up.shape
            out = normalize_output(mlp(up.reshape(b, c, h * w))).reshape(b, 4, h, w)
        return out


def _double(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class NNET(nn.Module):
    """The release's top module: ``encoder`` + ``decoder`` (state-dict keys start with these)."""

    def __init__(self, encoder: str, norm: str = "BN", decoder_width: int | None = None):
        super().__init__()
        self.encoder = Encoder(encoder)
        self.decoder = Decoder(
            self.encoder.skip_channels, self.encoder.head_channels, decoder_width, norm
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, H, W), H and W multiples of 32 -> (B, 4, H, W)."""
        return self.decoder(*self.encoder(images))


def checkpoint_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The release's ``{"model": state_dict}`` (keys possibly ``module.``-prefixed from
    DataParallel training) or a plain state dict -> a plain state dict."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError("expected a state dict or a {'model': state_dict} checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


class NormalsExpert:
    target = "normals"

    def __init__(self, config: dict[str, Any], device: torch.device):
        fields = expert_fields(config, self.target, DEFAULTS)
        path = existing_path(fields["weights"], self.target)
        height, width = (int(v) for v in fields["input_size"])
        if height % 32 or width % 32:
            raise ValueError(f"normals: input_size {fields['input_size']} must be multiples of 32")
        self.input_size = (height, width)
        self.min_kappa = float(fields["min_kappa"])
        self.batch_size = int(fields["batch_size"])
        self.device = device
        model = NNET(fields["encoder"], fields["norm"], fields["decoder_width"])
        state = checkpoint_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.load_state_dict(state, strict=True)
        self.model = model.to(device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return batched(self._predict_batch, images, self.batch_size)

    def _predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        inputs = torch.stack(
            [
                F.interpolate(
                    image_tensor(image, self.device)[None],
                    size=self.input_size,
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[0]
                for image in images
            ]
        )
        outputs = self.model((inputs - self.mean) / self.std)
        results = []
        for image, output in zip(images, outputs):
            resized = F.interpolate(
                output[None], size=image.shape[:2], mode="bilinear", align_corners=True
            )[0]
            array = resized.permute(1, 2, 0).float().cpu().numpy()
            results.append(camera_normals(array[..., :3], array[..., 3], self.min_kappa))
        return results
