"""PyTorch pseudo-label experts, seen from the JAX side: a long-running server in the separate
torch environment (``pretrain/pseudo_labels/torch_experts/server.py``), driven through files in a
private temporary directory and JSON lines on its stdin / stdout. NumPy and the standard library
only (the two environments' CUDA builds conflict, so they never share a process).

Usage (``TorchExperts`` is an ``Expert``: ``targets`` + ``predict``)::

    with TorchExperts(config) as experts:
        labels = experts.predict([image_uint8_hw3, ...])  # one dict per image

Each dict maps every target in ``experts.targets`` to an array at its image's size, in the
conventions of ``pretrain/data/dense``: ``segmentation`` int32 (H, W) class ids, ``depth``
float32 (H, W) > 0 valid / 0 invalid, ``normals`` float32 (H, W, 3) unit vectors in the camera
frame (x right, y up, z towards the viewer) / zero invalid.

The config (a mapping, one entry per target, each optional; nothing is ever downloaded)::

    {
      "segmentation": {              # torchvision Mask R-CNN (COCO) -> semantic classes
        "kind": "mask_rcnn",
        "weights": PATH,             # state-dict file, e.g. maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
        "model": "maskrcnn_resnet50_fpn",  # or "maskrcnn_resnet50_fpn_v2" (its COCO weights)
        "score_threshold": 0.5,      # instances scoring less are dropped
        "mask_threshold": 0.5,       # an instance covers pixels with mask probability >= this
        "overlap": "score",          # where instances overlap: "score" (higher score wins) or
                                     # "smaller" (the smaller instance is on top)
        "min_size": 800, "max_size": 1333,  # Mask R-CNN's own resizing (torchvision defaults)
        "max_instances": 100,        # detections per image (torchvision's default)
        "batch_size": 4,
      },
      "depth": {                     # transformers DPTForDepthEstimation (MiDaS-trained)
        "kind": "dpt",
        "weights": DIR,              # a local copy of Intel/dpt-hybrid-midas or Intel/dpt-large
        "min_inverse_fraction": 0.01,  # inverse depth <= this x its median -> invalid (sky)
        "batch_size": 8,
      },
      "normals": {                   # NLL-AngMF (Bae et al. 2021)
        "kind": "nll_angmf",
        "weights": PATH,             # the authors' scannet.pt (norm "BN") or nyu.pt (norm "GN")
        "encoder": "tf_efficientnet_b5_ap",  # timm EfficientNet name (random init, then weights)
        "norm": "BN",
        "decoder_width": None,       # None = the encoder's head width (the released architecture)
        "input_size": [480, 640],    # (H, W) the network sees, multiples of 32
        "min_kappa": 0.0,            # pixels with concentration kappa below this -> invalid
        "batch_size": 4,
      },
      "device": "auto",              # CUDA when the torch environment sees a GPU, else CPU
    }

Classes: 0 = background, 1..80 = COCO's thing categories in category-id order
(:func:`segmentation_class_names`). Depth is *relative*: the image's median valid depth is 1
(MiDaS-style experts know no metric scale).
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TARGET_ORDER = ("segmentation", "depth", "normals")
SERVER = Path(__file__).resolve().parent / "torch_experts" / "server.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Loading big checkpoints (and importing torch) on a busy machine can take minutes; one request
# is a batch of images through every expert on the CPU at worst.
START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 3600.0
STDERR_TAIL_CHARS = 4000


def torch_interpreter(python: str | None = None) -> Path:
    """The torch environment's interpreter: ``python``, else ``$TORCH_PYTHON``, else
    ``<repo>/.venv-torch/bin/python``; a clear error when it is not there."""
    default = REPO_ROOT / ".venv-torch" / "bin" / "python"
    path = Path(python or os.environ.get("TORCH_PYTHON") or default)
    if not path.is_file():
        raise FileNotFoundError(
            f"torch environment interpreter not found: {path}. Build it with "
            "`bash launch/setup.sh --torch` (it makes .venv-torch), or point TORCH_PYTHON at one."
        )
    return path


def configured_targets(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The targets ``config`` asks for, in ("segmentation", "depth", "normals") order."""
    unknown = sorted(set(config) - set(TARGET_ORDER) - {"device"})
    if unknown:
        raise ValueError(f"unknown experts config entries {unknown}; known: {TARGET_ORDER}")
    targets = tuple(t for t in TARGET_ORDER if t in config)
    if not targets:
        raise ValueError(f"no expert configured; give one or more of {TARGET_ORDER}")
    return targets


def segmentation_class_names() -> tuple[str, ...]:
    """The Mask R-CNN expert's class names by class id: "background", then COCO's 80 thing
    categories (read from the torch side's NumPy-only ``instances.py``, the one source)."""
    spec = importlib.util.spec_from_file_location(
        "torch_experts_instances", SERVER.parent / "instances.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ("background", *module.COCO_THING_NAMES)


def _server_env() -> dict[str, str]:
    # The JAX process's settings (fake devices, PYTHONPATH) mean nothing to torch and could
    # shadow the torch environment's packages.
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "XLA_FLAGS", "JAX_PLATFORMS"):
        env.pop(name, None)
    return env


class TorchExperts:
    """The torch experts of ``experts_config`` behind one server process (a context manager)."""

    def __init__(self, experts_config: Mapping, python: str | None = None):
        self.config = json.loads(json.dumps(dict(experts_config)))  # plain JSON values
        self.targets: tuple[str, ...] = configured_targets(self.config)
        self.python = torch_interpreter(python)
        self._process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._buffer = b""
        self._requests = 0

    def __enter__(self) -> TorchExperts:
        if self._process is not None:
            raise RuntimeError("TorchExperts is already running (enter it once)")
        self._workdir = tempfile.TemporaryDirectory(prefix="torch_experts_")
        stderr = open(self._stderr_path, "wb")  # a file: a full pipe would block the server
        try:
            self._process = subprocess.Popen(
                [str(self.python), str(SERVER), json.dumps(self.config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=_server_env(),  # and this process's working directory: relative weights
            )
        finally:
            stderr.close()
        try:
            ready = self._reply(START_TIMEOUT_S, "starting")
            if not ready.get("ready"):
                raise RuntimeError(self._failure(f"could not start: {ready.get('error')}"))
            if tuple(ready.get("targets", ())) != self.targets:
                served = ready.get("targets")
                raise RuntimeError(self._failure(f"serves {served}, not {self.targets}"))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One dict per image: target -> array at the image's size (see the module docstring)."""
        if self._process is None or self._workdir is None:
            raise RuntimeError("TorchExperts.predict outside its `with` block")
        images = [_checked_image(i, image) for i, image in enumerate(images)]
        if not images:
            return []
        self._requests += 1
        folder = Path(self._workdir.name)
        request = {
            "input": str(folder / f"in_{self._requests}.npz"),
            "output": str(folder / f"out_{self._requests}.npz"),
        }
        np.savez(request["input"], **{f"image_{i}": image for i, image in enumerate(images)})
        try:
            self._send(request)
            reply = self._reply(REQUEST_TIMEOUT_S, "answering")
            if not reply.get("ok"):
                error = reply.get("error")
                raise RuntimeError(f"torch experts could not label the images: {error}")
            with np.load(request["output"], allow_pickle=False) as members:
                outputs = {name: members[name] for name in members.files}
        finally:
            for path in request.values():
                Path(path).unlink(missing_ok=True)
        return [self._labels(outputs, i, image.shape[:2]) for i, image in enumerate(images)]

    def close(self) -> None:
        """Stop the server (end of stdin, then a kill if it lingers) and remove the temp files."""
        process, self._process = self._process, None
        if process is not None:
            try:
                if process.stdin:
                    process.stdin.close()
                process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def _labels(
        self, outputs: Mapping[str, np.ndarray], index: int, size: tuple[int, int]
    ) -> dict[str, np.ndarray]:
        labels = {}
        for target in self.targets:
            array = outputs.get(f"{target}_{index}")
            if array is None or array.shape[:2] != size:
                shape = None if array is None else array.shape
                raise RuntimeError(f"torch experts: {target}_{index} is {shape}, image is {size}")
            labels[target] = array
        return labels

    @property
    def _stderr_path(self) -> Path:
        assert self._workdir is not None
        return Path(self._workdir.name) / "server.stderr"

    def _send(self, request: Mapping[str, str]) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write((json.dumps(request) + "\n").encode())
            self._process.stdin.flush()
        except BrokenPipeError as error:
            raise RuntimeError(self._failure("exited")) from error

    def _reply(self, timeout: float, doing: str) -> dict[str, Any]:
        """The server's next JSON line; a crash or a silence of ``timeout`` seconds is an error
        that carries the tail of the server's stderr."""
        assert self._process is not None and self._process.stdout is not None
        stream = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                silence = f"gave no answer within {timeout:.0f} s ({doing})"
                raise RuntimeError(self._failure(silence))
            readable, _, _ = select.select([stream], [], [], min(remaining, 1.0))
            if readable:
                chunk = os.read(stream, 65536)
                if not chunk:
                    self._process.wait(timeout=30)
                    code = self._process.returncode
                    raise RuntimeError(self._failure(f"exited with status {code} while {doing}"))
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _failure(self, what: str) -> str:
        try:
            tail = self._stderr_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
        except (OSError, AssertionError):
            tail = "(no stderr)"
        return f"torch experts server ({self.python}) {what}\n--- server stderr (tail) ---\n{tail}"


def _checked_image(index: int, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        got = f"{image.dtype} {image.shape}"
        raise ValueError(f"image {index}: need uint8 (H, W, 3) RGB, got {got}")
    return image
