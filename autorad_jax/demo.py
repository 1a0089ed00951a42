"""The demo (`python run.py`): demo data -> dataset -> AutoRad-Lung and a radiomics baseline -> test metrics.

Everything goes under the workdir (default workdir/demo): lidc_demo/ (generated scans, TCIA layout),
tensorflow_datasets/ (the built lidc_idri dataset), one training workdir per model with its checkpoints,
metrics.json (with patient-bootstrap 95% intervals), predictions.csv and PNGs, and comparison/ (AutoRad-Lung minus
the baseline, paired over the same patients). Data and dataset are made once and reused by later runs.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from absl import logging

from autorad_jax import models
from autorad_jax.data import pipeline
from autorad_jax.train import compare, compilation_cache
from autorad_jax.train.bootstrap import format_value
from autorad_jax.train.trainer import train_and_evaluate

DEMO_SCANS = 150  # about 200 nodules
DEMO_MODELS = ("autorad_lung", "radiomics_logreg")
TABLE_METRICS = ("accuracy", "balanced_accuracy", "auc_macro", "brier", "ece", "kappa_quadratic")


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def _ensure_dataset(data_config: ml_collections.ConfigDict, scans_dir: str) -> None:
    """Generates demo scans and builds the dataset, each only when absent."""
    import tfds_lidc
    try:
        pipeline.open_split(data_config, "train")
        return
    except pipeline.DatasetError:
        pass
    if not (os.path.isdir(scans_dir) and os.listdir(scans_dir)):
        _say(f"Generating {DEMO_SCANS} demo scans in {scans_dir} ...")
        tfds_lidc.synth.generate(scans_dir, DEMO_SCANS, seed=0, num_workers=os.cpu_count() or 1)
    _say(f"Building lidc_idri/{data_config.builder_config} in {data_config.data_dir} ...")
    tfds_lidc.prepare(scans_dir, data_config.data_dir, builder_config=data_config.builder_config,
                      num_workers=os.cpu_count() or 1)


def run_demo(config: ml_collections.ConfigDict, workdir: str = "workdir/demo",
             pretrained_dir: str | None = None) -> dict:
    """Runs the demo with `config` (the tiny config by default) in `workdir`; returns {model: test metrics}.

    `pretrained_dir`: a local AIMv2(-LiT), CLIP or SigLIP save_pretrained folder; without it the towers are randomly
    initialised.
    config.data.data_dir is replaced by workdir/tensorflow_datasets: the demo never touches a real dataset.
    """
    start = time.time()
    logging.set_verbosity(logging.WARNING)  # the demo shows progress bars and its table, not library INFO lines
    workdir = os.path.abspath(workdir)
    base = config.copy_and_resolve_references()
    base.data.data_dir = os.path.join(workdir, "tensorflow_datasets")
    if pretrained_dir:
        base.model.pretrained_dir = pretrained_dir
    notice = ("NOTE: demo data -- real LIDC-IDRI geometry and reader ratings, SIMULATED CT intensities; "
              + ("encoder weights from " + base.model.pretrained_dir if base.model.pretrained_dir
                 else f"the {base.model.towers} encoder is randomly initialised (untrained); pass --pretrained_dir for "
                      f"real weights")
              + ". These numbers say nothing about real nodules.")
    _say(notice)
    _ensure_dataset(base.data, os.path.join(workdir, "lidc_demo"))

    compilation_cache.use_workdir_cache(base.train.compilation_cache, workdir)  # one for every model
    results, reports = {}, {}
    for name in DEMO_MODELS:
        model_config = base.copy_and_resolve_references()
        model_config.model.name = name
        model_dir = os.path.join(workdir, name)
        how = ("fitting" if name in models.NO_STEP_MODELS else
               f"training for {model_config.train.num_steps} steps")
        _say(f"{name}: {how} in {model_dir} ...")
        result = train_and_evaluate(model_config, model_dir)
        if result.get("preempted"):
            _say("Preempted; run the same command again to resume.")
            return results
        results[name], reports[name] = result["test"], model_dir

    width = max(len(n) for n in [*results, "test (95% CI)"])
    lines = [f"{name}: {d}/metrics.json, predictions.csv, roc.png, confusion.png, reliability.png (all "
             f"evaluations: {d}/reports/)" for name, d in reports.items()]
    if jax.process_index() == 0:  # the baseline is A, AutoRad-Lung is B
        comparison = compare.compare([reports[n] for n in DEMO_MODELS[::-1]], os.path.join(workdir, "comparison"))
        lines += ["Paired patient-bootstrap difference, test split (Brier: lower is better):",
                  compare.format_table(comparison),
                  f"({os.path.join(workdir, 'comparison')}/comparison.md, .csv, .json, roc_overlay.png)"]
    lines += [notice, f"Demo finished in {time.time() - start:.0f} s.", ""]
    lines += [f"{'test (95% CI)':<{width}}  " + "  ".join(f"{m:>21}" for m in TABLE_METRICS)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{format_value(metrics, m):>21}" for m in TABLE_METRICS)
              for name, metrics in results.items()]
    _say("\n".join(lines))  # the metrics table is the last thing on screen
    return results
