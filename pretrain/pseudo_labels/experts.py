"""Experts that predict dense pseudo-labels: the protocol, this project's dense runs as experts,
and the experts a config names.

``config.pseudo_label.experts`` maps each target to the expert that labels it:

* ``{"kind": "workdir", "workdir": DIR, "step": "best", "use_ema": None, "config": ""}``: a dense
  probe or fine-tune run of this project (``configs/dense_probe.py``) for its target. Its head
  predicts at the run's evaluation size (images are resized there bilinearly, as its evaluation
  did) and the prediction is resized back to the image (nearest). A depth run must predict depth
  (``dense.loss=l1``): an ``ssi`` run's disparity is known only up to scale and shift;
* ``{"kind": "mask_rcnn" | "dpt" | "nll_angmf", ...}``: PyTorch experts, all served by one
  process in the torch environment (pretrain/pseudo_labels/torch_client.py, which documents
  their fields).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from pretrain import sharding
from pretrain.batched import apply_in_batches
from pretrain.components.runs import run_config
from pretrain.data import pixel_maps
from pretrain.data.dense.resize import resize_bilinear
from pretrain.data.dense.targets import TARGETS
from pretrain.modes import restore_trained
from pretrain.state import weights

JAX_KIND = "workdir"
TORCH_KINDS = ("mask_rcnn", "dpt", "nll_angmf")


class Expert(Protocol):
    """What the pseudo-label tool needs of an expert (see the package docstring)."""

    targets: tuple[str, ...]

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]: ...


class DenseRunExpert:
    """A dense probe / fine-tune run of this project as the expert of its target."""

    def __init__(
        self,
        workdir: str,
        *,
        step: str = "best",
        use_ema: bool | None = None,
        recipe: str = "",
        batch_size: int = 32,
    ):
        task, state = restore_trained(run_config(workdir, recipe), workdir, str(step))
        target = getattr(task, "target", None)
        if target is None or not hasattr(task, "outputs"):
            raise ValueError(f"the run in {workdir} is not a dense run (configs/dense_probe.py)")
        if target.name == "depth" and target.loss != "l1":
            raise ValueError(
                f"the depth run in {workdir} was trained with the {target.loss!r} loss, whose "
                "prediction is a disparity up to scale and shift: an expert must predict depth "
                "(dense.loss=l1)"
            )
        if use_ema is None:
            use_ema = "ema_params" in state
        params, model_state = sharding.gather_to_host(weights(state, use_ema), task.mesh)
        frozen = sharding.gather_to_host(state.get("frozen"), task.mesh)
        self.targets = (target.name,)
        self.size = tuple(int(v) for v in task.config.data.eval_size)
        self.batch_size = int(batch_size)
        self._variables = {"params": params, "frozen": frozen, "model_state": model_state}

        def predict(variables: Any, images: jax.Array) -> jax.Array:
            outputs, _ = task.outputs(
                variables["params"],
                images,
                self.size,
                frozen=variables["frozen"],
                model_state=variables["model_state"],
            )
            return target.predict(outputs)

        self._predict = jax.jit(predict)

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if not images:
            return []
        resized = np.stack([resize_bilinear(Image.fromarray(i), self.size) for i in images])
        predictions = apply_in_batches(
            lambda batch: self._predict(self._variables, batch), resized, self.batch_size
        )
        (name,) = self.targets
        return [
            {name: pixel_maps.resize_nearest(prediction, image.shape[:2])}
            for prediction, image in zip(predictions, images)
        ]


@contextlib.contextmanager
def open_experts(
    experts_config: Mapping[str, Any], *, torch_python: str = "", batch_size: int = 32
):
    """The experts of ``config.pseudo_label.experts`` (see the module docstring), one per target
    and each target once; the torch experts' server is stopped on exit."""
    unknown = [name for name in experts_config if name not in TARGETS]
    if unknown or not experts_config:
        raise ValueError(
            f"config.pseudo_label.experts must map targets {TARGETS} to experts, got "
            f"{sorted(experts_config)}"
        )
    experts: list[Any] = []
    torch_specs = {}
    for target in TARGETS:
        spec = experts_config.get(target)
        if not spec:
            continue
        spec = dict(spec.to_dict() if isinstance(spec, ConfigDict) else spec)
        kind = spec.get("kind")
        if kind == JAX_KIND:
            expert = DenseRunExpert(
                spec["workdir"],
                step=str(spec.get("step", "best")),
                use_ema=spec.get("use_ema"),
                recipe=spec.get("config", ""),
                batch_size=batch_size,
            )
            if expert.targets != (target,):
                raise ValueError(
                    f"config.pseudo_label.experts.{target}: the run in {spec['workdir']} "
                    f"predicts {expert.targets[0]}, not {target}"
                )
            experts.append(expert)
        elif kind in TORCH_KINDS:
            torch_specs[target] = spec
        else:
            raise ValueError(
                f"config.pseudo_label.experts.{target}.kind={kind!r}; choose from "
                f"{(JAX_KIND, *TORCH_KINDS)}"
            )
    with contextlib.ExitStack() as stack:
        if torch_specs:
            from pretrain.pseudo_labels.torch_client import TorchExperts

            experts.append(stack.enter_context(TorchExperts(torch_specs, torch_python or None)))
        yield experts
