"""The notebooks in notebooks/: stored without outputs (default run), and executed end to end
with a few steps (slow: CI runs them, so they cannot rot).

Execution goes through papermill: it runs every cell in a Jupyter kernel of this Python and
replaces the cell tagged ``parameters`` with the values below. The kernel inherits this
process's environment (8 fake CPU devices, the test run's TFDS folder and compilation cache);
the open_clip cell of the quick start runs where the PyTorch environment is (TORCH_PYTHON or
.venv-torch) and says it is skipped elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch_env import torch_skip_reason

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# The :runlocal CLIP shrunk to what runs in seconds: the small scenes set, one block per tower.
SMALL_RUN = [
    "--config.log_every_steps=1",
    "--config.schedule.warmup_steps=1",
    "--config.model.image.depth=1",
    "--config.model.text.depth=1",
]
PARAMETERS = {
    "colab_quickstart.ipynb": {
        "TOTAL_STEPS": 3,
        "EVAL_EVERY": 3,
        "SCENES": "tiny",
        "EXTRA_FLAGS": SMALL_RUN,
    },
    "tpu_pod_slice.ipynb": {
        "TOTAL_STEPS": 4,
        "SCENES": "tiny",
        "EXTRA_FLAGS": SMALL_RUN,
        # No libtpu in the test environment: the fit check compiles for the 8 CPU devices.
        "FIT_RECIPE": "configs/clip_vitb16.py:runlocal",
        "FIT_TOPOLOGY": "",
        "FIT_FLAGS": SMALL_RUN[2:],
    },
}


def test_every_notebook_is_stored_without_outputs_and_has_parameters():
    names = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(PARAMETERS)
    for name in names:
        notebook = json.loads((NOTEBOOKS / name).read_text())
        code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        for cell in code:
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{name} has stored outputs: clear them (Jupyter: Edit -> Clear all outputs)"
            )
        tagged = [cell for cell in code if "parameters" in cell["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{name} needs one cell tagged 'parameters'"
        source = "".join(tagged[0]["source"])
        for parameter in PARAMETERS[name]:
            assert f"\n{parameter}" in f"\n{source}", f"{name} has no parameter {parameter}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_runs_end_to_end(name, tmp_path):
    papermill = pytest.importorskip("papermill")
    executed = tmp_path / name
    papermill.execute_notebook(
        str(NOTEBOOKS / name),
        str(executed),
        parameters={**PARAMETERS[name], "WORKDIR": str(tmp_path / "run")},
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )
    outputs = json.loads(executed.read_text())
    text = "".join(
        "".join(output.get("text", ""))
        for cell in outputs["cells"]
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
    )
    if name == "colab_quickstart.ipynb":
        assert "of 8 right" in text and "consistent with its config" in text
        # Where the PyTorch environment is (CI builds it), the export was loaded in open_clip
        # and compared with JAX (the notebook asserts the agreement).
        if torch_skip_reason() is None:
            assert "open_clip vs JAX" in text, text[-2000:]
    else:
        assert "resumed from checkpoint at step 2" in text and "result" in text
