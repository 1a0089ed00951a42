"""Evaluation reports: metrics JSON and CSV (with 95% intervals), per-nodule predictions CSV, ROC-curve,
confusion-matrix and reliability-diagram PNGs (written by process 0 only)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from autorad_jax.train.metrics import ECE_BINS, reliability, scalar_metrics  # noqa: E402


def finish_unit_square(fig, ax, path: str, *, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """Draws the diagonal of a [0, 1]^2 plot (ROC, reliability), labels it, adds the legend when something is labelled
    and saves the figure as a PNG."""
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=title)
    if ax.get_legend_handles_labels()[0]:  # no curve when the nodules hold only one side
        ax.legend(loc=legend_loc)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Writes `fig` as a 100-dpi PNG and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_roc(labels: np.ndarray, probs: np.ndarray, names: Sequence[str], metrics: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for k, name in enumerate(names):
        positive = labels == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics[f'auc_{name}']:.3f})")
    finish_unit_square(fig, ax, path, xlabel="False positive rate", ylabel="True positive rate (sensitivity)",
                       title=f"ROC, one vs rest (macro AUC {metrics['auc_macro']:.3f})", legend_loc="lower right")


def _plot_confusion(cm: np.ndarray, names: Sequence[str], path: str) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="Predicted", ylabel="True", title="Confusion matrix")
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def _plot_reliability(labels: np.ndarray, probs: np.ndarray, metrics: dict, path: str) -> None:
    confidence, accuracy, count = reliability(labels, probs)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(edges[:-1], np.nan_to_num(accuracy), width=1 / ECE_BINS, align="edge", edgecolor="k", alpha=0.7,
           label="accuracy")
    ax.plot(confidence[count > 0], accuracy[count > 0], "o", color="C1", label="mean confidence")
    for x, a, c in zip(edges[:-1], accuracy, count):
        if c:
            ax.text(x + 0.5 / ECE_BINS, min(a, 0.9) + 0.02, str(int(c)), ha="center", fontsize=7)
    finish_unit_square(fig, ax, path, xlabel="Top-class confidence", ylabel="Accuracy",
                       title=f"Reliability, {ECE_BINS} bins (ECE {metrics['ece']:.3f})", legend_loc="upper left")


def write_predictions(path: str, labels: np.ndarray, probs: np.ndarray, names: Sequence[str],
                      patients: np.ndarray) -> None:
    """predictions.csv: patient_id, record (index in the split's records), label (class index), prob_<class>..."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "record", "label", *(f"prob_{n}" for n in names)])
        writer.writerows([str(p), i, int(y), *map(float, row)]
                         for i, (p, y, row) in enumerate(zip(patients, labels, probs)))


def write_report(out_dir: str, metrics: dict, labels: np.ndarray, probs: np.ndarray, names: Sequence[str],
                 patients: np.ndarray, info: dict) -> None:
    """Writes metrics.json (metrics plus `info`: split, step, ...), metrics.csv (value and 95% interval),
    predictions.csv, roc.png, confusion.png and reliability.png."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({**info, **metrics}, f, indent=1)
    ci = metrics.get("ci95", {})
    with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "value", "ci95_low", "ci95_high"])
        writer.writerows([k, v, *(ci.get(k) or ["", ""])] for k, v in scalar_metrics(metrics).items())
    write_predictions(os.path.join(out_dir, "predictions.csv"), labels, probs, names, patients)
    _plot_reliability(np.asarray(labels), np.asarray(probs), metrics, os.path.join(out_dir, "reliability.png"))
    _plot_roc(np.asarray(labels), np.asarray(probs), names, metrics, os.path.join(out_dir, "roc.png"))
    _plot_confusion(np.asarray(metrics["confusion_matrix"]), names, os.path.join(out_dir, "confusion.png"))
