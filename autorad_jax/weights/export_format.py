"""The export folder's layout and config, readable without PyTorch: what `autorad_jax.export` writes and both loaders
(`export.load_export` in JAX, `torch_model.AutoRadLungTorch.from_export`) check."""

from __future__ import annotations

import json
import os
from typing import Any

from autorad_jax.errors import AutoradError

EXPORT_FORMAT = "autorad_jax.autorad_lung"
# 2: the radiomics transform and clip, and the prompt learner's conditioning input (condition_on); a version-1 export
# (neither) reads as transform 'none' conditioned on the radiomics.
# 3: the tower family (model.family, naming the towers' folders) and the prompts' context start (model.ctx_start); a
# version-1 or 2 export reads as AIMv2 with its context after the SOS token.
EXPORT_FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = tuple(range(1, EXPORT_FORMAT_VERSION + 1))
EXPORT_CONFIG = "autorad_lung.json"
EXPORT_WEIGHTS = "autorad_lung.safetensors"
DEFAULT_FAMILY = "aimv2"  # the family of exports written before they named theirs
CONDITIONINGS = ("shared", "per_token")
POOLINGS = ("head", "mean")
RADIOMICS_TRANSFORMS = ("none", "signed_log", "quantile")
CONDITION_INPUTS = ("radiomics", "image")


class ExportFolderError(AutoradError, ValueError):
    """An export folder is incomplete, or was not written for this model."""


def export_towers(family: str) -> tuple[str, str]:
    """The folders of an export's joint towers and of its vision tower alone, for its tower family."""
    return family, f"{family}_vision"


def read_export_config(path: str) -> dict[str, Any]:
    """The JSON config of an export folder; `ExportFolderError` naming what is missing or foreign."""
    if not os.path.isdir(path):
        raise ExportFolderError(f"export folder {path} does not exist.")
    if not os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        raise ExportFolderError(f"{path} is not a complete autorad-jax export folder: missing {EXPORT_CONFIG}.")
    try:
        with open(os.path.join(path, EXPORT_CONFIG)) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportFolderError(f"{path}/{EXPORT_CONFIG} is not valid JSON: {e}") from e
    if config.get("format") != EXPORT_FORMAT:
        raise ExportFolderError(f"{path}/{EXPORT_CONFIG} is not an AutoRad-Lung export (format "
                                f"{config.get('format')!r}, expected {EXPORT_FORMAT!r}).")
    if config.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ExportFolderError(f"{path}/{EXPORT_CONFIG}: format_version {config.get('format_version')!r}, this "
                                f"version of autorad-jax reads {' and '.join(map(str, READABLE_FORMAT_VERSIONS))}.")
    towers = export_towers(config.get("model", {}).get("family", DEFAULT_FAMILY))[0]
    needed = (EXPORT_WEIGHTS, os.path.join(towers, "config.json"), os.path.join(towers, "model.safetensors"))
    missing = [name for name in needed if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise ExportFolderError(f"{path} is not a complete autorad-jax export folder: missing {', '.join(missing)}.")
    return config
