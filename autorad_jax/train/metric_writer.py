"""Scalars of a training run to TensorBoard (`workdir/tensorboard`) and to JSON lines in the workdir."""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch where PyTorch is not loaded yet: tensorboardX imports
    torch when it can (to accept torch tensors, which nothing here passes), about 3 s of a training run's start-up.
    A None entry in sys.modules makes that `import torch` raise the ImportError tensorboardX expects without it."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Scalars to TensorBoard (`workdir/tensorboard`) and to `workdir/<name>.jsonl`; a no-op off process 0."""

    def __init__(self, workdir: str, active: bool) -> None:
        self._workdir = workdir
        self._tb = None
        if active:
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], *, prefix: str, jsonl: str | None = None) -> None:
        """Logs `scalars` at `step` under `prefix/` in TensorBoard and, with `jsonl`, as one line of <jsonl>.jsonl."""
        if self._tb is None:
            return
        for k, v in scalars.items():
            if np.isfinite(v):  # an undefined metric (e.g. AUC of a class absent from the split) is left out
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if jsonl:
            with open(os.path.join(self._workdir, f"{jsonl}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def drop_after(self, step: int, jsonl: str) -> None:
        """Removes the lines of <jsonl>.jsonl with a step above `step` (logged after the checkpoint a run resumes
        from, and about to be logged again), so that the file holds each step once."""
        path = os.path.join(self._workdir, f"{jsonl}.jsonl")
        if self._tb is None or not os.path.exists(path):
            return
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
