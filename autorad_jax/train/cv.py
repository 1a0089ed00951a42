"""Patient-level 5-fold cross-validation of AutoRad-Lung and the baselines, optionally repeated with folds dealt anew.

For each model and repeat r the folds are trained in workdir/<run>/fold<k> (run = <model>, or <model>_repeat<r> for
r > 0), and the five held-out folds' predictions are pooled into workdir/<run>/ (out-of-fold predictions.csv and a
report with patient-bootstrap intervals). Written beside them:
  cv_summary.{md,csv,json}  per model: out-of-fold metrics with 95% intervals (the .md; .csv: cv_out_of_fold.csv),
                            and mean ± sample std over the folds;
  cv_folds.{md,csv}         one row per model, repeat and fold, each metric with its 95% interval;
  comparison[_repeat<r>]/   the paired patient-bootstrap comparison of the first model with each other one.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from autorad_jax.errors import ConfigError
from autorad_jax.data.pipeline import CV_FOLDS as NUM_FOLDS
from autorad_jax.train import compare, compilation_cache
from autorad_jax.train.bootstrap import evaluation_metrics, format_value
from autorad_jax.train.reports import write_report
from autorad_jax.train.trainer import train_and_evaluate

MODELS = ("autorad_lung", "coop", "cocoop", "zero_shot", "radiomics_logreg", "radiomics_mlp", "linear_probe",
          "late_fusion")
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


def format_pooled(pooled: dict[str, dict]) -> str:
    """Markdown table: one row per run (model and repeat), each out-of-fold metric with its 95% interval."""
    lines = ["| run | nodules | " + " | ".join(SUMMARY_METRICS) + " |", "|---" * (len(SUMMARY_METRICS) + 2) + "|"]
    lines += [f"| {run} | {m['num_examples']} | " + " | ".join(format_value(m, key) for key in SUMMARY_METRICS)
              + " |" for run, m in pooled.items()]
    return "\n".join(lines)


def format_folds(per_fold: dict[str, list[dict]]) -> str:
    """Markdown table: one row per model, repeat and fold, each metric with its patient-bootstrap 95% interval."""
    lines = ["| model | repeat | fold | " + " | ".join(SUMMARY_METRICS) + " |",
             "|---" * (len(SUMMARY_METRICS) + 3) + "|"]
    lines += [f"| {model} | {m.get('cv_repeat', 0)} | {m['cv_fold']} | " +
              " | ".join(format_value(m, key) for key in SUMMARY_METRICS) + " |"
              for model, folds in per_fold.items() for m in folds]
    return "\n".join(lines)


def run_name(model: str, repeat: int) -> str:
    """The folder of one model's cross-validation repeat: '<model>' (repeat 0) or '<model>_repeat<r>'."""
    return model if repeat == 0 else f"{model}_repeat{repeat}"


def pool_folds(fold_dirs: list[str], out_dir: str, info: dict) -> dict:
    """Concatenates the folds' held-out predictions (their published predictions.csv) and writes the out-of-fold
    report with patient-bootstrap intervals in `out_dir`; returns its metrics."""
    folds = [compare.read_predictions(d) for d in fold_dirs]
    names = folds[0].names
    labels = np.concatenate([f.labels for f in folds])
    probs = np.concatenate([f.probs for f in folds])
    patients = np.concatenate([f.patients for f in folds])
    metrics = evaluation_metrics(labels, probs, names, patients)
    write_report(out_dir, metrics, labels, probs, names, patients, info)
    return metrics


def _models(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in str(config.cv.models).split(",") if m.strip()) or MODELS
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        raise ConfigError(f"config.cv.models names {unknown}; choose from {', '.join(MODELS)}.")
    if int(config.cv.repeats) < 1:
        raise ConfigError(f"config.cv.repeats={config.cv.repeats}; use 1 or more.")
    return chosen


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, dict]]:
    """Trains each model of config.cv.models (default: all) on each patient fold of train + validation
    (config.data.cv_fold = 0..4; the fold is held out and evaluated with the final state), config.cv.repeats times
    (repeat r > 0 deals the patients into folds anew with seed r and trains with seed config.seed + r); writes the
    files listed in the module docstring and returns the per-fold summary of each model.

    Each fold resumes from its own workdir, so an interrupted cross-validation continues where it stopped.
    """
    models, repeats = _models(config), int(config.cv.repeats)
    compilation_cache.use_workdir_cache(config.train.compilation_cache, workdir)  # one for every fold
    summary, per_fold, pooled = {}, {}, {}
    for name in models:
        folds = []
        for r in range(repeats):
            run_dir = os.path.join(workdir, run_name(name, r))
            for k in range(NUM_FOLDS):
                fold_config = config.copy_and_resolve_references()
                fold_config.model.name, fold_config.data.cv_fold = name, k
                fold_config.data.cv_repeat, fold_config.seed = r, config.seed + r
                result = train_and_evaluate(fold_config, os.path.join(run_dir, f"fold{k}"))
                if result.get("preempted"):
                    logging.warning("Cross-validation preempted in %s fold %d; rerun to continue.",
                                    run_name(name, r), k)
                    return summary
                folds.append({**result["validation"], "cv_repeat": r, "cv_fold": k})
            if jax.process_index() == 0:
                pooled[run_name(name, r)] = pool_folds(
                    [os.path.join(run_dir, f"fold{k}") for k in range(NUM_FOLDS)], run_dir,
                    info={"split": "out_of_fold", "model": name, "cv_repeat": r, "folds": NUM_FOLDS})
        per_fold[name] = folds
        summary[name] = summarize(folds)
    if jax.process_index() == 0:
        _write(workdir, summary, per_fold, pooled)
        comparisons = [_compare_runs(workdir, models, r) for r in range(repeats)] if len(models) > 1 else []
        print("\n\n".join([format_folds(per_fold), format_table(summary), format_pooled(pooled),
                           *map(compare.format_table, comparisons)]))
    return summary


def _compare_runs(workdir: str, models: tuple[str, ...], repeat: int) -> dict:
    """The paired comparison of the first model's out-of-fold predictions with each other model's, for one repeat."""
    out = os.path.join(workdir, "comparison" if repeat == 0 else f"comparison_repeat{repeat}")
    return compare.compare([os.path.join(workdir, run_name(m, repeat)) for m in models], out)


def _write(workdir: str, summary: dict, per_fold: dict, pooled: dict) -> None:
    with open(os.path.join(workdir, "cv_summary.md"), "w") as f:
        f.write("Out-of-fold predictions of the five folds pooled, patient-bootstrap 95% intervals:\n\n"
                + format_pooled(pooled) + "\n\nMean ± sample std (ddof = 1) over the folds:\n\n"
                + format_table(summary) + "\n")
    with open(os.path.join(workdir, "cv_folds.md"), "w") as f:
        f.write(format_folds(per_fold) + "\n")
    with open(os.path.join(workdir, "cv_summary.json"), "w") as f:
        json.dump({"summary": summary, "out_of_fold": pooled, "folds": per_fold}, f, indent=1)
    with open(os.path.join(workdir, "cv_summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "metric", "mean", "std", "folds", "undefined_folds"])
        writer.writerows([model, k, s["mean"], s["std"], s["folds"], " ".join(map(str, s["undefined_folds"]))]
                         for model, metrics in summary.items() for k, s in metrics.items())
    with open(os.path.join(workdir, "cv_out_of_fold.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "metric", "value", "ci95_low", "ci95_high"])
        writer.writerows([run, k, m[k], *(m.get("ci95", {}).get(k) or ["", ""])]
                         for run, m in pooled.items() for k in SUMMARY_METRICS)
    with open(os.path.join(workdir, "cv_folds.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "repeat", "fold", *(f"{k}{suffix}" for k in SUMMARY_METRICS
                                                      for suffix in ("", "_ci95_low", "_ci95_high"))])
        for model, folds in per_fold.items():
            for m in folds:
                cells = [[m[k], *(m.get("ci95", {}).get(k) or ["", ""])] for k in SUMMARY_METRICS]
                writer.writerow([model, m.get("cv_repeat", 0), m["cv_fold"], *(c for cell in cells for c in cell)])
