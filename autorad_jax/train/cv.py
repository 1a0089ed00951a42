"""Patient-level 5-fold cross-validation of AutoRad-Lung and the baselines: a per-fold table and mean ± std."""

from __future__ import annotations

import csv
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from autorad_jax.train.bootstrap import format_value
from autorad_jax.train.trainer import train_and_evaluate

MODELS = ("autorad_lung", "coop", "cocoop", "zero_shot", "radiomics_logreg", "radiomics_mlp", "linear_probe",
          "late_fusion")
NUM_FOLDS = 5
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "auc_macro", "f1_macro", "precision_macro", "recall_macro",
                   "specificity_macro", "kappa_quadratic", "brier", "ece")


def summarize(fold_metrics: list[dict]) -> dict[str, dict]:
    """Per summary metric: mean and sample std (ddof=1) over the folds where it is defined, and the folds where it
    is undefined (NaN), which are named, not averaged."""
    out = {}
    for k in SUMMARY_METRICS:
        values = np.array([m[k] for m in fold_metrics], np.float64)
        defined = values[~np.isnan(values)]
        out[k] = {"mean": float(defined.mean()) if len(defined) else float("nan"),
                  "std": float(defined.std(ddof=1)) if len(defined) > 1 else float("nan"),
                  "folds": int(len(defined)), "undefined_folds": np.flatnonzero(np.isnan(values)).tolist()}
    return out


def format_table(summary: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per model, 'mean ± std' (sample std over folds) per metric, then a line for each
    metric undefined in some fold."""
    lines = ["| model | " + " | ".join(SUMMARY_METRICS) + " |", "|---" * (len(SUMMARY_METRICS) + 1) + "|"]
    for model, metrics in summary.items():
        lines.append(f"| {model} | " + " | ".join(f"{metrics[k]['mean']:.3f} ± {metrics[k]['std']:.3f}"
                                                   for k in SUMMARY_METRICS) + " |")
    notes = [f"{model} {k}: undefined in fold {', '.join(map(str, s['undefined_folds']))}; mean ± std over the "
             f"other {s['folds']} folds." for model, metrics in summary.items() for k, s in metrics.items()
             if s["undefined_folds"]]
    return "\n".join(lines + (["", *notes] if notes else []))


def format_folds(per_fold: dict[str, list[dict]]) -> str:
    """Markdown table: one row per model and fold, each metric with its patient-bootstrap 95% interval."""
    lines = ["| model | fold | " + " | ".join(SUMMARY_METRICS) + " |", "|---" * (len(SUMMARY_METRICS) + 2) + "|"]
    lines += [f"| {model} | {k} | " + " | ".join(format_value(m, key) for key in SUMMARY_METRICS) + " |"
              for model, folds in per_fold.items() for k, m in enumerate(folds)]
    return "\n".join(lines)


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, dict]]:
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
    print(format_folds(per_fold) + "\n\n" + format_table(summary))
    return summary


def _write(workdir: str, summary: dict, per_fold: dict) -> None:
    with open(os.path.join(workdir, "cv_summary.md"), "w") as f:
        f.write(format_table(summary) + "\n")
    with open(os.path.join(workdir, "cv_folds.md"), "w") as f:
        f.write(format_folds(per_fold) + "\n")
    with open(os.path.join(workdir, "cv_summary.json"), "w") as f:
        json.dump({"summary": summary, "folds": per_fold}, f, indent=1)
    with open(os.path.join(workdir, "cv_summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "metric", "mean", "std", "folds", "undefined_folds"])
        writer.writerows([model, k, s["mean"], s["std"], s["folds"], " ".join(map(str, s["undefined_folds"]))]
                         for model, metrics in summary.items() for k, s in metrics.items())
    with open(os.path.join(workdir, "cv_folds.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "fold", *(f"{k}{suffix}" for k in SUMMARY_METRICS
                                            for suffix in ("", "_ci95_low", "_ci95_high"))])
        for model, folds in per_fold.items():
            for fold, m in enumerate(folds):
                cells = [[m[k], *(m.get("ci95", {}).get(k) or ["", ""])] for k in SUMMARY_METRICS]
                writer.writerow([model, fold, *(c for cell in cells for c in cell)])
