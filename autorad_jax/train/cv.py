"""Patient-level 5-fold cross-validation of AutoRad-Lung and the baselines, with a mean +- std summary table."""

from __future__ import annotations

import csv
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from autorad_jax.train.trainer import train_and_evaluate

MODELS = ("autorad_lung", "coop", "radiomics_logreg", "radiomics_mlp", "linear_probe")
NUM_FOLDS = 5
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "auc_macro", "f1_macro", "precision_macro", "recall_macro",
                   "specificity_macro")


def summarize(fold_metrics: list[dict]) -> dict[str, tuple[float, float]]:
    """(mean, std over folds) of each summary metric; folds where a metric is undefined (NaN) are left out."""
    return {k: (float(np.nanmean([m[k] for m in fold_metrics])), float(np.nanstd([m[k] for m in fold_metrics])))
            for k in SUMMARY_METRICS}


def format_table(summary: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Markdown table: one row per model, 'mean ± std' per metric."""
    lines = ["| model | " + " | ".join(SUMMARY_METRICS) + " |", "|---" * (len(SUMMARY_METRICS) + 1) + "|"]
    for model, metrics in summary.items():
        lines.append(f"| {model} | " + " | ".join(f"{metrics[k][0]:.3f} ± {metrics[k][1]:.3f}"
                                                   for k in SUMMARY_METRICS) + " |")
    return "\n".join(lines)


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Trains every model on each patient fold of train + validation (config.data.cv_fold = 0..4; the fold is held
    out and evaluated with the final state) in workdir/<model>/fold<k>, and writes workdir/cv_summary.{md,csv,json}.

    Each fold resumes from its own workdir, so an interrupted cross-validation continues where it stopped.
    """
    summary, per_fold = {}, {}
    for name in MODELS:
        folds = []
        for k in range(NUM_FOLDS):
            fold_config = config.copy_and_resolve_references()
            fold_config.model.name, fold_config.data.cv_fold = name, k
            result = train_and_evaluate(fold_config, os.path.join(workdir, name, f"fold{k}"))
            if result.get("preempted"):
                logging.warning("Cross-validation preempted in %s fold %d; rerun to continue.", name, k)
                return summary
            folds.append(result["validation"])
        per_fold[name] = folds
        summary[name] = summarize(folds)
    if jax.process_index() == 0:
        _write(workdir, summary, per_fold)
    print(format_table(summary))
    return summary


def _write(workdir: str, summary: dict, per_fold: dict) -> None:
    with open(os.path.join(workdir, "cv_summary.md"), "w") as f:
        f.write(format_table(summary) + "\n")
    with open(os.path.join(workdir, "cv_summary.json"), "w") as f:
        json.dump({"summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for m, s in summary.items()},
                   "folds": per_fold}, f, indent=1)
    with open(os.path.join(workdir, "cv_summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "metric", "mean", "std", "folds"])
        for model, metrics in summary.items():
            writer.writerows([model, k, mean, std, NUM_FOLDS] for k, (mean, std) in metrics.items())
