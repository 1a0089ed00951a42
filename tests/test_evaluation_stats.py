"""Calibration, clinical metrics, patient bootstrap intervals and paired comparisons against independent references
(scikit-learn, hand-worked cases, brute-force resampling loops)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from autorad_jax.train.metrics import classification_metrics, weighted_metrics

NAMES3 = ["benign", "unsure", "malignant"]


def random_case(n: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(num_classes, size=n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:8] = np.round(probs[:8], 1)  # ties
    probs /= probs.sum(1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("num_classes", [2, 3])
def test_brier_and_kappa_match_sklearn(num_classes):
    labels, probs = random_case(120, num_classes, seed=num_classes)
    m = classification_metrics(labels, probs, NAMES3[-num_classes:])
    if num_classes == 2:
        assert m["brier"] == pytest.approx(skm.brier_score_loss(labels, probs[:, 1]))
    else:
        assert m["brier"] == pytest.approx(np.mean([np.sum((p - np.eye(3)[y]) ** 2) for y, p in zip(labels, probs)]))
    kappa = skm.cohen_kappa_score(labels, probs.argmax(1), weights="quadratic", labels=range(num_classes))
    assert m["kappa_quadratic"] == pytest.approx(kappa)


def test_integer_weights_are_duplicated_nodules():
    labels, probs = random_case(40, 3, seed=5)
    counts = np.random.default_rng(1).integers(0, 4, size=40)
    weighted = weighted_metrics(labels, probs, counts[None], NAMES3)
    idx = np.repeat(np.arange(40), counts)
    dup = classification_metrics(labels[idx], probs[idx], NAMES3)
    for k in ("accuracy", "balanced_accuracy", "auc_macro", "auc_unsure", "f1_macro", "precision_benign",
              "recall_malignant", "specificity_unsure", "kappa_quadratic", "brier", "ece"):
        assert weighted[k][0] == pytest.approx(dup[k]), k
    for k in range(3):
        assert dup[f"auc_{NAMES3[k]}"] == pytest.approx(skm.roc_auc_score(labels[idx] == k, probs[idx, k]))
    assert dup["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels[idx], probs[idx].argmax(1)))


def test_ece_by_hand():
    # Top-class confidences 0.9, 0.9, 0.6, 0.55, 0.8 fall in 15 right-closed bins: 0.9 * 15 = 13.5 -> bin 13,
    # 0.6 * 15 = 9 -> bin 8 (its right edge), 0.55 * 15 = 8.25 -> bin 8, 0.8 * 15 = 12 -> bin 11 (its right edge),
    # 0.75 * 15 = 11.25 -> bin 11.
    probs = np.array([[.9, .1], [.1, .9], [.6, .4], [.45, .55], [.2, .8], [.25, .75]])
    labels = np.array([0, 0, 0, 1, 0, 1])  # correct, wrong, correct, correct, wrong, correct
    bin13 = abs((1 + 0) - (.9 + .9))
    bin8 = abs((1 + 1) - (.6 + .55))
    bin11 = abs((0 + 1) - (.8 + .75))
    m = classification_metrics(labels, probs, ["benign", "malignant"])
    assert m["ece"] == pytest.approx((bin13 + bin8 + bin11) / 6)


def test_sensitivity_at_specificity_on_a_hand_worked_roc():
    # 10 negatives scored 0.0 .. 0.9, 4 positives scored 0.95, 0.85, 0.55, 0.05.
    neg = np.arange(10) / 10
    pos = np.array([.95, .85, .55, .05])
    scores = np.r_[neg, pos]
    labels = np.r_[np.zeros(10, int), np.ones(4, int)]
    probs = np.stack([1 - scores, scores], 1)
    m = classification_metrics(labels, probs, ["benign", "malignant"])
    # specificity >= 0.90 allows one false positive (threshold 0.85 keeps 0.9 -> FP 1): TP = 0.95, 0.85 -> 2/4
    assert m["sensitivity_at_specificity_0.90"] == 0.5
    # specificity >= 0.95 allows none: threshold 0.95 -> 1/4
    assert m["sensitivity_at_specificity_0.95"] == 0.25
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert m["sensitivity_at_specificity_0.90"] == tpr[fpr <= 0.1].max()


def test_three_class_sensitivity_is_malignant_vs_rest():
    labels, probs = random_case(60, 3, seed=9)
    m = classification_metrics(labels, probs, NAMES3)
    fpr, tpr, _ = skm.roc_curve(labels == 2, probs[:, 2], drop_intermediate=False)
    assert m["sensitivity_at_specificity_0.95"] == pytest.approx(tpr[fpr <= 0.05 + 1e-12].max())


def test_diameter_bands():
    labels, probs = random_case(90, 2, seed=3)
    diameters = np.r_[np.full(30, 4.0), np.full(30, 6.0), np.full(20, 10.0), np.full(10, 12.5)]
    m = classification_metrics(labels, probs, ["benign", "malignant"], diameters)
    for band, sl in (("lt6mm", slice(0, 30)), ("6to10mm", slice(30, 80)), ("gt10mm", slice(80, 90))):
        assert m[f"num_examples_{band}"] == sl.stop - sl.start
        assert m[f"accuracy_{band}"] == pytest.approx(np.mean(probs[sl].argmax(1) == labels[sl]))
        assert m[f"auc_macro_{band}"] == pytest.approx(skm.roc_auc_score(labels[sl], probs[sl, 1]))
