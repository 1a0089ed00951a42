"""Comparison of runs: patient-bootstrap differences B - A, paired on the same nodules, unpaired across datasets.

Each workdir's predictions.csv (its published test evaluation, or an external one: workdir/external/<dataset>) is
read. Runs evaluated on the same dataset are compared paired: the same patient resamples are applied to every run, so
the interval of a difference reflects only how the models differ on the same patients. Runs evaluated on different
datasets (metrics.json's 'dataset', e.g. a LIDC-IDRI test split and an external cohort) share no patient: their
difference is unpaired, each run's patients resampled independently (A's with `seed`, B's with `seed + 1`), and its
interval holds both samples' variation.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from autorad_jax.errors import AutoradError  # noqa: E402
from autorad_jax.train.bootstrap import LEVEL, REPLICATES, SEED, patient_weights, percentile_interval  # noqa: E402
from autorad_jax.train.metrics import weighted_metrics  # noqa: E402
from autorad_jax.train.reports import finish_unit_square  # noqa: E402

COMPARE_METRICS = ("auc_macro", "balanced_accuracy", "accuracy", "brier")


class ComparisonError(AutoradError, ValueError):
    """A predictions.csv that is missing, malformed, or covers other nodules than the first run's."""


@dataclasses.dataclass
class Predictions:
    """One run's per-nodule test predictions (predictions.csv)."""
    path: str
    names: tuple[str, ...]
    patients: np.ndarray  # [N] str
    records: np.ndarray  # [N] int
    labels: np.ndarray  # [N] int
    probs: np.ndarray  # [N, K]
    dataset: str | None = None  # the tfds dataset evaluated (metrics.json beside it), None when not recorded


def read_predictions(workdir: str) -> Predictions:
    """The predictions.csv of `workdir` (written by train and eval beside metrics.json)."""
    path = os.path.join(workdir, "predictions.csv")
    if not os.path.isfile(path):
        raise ComparisonError(f"{path}: not found; train the run or evaluate it (`autorad eval --workdir "
                              f"{workdir}`) first.")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0] if rows else []
    if header[:3] != ["patient_id", "record", "label"] or len(header) < 5 or \
            not all(h.startswith("prob_") for h in header[3:]):
        raise ComparisonError(f"{path}: expected the columns patient_id, record, label, prob_<class>...; got "
                              f"{header}.")
    try:
        records = np.array([int(r[1]) for r in rows[1:]], np.int64)
        labels = np.array([int(r[2]) for r in rows[1:]], np.int64)
        probs = np.array([[float(v) for v in r[3:]] for r in rows[1:]], np.float64).reshape(-1, len(header) - 3)
    except (ValueError, IndexError) as e:
        raise ComparisonError(f"{path}: a row is malformed ({e}).") from e
    if not len(labels) or labels.min() < 0 or labels.max() >= probs.shape[1] or not np.isfinite(probs).all():
        raise ComparisonError(f"{path}: no nodules, a label outside 0..{probs.shape[1] - 1} or a non-finite "
                              f"probability.")
    return Predictions(path, tuple(h[len("prob_"):] for h in header[3:]), np.array([r[0] for r in rows[1:]]),
                       records, labels, probs, _dataset(os.path.join(workdir, "metrics.json")))


def _dataset(metrics_path: str) -> str | None:
    """The dataset that metrics.json says was evaluated (None: no file, or written before it was recorded)."""
    if not os.path.isfile(metrics_path):
        return None
    with open(metrics_path) as f:
        return json.load(f).get("dataset")


def is_paired(a: Predictions, b: Predictions) -> bool:
    """Whether A and B are evaluations of one dataset (so of the same nodules); unknown datasets count as one."""
    return a.dataset is None or b.dataset is None or a.dataset == b.dataset


def _check_same_nodules(a: Predictions, b: Predictions) -> None:
    if a.names != b.names:
        raise ComparisonError(f"{b.path}: classes {b.names}, but {a.path} has {a.names}.")
    if len(a.labels) != len(b.labels):
        raise ComparisonError(f"{b.path}: {len(b.labels)} nodules, but {a.path} has {len(a.labels)}; compare "
                              f"evaluations of the same split and label protocol.")
    same = (a.patients == b.patients) & (a.records == b.records) & (a.labels == b.labels)
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        raise ComparisonError(f"{b.path}: row {i + 1} is patient {b.patients[i]} record {b.records[i]} label "
                              f"{b.labels[i]}, but in {a.path} patient {a.patients[i]} record {a.records[i]} label "
                              f"{a.labels[i]}; compare evaluations of the same nodules.")


def paired_differences(a: Predictions, b: Predictions, replicates: int = REPLICATES,
                       seed: int = SEED) -> dict[str, dict]:
    """For each COMPARE_METRICS metric: A's and B's value, B - A, its percentile interval over the paired patient
    resamples, the two-sided bootstrap p-value (twice the smaller share of differences on either side of 0, at most
    1) and how many resamples left the difference undefined."""
    _check_same_nodules(a, b)
    weights = np.vstack([np.ones((1, len(a.labels))), patient_weights(a.patients, replicates, seed)])
    return _differences(weighted_metrics(a.labels, a.probs, weights, a.names),
                        weighted_metrics(b.labels, b.probs, weights, b.names), replicates)


def unpaired_differences(a: Predictions, b: Predictions, replicates: int = REPLICATES,
                         seed: int = SEED) -> dict[str, dict]:
    """As `paired_differences`, for runs on different patients: replicate r compares A on its r-th patient resample
    (drawn with `seed`) with B on its own r-th resample (drawn with `seed + 1`), independent of A's."""
    if a.names != b.names:
        raise ComparisonError(f"{b.path}: classes {b.names}, but {a.path} has {a.names}.")

    def metrics(run: Predictions, run_seed: int) -> dict:
        weights = np.vstack([np.ones((1, len(run.labels))), patient_weights(run.patients, replicates, run_seed)])
        return weighted_metrics(run.labels, run.probs, weights, run.names)
    return _differences(metrics(a, seed), metrics(b, seed + 1), replicates)


def _differences(ma: dict, mb: dict, replicates: int) -> dict[str, dict]:
    """Per COMPARE_METRICS metric, from A's and B's metrics over [the data as it is, replicate 1, ...]."""
    out = {}
    for key in COMPARE_METRICS:
        diff = mb[key] - ma[key]
        reps = diff[1:][~np.isnan(diff[1:])]
        p = min(1.0, 2 * min(np.mean(reps <= 0), np.mean(reps >= 0))) if len(reps) else float("nan")
        out[key] = {"a": float(ma[key][0]), "b": float(mb[key][0]), "difference": float(diff[0]),
                    "ci95": list(percentile_interval(diff[1:])) if not np.isnan(diff[0]) else None,
                    "p_value": float(p) if not np.isnan(diff[0]) else None,
                    "undefined_replicates": int(replicates - len(reps))}
    return out


def format_table(comparison: dict) -> str:
    """Markdown table: one row per (A, B, metric), each saying whether its bootstrap is paired or unpaired."""
    lines = ["| A | B | metric | value A | value B | B - A | 95% CI | p | bootstrap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pair in comparison["pairs"]:
        for key, d in pair["metrics"].items():
            ci = f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else "undefined"
            p = f"{d['p_value']:.3f}" if d["p_value"] is not None else "undefined"
            lines.append(f"| {pair['a']} | {pair['b']} | {key} | {d['a']:.3f} | {d['b']:.3f} | "
                         f"{d['difference']:+.3f} | {ci} | {p} | {'paired' if pair['paired'] else 'UNPAIRED'} |")
    return "\n".join(lines)


def _plot_roc_overlay(runs: dict[str, Predictions], path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, run in runs.items():
        positive = run.labels == len(run.names) - 1
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, run.probs[:, -1])
        ax.plot(fpr, tpr, label=name)
    last = next(iter(runs.values())).names[-1]
    finish_unit_square(fig, ax, path, xlabel="False positive rate", ylabel="True positive rate (sensitivity)",
                       title=f"ROC, {last} vs rest", legend_loc="lower right")


def compare(workdirs: Sequence[str], out: str, replicates: int = REPLICATES, seed: int = SEED) -> dict:
    """Compares every workdir after the first (B) with the first (A): paired on the same test nodules, unpaired when
    the two evaluated different datasets; writes comparison.md, comparison.csv, comparison.json and roc_overlay.png in
    `out` and returns the comparison."""
    if len(workdirs) < 2:
        raise ComparisonError(f"compare needs at least two workdirs, got {list(workdirs)}.")
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(names)) < len(names):  # two workdirs of the same name: use their paths
        names = list(workdirs)
    runs = dict(zip(names, map(read_predictions, workdirs)))
    (name_a, a), *others = runs.items()
    pairs = []
    for name_b, b in others:
        paired = is_paired(a, b)
        differences = paired_differences if paired else unpaired_differences
        pairs.append({"a": name_a, "b": name_b, "paired": paired, "dataset_a": a.dataset, "dataset_b": b.dataset,
                      "nodules_b": int(len(b.labels)), "patients_b": int(len(np.unique(b.patients))),
                      "metrics": differences(a, b, replicates, seed)})
    comparison = {"workdirs": list(workdirs), "nodules": int(len(a.labels)),
                  "patients": int(len(np.unique(a.patients))),
                  "bootstrap": {"unit": "patient", "replicates": replicates, "seed": seed, "level": LEVEL,
                                "paired": all(p["paired"] for p in pairs), "method": "percentile"},
                  "pairs": pairs}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump(comparison, f, indent=1)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(format_table(comparison) + "\n")
    with open(os.path.join(out, "comparison.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "metric", "value_a", "value_b", "difference", "ci95_low", "ci95_high", "p_value",
                         "undefined_replicates", "bootstrap"])
        for pair in pairs:
            for key, d in pair["metrics"].items():
                writer.writerow([pair["a"], pair["b"], key, d["a"], d["b"], d["difference"],
                                 *(d["ci95"] or ["", ""]), "" if d["p_value"] is None else d["p_value"],
                                 d["undefined_replicates"], "paired" if pair["paired"] else "unpaired"])
    _plot_roc_overlay(runs, os.path.join(out, "roc_overlay.png"))
    return comparison
