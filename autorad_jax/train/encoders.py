"""Which encoder? The same AutoRad-Lung trained with each tower family and initialisation, compared on one test set.

`compare_encoders(config, workdir)` trains config.model (AutoRad-Lung unless the config says otherwise) once per
(family, init) of config.encoders, every run on the same dataset, split, folds, seed and schedule, in
workdir/<family>_<init>; then `autorad_jax.train.compare` reads their test predictions and writes the paired
patient-bootstrap comparison of every run against the first (AIMv2 pretrained, when it is run) into
workdir/comparison. A family with a folder (config.encoders.<family>_dir) trains from it ('pretrained') and from the
same towers untrained ('random'); a family without one runs 'random' towers at config.model's sizes only.
"""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from autorad_jax.errors import ConfigError
from autorad_jax.models import families
from autorad_jax.train import compare
from autorad_jax.train.trainer import train_and_evaluate

INITS = ("pretrained", "random")


def runs(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
    """(family, init, folder) of every run config.encoders asks for, in order; pretrained runs need a folder."""
    chosen = [f.strip() for f in config.encoders.families.split(",") if f.strip()]
    inits = [i.strip() for i in config.encoders.inits.split(",") if i.strip()]
    for init in inits:
        if init not in INITS:
            raise ConfigError(f"config.encoders.inits: {init!r} is not one of {INITS}")
    out = []
    for name in chosen:
        folder = config.encoders.get(f"{families.get(name).name}_dir", "")
        for init in inits:
            if init == "pretrained" and not folder:
                logging.warning("No config.encoders.%s_dir: the %s towers run random-init only.", name, name)
                continue
            out.append((name, init, folder))
    if not out:
        raise ConfigError("config.encoders names no run: give families and inits (and folders for 'pretrained').")
    return out


def run_config(config: ml_collections.ConfigDict, family: str, init: str, folder: str) -> ml_collections.ConfigDict:
    """config with the towers of `family`: from `folder` (pretrained or untrained), else random at config's sizes."""
    run = config.copy_and_resolve_references()
    run.model.update(pretrained_dir=folder, towers=family, init=init)
    return run


def compare_encoders(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and tests every run of `runs(config)` in workdir/<family>_<init> (a finished run resumes as done), then
    compares their test predictions, the first run against each other; returns the comparison (`compare.compare`)."""
    run_dirs = []
    for family, init, folder in runs(config):
        run_dir = os.path.join(workdir, f"{family}_{init}")
        logging.info("Training %s towers (%s) in %s", family, init, run_dir)
        train_and_evaluate(run_config(config, family, init, folder), run_dir)
        run_dirs.append(run_dir)
    return compare.compare(run_dirs, os.path.join(workdir, "comparison"))
