"""Entry point: ``python -m pretrain.main --config=configs/<recipe>.py[:arg] --workdir=DIR``.

Fields of the config can be overridden with ``--config.<field>=<value>``; an unknown field fails at
start-up with its name. Running again with the same workdir resumes from its last checkpoint.
With the same config and workdir:
  --mode=evaluate [--step=best] [--ema]     evaluate a saved checkpoint
  --mode=export [--export_dir=DIR]          write it in the task's PyTorch form (open_clip, timm)
  --mode=compile                            compile one sharded step, no data: does it fit?
    [--config.compile.topology=v5e:16x16]   ... on a TPU slice, from this machine (libtpu)
"""

from __future__ import annotations

import logging as pylogging
import os

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/clip_vitb16.py:runlocal.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and TensorBoard logs."
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "export", "compile"],
    "train (resumes when the workdir has checkpoints); evaluate or export a saved checkpoint; "
    "compile: build, shard and compile one train step without data or weights (checks a recipe "
    "fits its devices, or --config.compile.topology's TPU slice).",
)
_STEP = flags.DEFINE_string("step", "latest", "evaluate/export: 'latest', 'best' or a step.")
_EMA = flags.DEFINE_bool("ema", False, "evaluate/export: use the EMA parameters.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "export: output directory (default WORKDIR/export/<--step value>)."
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Keep the terminal readable: libraries' INFO lines (orbax logs dozens per save) are hidden."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "site-packages" not in record.pathname and "dist-packages" not in record.pathname:
            return True
        # Orbax warns on every save without metrics when a best checkpoint is tracked; only
        # evaluated steps carry metrics, by design.
        return record.levelno >= pylogging.WARNING and "tracked_metric" not in record.getMessage()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Imported here so that --help is fast and the distributed runtime starts before JAX does.
    from pretrain import distributed, modes, trainer

    config = _CONFIG.value
    distributed.maybe_initialize_distributed(config)
    workdir = resolve_workdir(_WORKDIR.value)
    if _MODE.value == "compile":
        modes.compile_train_step(config)
    elif _MODE.value == "evaluate":
        modes.evaluate_checkpoint(config, workdir, _STEP.value, _EMA.value)
    elif _MODE.value == "export":
        directory = _EXPORT_DIR.value or os.path.join(workdir, "export", _STEP.value)
        modes.export_checkpoint(config, workdir, directory, _STEP.value, _EMA.value)
    else:
        logging.info("config:\n%s", config)
        trainer.train_and_evaluate(config, workdir)


def resolve_workdir(workdir: str) -> str:
    """An absolute local path, or a URL (gs://...) as given; created if missing."""
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    return workdir


if __name__ == "__main__":
    app.run(main)
