"""The command line of the open_clip export, ``python -m pretrain.export.open_clip``: ``check``
that an export directory's weights match its config (no torch needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pretrain.export.open_clip.files import (
    CONFIG_FILE_NAME,
    LOADING_INSTRUCTIONS,
    find_open_clip_weights,
    load_open_clip_weights,
    read_model_config,
)
from pretrain.export.open_clip.state_dict import check_state_dict_matches_config


def check_directory(path_dir: Path) -> str:
    """Check an export directory's weights against its config; returns a one-line summary."""
    model_config = read_model_config(path_dir)
    if model_config is None:
        raise FileNotFoundError(f"{path_dir} has no {CONFIG_FILE_NAME}")
    state_dict = load_open_clip_weights(find_open_clip_weights(path_dir))
    check_state_dict_matches_config(state_dict, model_config)
    count = sum(int(np.prod(np.shape(value))) for value in state_dict.values())
    return (
        f"{path_dir}: {len(state_dict)} tensors, {count:,} parameters, consistent with its config"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export.open_clip",
        description="Check the project's open_clip (PyTorch) export directories.",
        epilog=LOADING_INSTRUCTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="check that an export directory's weights match its config (no torch needed)"
    )
    check.add_argument("directory", type=Path)
    arguments = parser.parse_args(argv)
    if arguments.command == "check":
        print(check_directory(arguments.directory))
