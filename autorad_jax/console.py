"""What the command line shows: absl logs at WARNING unless --verbosity asks for more, no TFDS progress bars, and
third-party warnings that say nothing to the user filtered, all in one place. The library's own progress bars
(training, batch prediction) use tqdm on stderr; each command's result is printed last (see autorad_jax/cli.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from typing import Any

import numpy as np

# (message regex, category) of warnings that concern the libraries' own internals, not the user's run.
QUIET_WARNINGS = (
    (r".*pkg_resources is deprecated.*", UserWarning),  # pylidc's import (demo-data generator)
    (r"Casting complex values to real.*", np.exceptions.ComplexWarning),  # pyradiomics' complex-typed results
)
# Absl log lines of third-party libraries that say nothing to the user: TFDS before a dataset's first build, orbax
# opening a checkpoint read-only (eval, export, predict).
QUIET_LOGS = (r"Variant folder .* has no dataset_info\.json", r"CheckpointManagerOptions\.read_only=True",
              r"Given directory is read only")
# Worker processes (dataset build) start without this module's filters: the same, as PYTHONWARNINGS understands them.
CHILD_WARNINGS = ("ignore:Casting complex values to real", "ignore:pkg_resources is deprecated:UserWarning")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.match(p, record.getMessage()) for p in QUIET_LOGS)


def quiet_third_party() -> None:
    """Filters QUIET_WARNINGS and QUIET_LOGS (here and in worker processes), turns the progress bars of TFDS and
    transformers off and keeps TensorFlow's C++ logging (if present) quiet."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": the core needs none
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *CHILD_WARNINGS]))
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("absl").addFilter(_DropLines())
    logging.getLogger("radiomics").setLevel(logging.ERROR)  # per-nodule notes on the features it computes
    import tensorflow_datasets as tfds
    import transformers
    tfds.disable_progress_bar()
    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared" on every
    # build, unconditionally; a local build from --manual_dir downloads nothing, and prepare says what it builds.
    for method in ("_log_download_bytes", "_log_download_done"):
        if hasattr(tfds.core.DatasetBuilder, method):
            setattr(tfds.core.DatasetBuilder, method, lambda self: None)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" of every from_pretrained


def jsonable(value: Any) -> Any:
    """`value` with numpy arrays and scalars made plain Python, for json.dumps."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def to_json(value: Any, indent: int | None = 2) -> str:
    """The JSON text of a command's result (objects JSON does not know, as their str)."""
    return json.dumps(jsonable(value), indent=indent, default=str)
