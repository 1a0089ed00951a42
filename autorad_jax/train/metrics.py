"""Classification metrics of one evaluation pass, computed with scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def one_vs_rest_auc(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """ROC AUC of class k against the rest; NaN when the labels hold only one side."""
    positive = labels == k
    if positive.all() or not positive.any():
        return float("nan")
    return float(skm.roc_auc_score(positive, scores[:, k]))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, ROC AUC (macro and one-vs-rest per class), F1, precision, recall (sensitivity),
    specificity (macro and per class) and the confusion matrix (rows: true class, columns: predicted class)."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    classes = list(range(len(names)))
    pred = probs.argmax(axis=1)
    cm = skm.confusion_matrix(labels, pred, labels=classes)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - cm.sum(axis=1) - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
    per_class = {
        "auc": [one_vs_rest_auc(labels, probs, k) for k in classes],
        "f1": skm.f1_score(labels, pred, labels=classes, average=None, zero_division=0),
        "precision": skm.precision_score(labels, pred, labels=classes, average=None, zero_division=0),
        "recall": skm.recall_score(labels, pred, labels=classes, average=None, zero_division=0),
        "specificity": specificity,
    }
    out = {
        "num_examples": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)),
        "auc_macro": float(np.nanmean(per_class["auc"])) if not np.isnan(per_class["auc"]).all() else float("nan"),
    }
    for metric in ("f1", "precision", "recall", "specificity"):
        out[f"{metric}_macro"] = float(np.mean(per_class[metric]))
    for metric, values in per_class.items():
        for name, v in zip(names, values):
            out[f"{metric}_{name}"] = float(v)
    out["confusion_matrix"] = cm.tolist()
    return out


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The scalar entries of a metrics dict (everything but the confusion matrix)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
