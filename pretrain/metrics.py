"""Metrics: TensorBoard event files (tensorboardX) plus a CSV, written by process 0 only.

The CSV is long-format (``step,name,value,wall_time``) so that new metric names can appear at any
time (evaluations, skipped-example counts) without rewriting a header; load it with
``pandas.read_csv(path).pivot_table(index="step", columns="name", values="value")``.
On resume, rows from steps after the restored checkpoint are dropped first, so that the file
describes one consistent run.
"""

from __future__ import annotations

import csv
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import jax

CSV_FIELDS = ("step", "name", "value", "wall_time")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def tensorboard_tag(name: str) -> str:
    """TensorBoard accepts word characters, '-', '/' and '.' in tags: 'R@1' becomes 'R_at_1'."""
    return re.sub(r"[^\w\-/.]", "_", name.replace("@", "_at_"))


def truncate_csv_after(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (they belong to work a restart is about to redo)."""
    if not path.exists():
        return
    with path.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if int(row["step"]) <= step]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class MetricWriter:
    """Writes scalars to TensorBoard and CSV on process 0; a no-op on the other processes."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.csv_path = Path(workdir) / "metrics.csv"
        self._tensorboard = None
        if not self.enabled:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_csv_after(self.csv_path, resume_step)
        elif self.csv_path.exists():
            self.csv_path.unlink()  # a fresh run in a reused workdir starts a fresh file
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboardX is a declared dependency
            SummaryWriter = None
        if SummaryWriter is not None:
            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled or not scalars:
            return
        now = time.time()
        new_file = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as file:
            writer = csv.writer(file)
            if new_file:
                writer.writerow(CSV_FIELDS)
            for name, value in sorted(scalars.items()):
                writer.writerow((step, name, f"{float(value):.6g}", f"{now:.3f}"))
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(
                    tensorboard_tag(name), float(value), step, walltime=now
                )
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
