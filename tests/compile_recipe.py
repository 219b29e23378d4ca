"""Run `python -m pretrain.main --mode=compile` on a recipe with 8 fake CPU devices (a subprocess,
so that the device count is set before JAX starts); returns its log (stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def compile_recipe(config: str, workdir: Path, *overrides: str) -> str:
    command = [
        sys.executable,
        "-m",
        "pretrain.main",
        f"--config={config}",
        "--mode=compile",
        f"--workdir={workdir}",
        *overrides,
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr
