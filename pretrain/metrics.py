"""Metrics: TensorBoard event files (tensorboardX) plus a CSV, written by process 0 only.

The CSV is long-format (``step,name,value,wall_time``) so that new metric names can appear at any
time (evaluations, skipped-example counts) without rewriting a header; load it with
``pandas.read_csv(path).pivot_table(index="step", columns="name", values="value")``.
On resume, rows from steps after the restored checkpoint are dropped (and TensorBoard purges its
events after that step), so that the files describe one consistent run.

The workdir may be local or a URL (``gs://...``): the CSV is rewritten whole at each write
(object stores cannot append) and TensorBoard writes through tensorboardX, which needs
``google-cloud-storage`` for ``gs://``.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Mapping

import jax
from absl import logging
from etils import epath

CSV_FIELDS = ("step", "name", "value", "wall_time")
Row = tuple[int, str, str, str]


def tensorboard_tag(name: str) -> str:
    """TensorBoard accepts word characters, '-', '/' and '.' in tags: 'R@1' becomes 'R_at_1'."""
    return re.sub(r"[^\w\-/.]", "_", name.replace("@", "_at_"))


def read_rows(path: epath.Path, up_to_step: int) -> list[Row]:
    """The CSV rows logged at or before ``up_to_step`` (none if the file does not exist)."""
    if not path.exists():
        return []
    reader = csv.DictReader(io.StringIO(path.read_text()))
    return [
        (int(row["step"]), row["name"], row["value"], row["wall_time"])
        for row in reader
        if int(row["step"]) <= up_to_step
    ]


class MetricWriter:
    """Writes scalars to TensorBoard and CSV on process 0; a no-op on the other processes."""

    def __init__(self, workdir: str, *, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.csv_path = epath.Path(workdir) / "metrics.csv"
        self._rows: list[Row] = []
        self._tensorboard = None
        if not self.enabled:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh run in a reused workdir starts a fresh file; a resumed one keeps its past.
        self._rows = read_rows(self.csv_path, resume_step) if resume_step is not None else []
        self._write_csv()
        try:
            from tensorboardX import SummaryWriter

            purge = {} if resume_step is None else {"purge_step": resume_step + 1}
            self._tensorboard = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), **purge)
        except ImportError as error:  # e.g. gs:// without google-cloud-storage
            logging.warning("TensorBoard logging is off: %s", error)

    def _write_csv(self) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_FIELDS)
        writer.writerows(self._rows)
        temporary = self.csv_path.parent / (self.csv_path.name + ".tmp")
        temporary.write_text(buffer.getvalue())
        temporary.replace(self.csv_path)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled or not scalars:
            return
        now = time.time()
        self._rows.extend(
            (step, name, f"{float(value):.6g}", f"{now:.3f}")
            for name, value in sorted(scalars.items())
        )
        self._write_csv()
        if self._tensorboard is not None:
            for name, value in scalars.items():
                tag = tensorboard_tag(name)
                self._tensorboard.add_scalar(tag, float(value), step, walltime=now)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
