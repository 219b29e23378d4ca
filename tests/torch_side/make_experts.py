"""Torch-side half of the pseudo-label expert tests (runs in .venv-torch, never imports JAX):
random expert weights on disk, the libraries' own outputs for them, and NLL-AngMF's layout
against its release.

Usage: ``make_experts.py COMMAND DIR [COMMAND DIR ...]`` (one process for all: torch imports
once).

``weights OUT_DIR``
    Reads ``OUT_DIR/inputs.npz`` (``image_0..``: uint8 (H, W, 3)) and ``OUT_DIR/spec.json``
    (``{"mask_rcnn": {"min_size", "max_size", "max_instances", "score_threshold"}}``); writes
    random weights:
    ``mask_rcnn.pth`` (torchvision ``maskrcnn_resnet50_fpn`` state dict, 91 classes), ``dpt/``
    (a tiny ``DPTConfig`` with ``save_pretrained``, without the weights Intel's checkpoints lack,
    and a ``DPTImageProcessor`` config) and
    ``nll_angmf.pt`` (NLL-AngMF on ``tf_efficientnet_b0``, decoder width 64, saved as the release
    saves: ``{"model": {"module." + key: value}}``). Then the libraries' own outputs on the images,
    as references for the server's: Mask R-CNN's raw detections (``mask_rcnn_{masks,labels,
    scores}_i``) and DPT's inverse depth through transformers' processor, model and
    ``post_process_depth_estimation`` (``dpt_inverse_i``), in ``torch_outputs.npz``.

``inspect OUT_DIR``
    Writes ``report.json``: NLL-AngMF with ``tf_efficientnet_b5_ap`` (the release) built on the
    meta device for ``norm`` BN and GN: decoder keys and shapes, parameter counts, the encoder's
    keys and shapes against gen-efficientnet's (``geffnet``, the package the release's encoder
    came from; classifier dropped as the release drops it); and the encoder's skip features
    against the release's rule (outputs 4, 5, 6, 8, 11 of gen-efficientnet's top-level modules
    with blocks unrolled) for ``tf_efficientnet_b0`` with shared random weights; a tiny GN model's
    output (unit normals, kappa > 0.01); torchvision's 91 COCO category names; the error of the
    DPT loader on a copy of ``dpt/`` without a reachable weight (run after ``weights``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import geffnet
import numpy as np
import torch
from parity_files import read_inputs, write_results
from safetensors.torch import load_file, save_file
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

# One thread: the tests run beside other processes on 2 cores, where torch's thread pool spins.
torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "pretrain" / "pseudo_labels" / "torch_experts"))
from dpt import UNREACHABLE_PREFIX, load_dpt  # noqa: E402 - after the path above
from nll_angmf import NNET, Encoder  # noqa: E402

TEST_ENCODER = "tf_efficientnet_b0"
TEST_DECODER_WIDTH = 64
RELEASE_ENCODER = "tf_efficientnet_b5_ap"


def _images(out_dir: Path) -> list[np.ndarray]:
    inputs = read_inputs(out_dir)
    return [inputs[f"image_{i}"] for i in range(len(inputs))]


def _randomize_batchnorm_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine terms (init leaves them at 0 / 1)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))


def mask_rcnn(out_dir: Path, images: list[np.ndarray], spec: dict) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), out_dir / "mask_rcnn.pth")
    # The reference detections: torchvision's model with the sizes and score floor the expert
    # sets, fed [0, 1] float images as torchvision documents.
    model.transform.min_size = (spec["min_size"],)
    model.transform.max_size = spec["max_size"]
    model.roi_heads.score_thresh = min(0.05, spec["score_threshold"])
    model.roi_heads.detections_per_img = spec["max_instances"]
    model.eval()
    outputs = {}
    with torch.inference_mode():
        # One batch, as the expert runs them (torchvision pads a batch to its largest image).
        batch = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images]
        for i, found in enumerate(model(batch)):
            outputs[f"mask_rcnn_masks_{i}"] = found["masks"][:, 0].numpy()
            outputs[f"mask_rcnn_labels_{i}"] = found["labels"].numpy()
            outputs[f"mask_rcnn_scores_{i}"] = found["scores"].numpy()
    return outputs


def dpt(out_dir: Path, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    model = DPTForDepthEstimation(config).eval()
    processor = DPTImageProcessor(
        size={"height": 64, "width": 64},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    model.save_pretrained(out_dir / "dpt")
    processor.save_pretrained(out_dir / "dpt")
    # Intel's DPT checkpoints lack the unreachable first-fusion residual weights: so does this.
    _drop_weights(out_dir / "dpt", UNREACHABLE_PREFIX)
    outputs = {}
    with torch.inference_mode():
        for i, image in enumerate(images):
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
            result = model(pixel_values=pixels)
            (post,) = processor.post_process_depth_estimation(result, [image.shape[:2]])
            outputs[f"dpt_inverse_{i}"] = post["predicted_depth"].numpy()
            outputs[f"dpt_processed_shape_{i}"] = np.array(pixels.shape[2:])
    return outputs


def _drop_weights(directory: Path, prefix: str) -> None:
    path = directory / "model.safetensors"
    state = {k: v for k, v in load_file(path).items() if not k.startswith(prefix)}
    save_file(state, path, metadata={"format": "pt"})


def dpt_strictness(out_dir: Path) -> str:
    """The error ``load_dpt`` gives for a copy of the test DPT that lacks a reachable weight."""
    broken = out_dir / "dpt_broken"
    shutil.copytree(out_dir / "dpt", broken)
    _drop_weights(broken, "head.head.0.")
    try:
        load_dpt(str(broken))
    except ValueError as error:
        return str(error)
    return "loaded"


def nll_angmf(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = NNET(TEST_ENCODER, "BN", TEST_DECODER_WIDTH)
    _randomize_batchnorm_(model, seed=1)
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"model": state}, out_dir / "nll_angmf.pt")


def weights(out_dir: Path) -> None:
    images = _images(out_dir)
    spec = json.loads((out_dir / "spec.json").read_text())
    outputs = mask_rcnn(out_dir, images, spec["mask_rcnn"])
    outputs |= dpt(out_dir, images)
    nll_angmf(out_dir)
    write_results(out_dir, outputs)


def _shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_skip_parity() -> float:
    """Max |difference| between our encoder's skips + head and the release's features 4, 5, 6,
    8, 11 (gen-efficientnet's top-level modules applied in order, blocks unrolled)."""
    torch.manual_seed(0)
    reference = geffnet.create_model(TEST_ENCODER, pretrained=False)
    _randomize_batchnorm_(reference, seed=2)
    reference.global_pool = torch.nn.Identity()
    reference.classifier = torch.nn.Identity()
    reference.eval()
    ours = Encoder(TEST_ENCODER).eval()
    ours.original_model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        features = [x]
        for name, module in reference._modules.items():
            for step in module if name == "blocks" else [module]:
                features.append(step(features[-1]))
        expected = [features[i] for i in (4, 5, 6, 8, 11)]
        skips, head = ours(x)
    return max(float((a - b).abs().max()) for a, b in zip([*skips, head], expected))


def inspect(out_dir: Path) -> None:
    report: dict = {}
    with torch.device("meta"):
        release = geffnet.create_model(RELEASE_ENCODER, pretrained=False)
        for norm in ("BN", "GN"):
            model = NNET(RELEASE_ENCODER, norm)
            report[norm] = {
                "decoder_shapes": _shapes(model.decoder),
                "decoder_parameters": _count(model.decoder),
                "encoder_parameters": _count(model.encoder),
            }
        report["encoder_shapes"] = _shapes(model.encoder.original_model)
    report["geffnet_shapes"] = {
        k: v for k, v in _shapes(release).items() if not k.startswith("classifier.")
    }
    report["skip_parity_max_abs"] = encoder_skip_parity()
    report["dpt_broken_error"] = dpt_strictness(out_dir)
    report["coco_categories"] = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    torch.manual_seed(0)
    tiny = NNET(TEST_ENCODER, "GN", 128).eval()
    with torch.inference_mode():
        output = tiny(torch.randn(1, 3, 64, 64))
    report["gn_output_shape"] = list(output.shape)
    report["gn_normal_length_error"] = float((output[:, :3].norm(dim=1) - 1).abs().max())
    report["gn_min_kappa"] = float(output[:, 3].min())
    (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    # COMMAND DIR [COMMAND DIR ...]: several commands share one process (torch imports once).
    commands = {"weights": weights, "inspect": inspect}
    for command, directory in zip(sys.argv[1::2], sys.argv[2::2]):
        commands[command](Path(directory))
