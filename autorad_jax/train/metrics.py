"""Classification, calibration and clinical metrics of one evaluation pass.

Every scalar metric is computed from weighted counts, vectorised over rows of weights (how often each nodule counts):
one row of ones for the data as they are, a thousand rows of resample counts for a bootstrap. Undefined values are
NaN, and `classification_metrics` says why in its "notes". The tests check each metric against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ECE_BINS = 15  # equal-width bins (i/15, (i+1)/15] of the top-class confidence
SPECIFICITIES = (0.90, 0.95)  # sensitivity (malignant vs the rest) is reported at these specificities
DIAMETER_BANDS = ("lt6mm", "6to10mm", "gt10mm")  # <6 mm, 6-10 mm (both ends included), >10 mm
BAND_METRICS = ("num_examples", "accuracy", "balanced_accuracy", "auc_macro", "brier")


def _ratio(num: np.ndarray, den: np.ndarray, undefined: float) -> np.ndarray:
    """num / den, `undefined` where den is 0."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), undefined)


def _sorted_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order sorting `scores` ascending, start of each run of tied scores in that order)."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    return order, np.flatnonzero(np.r_[True, s[1:] != s[:-1]])


def weighted_auc(positive: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties counting one half) of each row of weights w [B, N]; NaN without both sides."""
    if not len(scores):
        return np.full(len(w), np.nan)
    order, starts = _sorted_groups(scores)
    pos = np.add.reduceat((w * positive)[:, order], starts, axis=1)  # [B, G] positive weight per tied score
    neg = np.add.reduceat((w * ~positive)[:, order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    return _ratio((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1), np.nan)


def sensitivity_at_specificity(positive: np.ndarray, scores: np.ndarray, w: np.ndarray,
                               specificity: float) -> np.ndarray:
    """The highest sensitivity of any threshold `score >= t` whose specificity is at least `specificity`, per row of
    w [B, N]; NaN without both sides."""
    if not len(scores):
        return np.full(len(w), np.nan)
    order, starts = _sorted_groups(-scores)  # descending scores: thresholds from the strictest
    tp = np.cumsum(np.add.reduceat((w * positive)[:, order], starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat((w * ~positive)[:, order], starts, axis=1), axis=1)
    p, n = tp[:, -1:], fp[:, -1:]
    tpr, fpr = _ratio(tp, p, np.nan), _ratio(fp, n, np.nan)
    allowed = fpr <= 1.0 - specificity + 1e-12
    best = np.max(np.where(allowed, tpr, 0.0), axis=1)  # the threshold above every score: sensitivity 0
    return np.where((p[:, 0] > 0) & (n[:, 0] > 0), best, np.nan)


def confidence_bins(probs: np.ndarray) -> np.ndarray:
    """Index of the ECE bin of each nodule's top-class confidence."""
    return np.clip(np.ceil(probs.max(axis=1) * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)


def brier_terms(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each nodule's Brier term: (p_positive - y)^2 for two classes (sklearn's brier_score_loss), else the squared
    distance of the probabilities from the one-hot label."""
    if probs.shape[1] == 2:
        return (probs[:, 1] - (labels == 1)) ** 2
    return ((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(axis=1)


def _count_metrics(cm: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Metrics of weighted confusion matrices cm [B, K, K] (rows: true class)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted, total = cm.sum(2), cm.sum(1), cm.sum((1, 2))
    fp, fn = predicted - tp, support - tp
    tn = total[:, None] - tp - fp - fn
    per_class = {"f1": _ratio(2 * tp, support + predicted, 0.0), "precision": _ratio(tp, predicted, 0.0),
                 "recall": _ratio(tp, support, 0.0), "specificity": _ratio(tn, tn + fp, 0.0)}
    k = np.arange(len(names))
    quadratic = (k[:, None] - k[None, :]) ** 2.0
    expected = support[:, :, None] * predicted[:, None, :] / np.where(total > 0, total, 1.0)[:, None, None]
    out = {"num_examples": total,
           "accuracy": _ratio(tp.sum(1), total, np.nan),
           # as sklearn: the mean recall of the classes present
           "balanced_accuracy": _ratio((per_class["recall"] * (support > 0)).sum(1), (support > 0).sum(1), np.nan)}
    out.update({f"{m}_macro": v.mean(1) for m, v in per_class.items()})
    out.update({f"{m}_{name}": v[:, i] for m, v in per_class.items() for i, name in enumerate(names)})
    out["kappa_quadratic"] = 1.0 - _ratio((quadratic * cm).sum((1, 2)), (quadratic * expected).sum((1, 2)), np.nan)
    return out


def weighted_metrics(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray, names: Sequence[str],
                     diameters: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every scalar metric for each row of weights [B, N]: a dict of [B] arrays, NaN where undefined.

    Accuracy, balanced accuracy, ROC AUC (one vs rest per class; macro: their mean, undefined when any is), F1,
    precision, recall, specificity (macro and per class), quadratic-weighted Cohen's kappa, Brier score, expected
    calibration error (ECE_BINS bins), sensitivity of the last class (malignant) vs the rest at SPECIFICITIES, and,
    with `diameters` (mm), BAND_METRICS per DIAMETER_BANDS (keys <metric>_<band>).
    """
    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    num_classes = len(names)
    onehot = np.eye(num_classes)
    out = _count_metrics(np.einsum("bn,nk,nl->bkl", w, onehot[labels], onehot[probs.argmax(1)]), names)
    total = out["num_examples"]
    auc = np.stack([weighted_auc(labels == k, probs[:, k], w) for k in range(num_classes)])
    out["auc_macro"] = auc.mean(0)
    out.update({f"auc_{name}": auc[k] for k, name in enumerate(names)})
    out["brier"] = _ratio(w @ brier_terms(labels, probs), total, np.nan)
    gap = (probs.argmax(1) == labels) - probs.max(1)
    per_bin = w @ (np.eye(ECE_BINS)[confidence_bins(probs)] * gap[:, None])  # [B, bins] sum of (correct - confidence)
    out["ece"] = _ratio(np.abs(per_bin).sum(1), total, np.nan)
    malignant = labels == num_classes - 1
    for spec in SPECIFICITIES:
        out[f"sensitivity_at_specificity_{spec:.2f}"] = sensitivity_at_specificity(
            malignant, probs[:, -1], w, spec)
    if diameters is not None:
        for band, inside in band_masks(diameters).items():
            sub = weighted_metrics(labels[inside], probs[inside], w[:, inside], names)
            out.update({f"{m}_{band}": sub[m] for m in BAND_METRICS})
    return out


def band_masks(diameters: np.ndarray) -> dict[str, np.ndarray]:
    """The nodules of each DIAMETER_BANDS band."""
    d = np.asarray(diameters, np.float64)
    return dict(zip(DIAMETER_BANDS, (d < 6.0, (d >= 6.0) & (d <= 10.0), d > 10.0)))


def _why_undefined(key: str, labels: np.ndarray, names: Sequence[str]) -> str:
    """Why metric `key` is NaN on `labels`."""
    present = [n for k, n in enumerate(names) if np.any(labels == k)]
    if not len(labels):
        return "no nodules"
    if key.startswith("auc_macro"):
        return (f"macro AUC averages the one-vs-rest AUC of every class and the labels hold only "
                f"{', '.join(present)}")
    if key.startswith("auc_"):
        name = key[len("auc_"):]
        return f"the labels hold {'only' if present == [name] else 'no'} {name} nodules"
    if key.startswith("sensitivity_at"):
        return f"needs {names[-1]} and other nodules; the labels hold only {', '.join(present)}"
    if key.startswith("kappa"):
        return "labels and predictions all fall in one class"
    return f"the labels hold only {', '.join(present)}"


def classification_metrics(labels: np.ndarray, probs: np.ndarray, names: Sequence[str],
                           diameters: np.ndarray | None = None) -> dict:
    """The `weighted_metrics` of the data as they are, the confusion matrix (rows: true class, columns: predicted
    class) and "notes": why each undefined (NaN) metric is undefined."""
    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    values = weighted_metrics(labels, probs, np.ones((1, len(labels))), names, diameters)
    out = {k: float(v[0]) for k, v in values.items()}
    out["num_examples"] = int(len(labels))
    masks = band_masks(diameters) if diameters is not None else {}
    for band, inside in masks.items():
        out[f"num_examples_{band}"] = int(inside.sum())
    notes = []
    for key, v in out.items():
        if isinstance(v, float) and np.isnan(v):
            band = next((b for b in masks if key.endswith("_" + b)), None)
            subset = labels[masks[band]] if band else labels
            notes.append(f"{key} is undefined: {_why_undefined(key, subset, names)}"
                         + (f" (diameter band {band})" if band else "") + ".")
    k = len(names)
    out["confusion_matrix"] = np.bincount(labels * k + probs.argmax(1), minlength=k * k).reshape(k, k).tolist()
    out["notes"] = notes
    return out


def reliability(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count) of each ECE bin (NaN for an empty bin): the reliability diagram."""
    bins = np.eye(ECE_BINS)[confidence_bins(probs)]
    count = bins.sum(0)
    correct = probs.argmax(1) == labels
    return _ratio(probs.max(1) @ bins, count, np.nan), _ratio(correct @ bins, count, np.nan), count


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The scalar entries of a metrics dict (everything but the confusion matrix and the notes)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
