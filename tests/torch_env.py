"""Run scripts in the separate PyTorch environment, for parity tests against open_clip / timm.

The JAX environment and the torch environment are kept apart (their CUDA wheels conflict), so a
parity test writes its inputs to files, runs a script from ``tests/torch_side/`` with the torch
environment's interpreter, and reads the script's outputs back. Those scripts import only torch-env
packages and numpy, never this project's JAX code.

Usage in a test (the files of a case directory are torch_side/parity_files.py's)::

    from torch_env import assert_outputs_close, require_torch_env, run_parity_case

    @pytest.mark.torch
    def test_matches_open_clip(tmp_path):
        require_torch_env()  # skips with the reason when the environment is missing or broken
        report, theirs = run_parity_case(tmp_path, "some_script.py", "load-export", tmp_path,
                                         inputs={"images": images})
        assert_outputs_close(ours, theirs, ("features",), tolerance=1e-4, what="JAX vs timm")

The environment probe (importing torch, open_clip and timm: a few seconds) runs on the first
``require_torch_env()`` call of a session, not at collection, so ``-m "not torch"`` runs skip it.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch_side.parity_files import read_results, write_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCH_SIDE_DIR = Path(__file__).resolve().parent / "torch_side"
DEFAULT_TIMEOUT_S = 300.0
# What a parity test needs from the torch environment; checked once per test session.
REQUIRED_MODULES = ("torch", "open_clip", "timm")


def torch_python() -> Path:
    """The torch env's interpreter: ``$TORCH_PYTHON``, else ``<repo>/.venv-torch/bin/python``."""
    override = os.environ.get("TORCH_PYTHON")
    return Path(override) if override else REPO_ROOT / ".venv-torch" / "bin" / "python"


def torch_side_script(name: str) -> Path:
    """Path of a script in ``tests/torch_side/``."""
    return TORCH_SIDE_DIR / name


def _clean_env() -> dict[str, str]:
    # The test process forces 8 fake CPU devices and a CPU platform for JAX; none of that concerns
    # torch, and PYTHONPATH from the JAX side could shadow the torch env's packages.
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "XLA_FLAGS", "JAX_PLATFORMS"):
        env.pop(name, None)
    return env


@functools.cache
def torch_skip_reason() -> str | None:
    """``None`` when the torch environment works, else why torch parity tests must be skipped."""
    python = torch_python()
    if not python.exists():
        return f"torch environment not found at {python} (set TORCH_PYTHON or build .venv-torch)"
    probe = "import " + ", ".join(REQUIRED_MODULES)
    try:
        result = subprocess.run(
            [str(python), "-c", probe],
            capture_output=True,
            text=True,
            timeout=DEFAULT_TIMEOUT_S,
            env=_clean_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"torch environment at {python} is unusable: {error!r}"
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return f"torch environment at {python} cannot `{probe}`: {last_line}"
    return None


def require_torch_env() -> None:
    """Skip the calling test when the torch environment is missing or cannot import its packages.

    With ``REQUIRE_TORCH_ENV=1`` (set by CI, which builds the environment itself) a missing or
    broken environment fails the test instead: parity checks must not silently vanish.
    """
    reason = torch_skip_reason()
    if reason is None:
        return
    if os.environ.get("REQUIRE_TORCH_ENV") == "1":
        pytest.fail(f"REQUIRE_TORCH_ENV=1 but {reason}")
    pytest.skip(reason)


@functools.cache
def _missing_torch_packages(modules: tuple[str, ...]) -> str | None:
    python = torch_python()
    if not python.exists():
        return f"torch environment not found at {python} (set TORCH_PYTHON or build .venv-torch)"
    probe = (
        "import importlib.util, sys; "
        f"missing = [m for m in {list(modules)!r} if importlib.util.find_spec(m) is None]; "
        "print(*missing); sys.exit(1 if missing else 0)"
    )
    result = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, env=_clean_env(), check=False
    )
    if result.returncode != 0:
        return f"torch environment at {python} lacks {result.stdout.strip() or result.stderr}"
    return None


def require_torch_packages(*modules: str) -> None:
    """Like :func:`require_torch_env`, for tests that only run their own torch-side processes:
    checks that the torch interpreter finds ``modules`` without importing them (milliseconds,
    where the import probe costs seconds); a broken install then fails in the test itself."""
    reason = _missing_torch_packages(tuple(modules))
    if reason is None:
        return
    if os.environ.get("REQUIRE_TORCH_ENV") == "1":
        pytest.fail(f"REQUIRE_TORCH_ENV=1 but {reason}")
    pytest.skip(reason)


def run_torch_script(
    script: str | Path, *args: str | Path, timeout: float = DEFAULT_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run ``script`` with the torch interpreter; ``args`` become its command-line arguments.

    ``script`` is a bare file name in ``tests/torch_side/``, an absolute path, or a path relative
    to the repository root (also the script's working directory).

    Raises ``RuntimeError`` carrying the script's stdout and stderr when it exits non-zero or
    overruns ``timeout`` seconds.
    """
    script = Path(script)
    if not script.is_absolute():
        script = TORCH_SIDE_DIR / script if len(script.parts) == 1 else REPO_ROOT / script
    if not script.is_file():
        raise FileNotFoundError(f"torch-side script not found: {script}")
    command = [str(torch_python()), str(script), *map(str, args)]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            cwd=REPO_ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(
            f"{' '.join(command)} timed out after {timeout} s\n"
            f"--- stdout ---\n{_text(error.stdout)}\n--- stderr ---\n{_text(error.stderr)}"
        ) from error
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def run_parity_case(
    case_dir: Path,
    script: str | Path,
    *args: str | Path,
    inputs: Mapping[str, np.ndarray] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
    """The parity flow for one case directory: write ``inputs`` (``inputs.npz``), run the
    torch-side ``script`` with ``args``, and read back its ``(report, outputs)``. For a script
    run over several case directories at once, write each one's inputs with ``write_inputs`` and
    read each one's results with ``read_results`` (torch_side/parity_files.py)."""
    if inputs is not None:
        write_inputs(case_dir, inputs)
    run_torch_script(script, *args, timeout=timeout)
    return read_results(case_dir)


def assert_outputs_close(
    ours: Mapping[str, np.ndarray],
    theirs: Mapping[str, np.ndarray],
    names: Sequence[str],
    *,
    tolerance: float,
    what: str,
) -> str:
    """Assert that each named output has the same shape on both sides and differs by less than
    ``tolerance`` anywhere; returns a summary of the differences for the test's log."""
    summary = []
    for name in names:
        assert ours[name].shape == theirs[name].shape, (what, name, ours[name].shape)
        difference = float(np.abs(ours[name] - theirs[name]).max())
        assert difference < tolerance, f"{what}: {name} differ by {difference:.2e}"
        summary.append(f"{name} max |diff| {difference:.1e}")
    return ", ".join(summary)
