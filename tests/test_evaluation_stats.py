"""Calibration, clinical metrics, patient bootstrap intervals and paired comparisons against independent references
(scikit-learn, hand-worked cases, brute-force resampling loops)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from autorad_jax.train import bootstrap, compare
from autorad_jax.train.metrics import classification_metrics, weighted_metrics
from autorad_jax.train.reports import write_predictions
from fault_checks import ROOT

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
    small = classification_metrics(labels[:30], probs[:30], ["benign", "malignant"], diameters[:30])
    assert small["num_examples_gt10mm"] == 0 and np.isnan(small["accuracy_gt10mm"])
    assert any(n.startswith("auc_macro_gt10mm is undefined: no nodules") for n in small["notes"])


def test_a_perfectly_separable_case_has_a_degenerate_interval_at_one():
    labels = np.array([0, 1, 1, 0, 0, 1, 1, 0])
    probs = np.stack([1 - (labels * 0.6 + 0.2), labels * 0.6 + 0.2], 1)
    m = bootstrap.evaluation_metrics(labels, probs, ["benign", "malignant"], np.arange(8) // 2, replicates=200)
    assert m["auc_macro"] == 1.0 and m["ci95"]["auc_macro"] == [1.0, 1.0]
    assert m["ci95"]["accuracy"] == [1.0, 1.0]
    # 4 patients of one benign and one malignant nodule each: every resample holds both classes
    assert m["bootstrap"]["undefined_replicates"] == {}


def test_clustered_patients_widen_the_interval():
    labels, probs = random_case(20, 2, seed=11)
    copies = 5  # every nodule five times within its patient: 20 patients, 100 nodules
    labels, probs = np.repeat(labels, copies), np.repeat(probs, copies, axis=0)
    by_patient = np.repeat(np.arange(20), copies)
    names = ["benign", "malignant"]
    patient = bootstrap.evaluation_metrics(labels, probs, names, by_patient)["ci95"]
    nodule = bootstrap.evaluation_metrics(labels, probs, names, np.arange(100))["ci95"]
    for key in ("auc_macro", "accuracy", "brier"):
        assert np.diff(patient[key])[0] > 1.5 * np.diff(nodule[key])[0], key  # about sqrt(5) wider


def test_percentile_interval_equals_a_brute_force_loop_over_explicit_resamples():
    patients = np.array(["p3", "p1", "p1", "p2", "p4", "p4", "p4", "p5", "p6", "p2"])
    labels = np.array([0, 1, 1, 1, 1, 0, 0, 1, 0, 1])  # p1, p2, p5 malignant only; p3, p6 benign only
    scores = np.array([.2, .7, .4, .6, .9, .1, .55, .3, .35, .6])
    probs = np.stack([1 - scores, scores], 1)
    replicates, seed = 300, 7
    m = bootstrap.evaluation_metrics(labels, probs, ["benign", "malignant"], patients, replicates=replicates,
                                     seed=seed)
    ids = sorted(set(patients))
    draws = np.random.default_rng(seed).integers(len(ids), size=(replicates, len(ids)))
    auc, acc, brier = [], [], []
    for row in draws:
        idx = np.concatenate([np.flatnonzero(patients == ids[d]) for d in row])
        y, s = labels[idx], scores[idx]
        acc.append(np.mean((s > 0.5) == y))
        brier.append(skm.brier_score_loss(y, s))
        if 0 < y.sum() < len(y):
            auc.append(skm.roc_auc_score(y, s))
    assert m["ci95"]["auc_macro"] == pytest.approx(list(np.percentile(auc, [2.5, 97.5])))
    assert m["ci95"]["accuracy"] == pytest.approx(list(np.percentile(acc, [2.5, 97.5])))
    assert m["ci95"]["brier"] == pytest.approx(list(np.percentile(brier, [2.5, 97.5])))
    missing = replicates - len(auc)
    assert missing > 0 and m["bootstrap"]["undefined_replicates"]["auc_macro"] == missing
    assert any(n.startswith(f"auc_macro: undefined in {missing} of {replicates}") for n in m["notes"])


def test_an_undefined_metric_has_no_interval():
    labels = np.array([0, 0, 2, 2, 0, 2])
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=6)
    m = bootstrap.evaluation_metrics(labels, probs, NAMES3, np.arange(6), replicates=50)
    assert np.isnan(m["auc_macro"]) and m["ci95"]["auc_macro"] is None
    assert m["bootstrap"]["undefined_replicates"]["auc_macro"] == 50
    assert m["ci95"]["auc_benign"] is not None


def write_run(root, name, labels, probs, patients, names=("benign", "malignant")):
    workdir = root / name
    workdir.mkdir()
    write_predictions(str(workdir / "predictions.csv"), labels, probs, names, patients)
    return str(workdir)


def test_a_model_compared_with_itself_differs_by_exactly_zero(tmp_path):
    labels, probs = random_case(40, 2, seed=2)
    patients = np.arange(40) // 3
    a = write_run(tmp_path, "a", labels, probs, patients)
    b = write_run(tmp_path, "b", labels, probs, patients)
    result = compare.compare([a, b], str(tmp_path / "out"), replicates=200)
    for key, d in result["pairs"][0]["metrics"].items():
        assert d["difference"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["p_value"] == 1.0, key
    assert sorted(os.listdir(tmp_path / "out")) == ["comparison.csv", "comparison.json", "comparison.md",
                                                    "roc_overlay.png"]


def test_paired_difference_equals_a_brute_force_loop(tmp_path):
    labels, probs_a = random_case(30, 2, seed=4)
    probs_b = np.clip(probs_a + np.random.default_rng(0).normal(0, 0.2, probs_a.shape), 0.01, None)
    probs_b /= probs_b.sum(1, keepdims=True)
    patients = np.array([f"LIDC-IDRI-{i // 2:04d}" for i in range(30)])  # sorted ids: patient p is ids[p]
    a = write_run(tmp_path, "a", labels, probs_a, patients)
    b = write_run(tmp_path, "b", labels, probs_b, patients)
    d = compare.compare([a, b], str(tmp_path / "out"), replicates=150, seed=3)["pairs"][0]["metrics"]["brier"]
    draws = np.random.default_rng(3).integers(15, size=(150, 15))
    diffs = []
    for row in draws:
        idx = np.concatenate([np.flatnonzero(patients == f"LIDC-IDRI-{p:04d}") for p in row])
        diffs.append(skm.brier_score_loss(labels[idx], probs_b[idx, 1]) -
                     skm.brier_score_loss(labels[idx], probs_a[idx, 1]))
    diffs = np.array(diffs)
    assert d["difference"] == pytest.approx(skm.brier_score_loss(labels, probs_b[:, 1]) -
                                            skm.brier_score_loss(labels, probs_a[:, 1]))
    assert d["ci95"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))
    assert d["p_value"] == pytest.approx(min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))))


def test_compare_names_the_file_that_covers_other_nodules(tmp_path):
    labels, probs = random_case(10, 2, seed=1)
    a = write_run(tmp_path, "a", labels, probs, np.arange(10))
    b = write_run(tmp_path, "b", labels, probs, np.arange(10) + 100)
    with pytest.raises(compare.ComparisonError,
                       match=r"b/predictions.csv: row 1 is patient 100 record 0 label .*in .*a/predictions.csv patient 0"):
        compare.compare([a, b], str(tmp_path / "out"), replicates=10)
    with pytest.raises(compare.ComparisonError, match=r"missing/predictions.csv: not found"):
        compare.compare([a, str(tmp_path / "missing")], str(tmp_path / "out"), replicates=10)


def test_compare_command(tmp_path):
    labels, probs = random_case(20, 2, seed=6)
    a = write_run(tmp_path, "a", labels, probs, np.arange(20) // 2)
    b = write_run(tmp_path, "b", labels, probs[:, ::-1], np.arange(20) // 2)
    ok = subprocess.run([sys.executable, "run.py", "compare", a, "--workdirs", b, "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    auc = skm.roc_auc_score(labels, probs[:, 1])
    assert f"| a | b | auc_macro | {auc:.3f} | {1 - auc:.3f} | {1 - 2 * auc:+.3f} |" in ok.stdout


def test_cv_summary_uses_the_sample_std_and_names_undefined_folds(tmp_path):
    from autorad_jax.train import cv
    aucs = [0.7, float("nan"), 0.8, 0.9, 0.6]
    folds = [{**{k: 0.5 + 0.01 * i for k in cv.SUMMARY_METRICS}, "auc_macro": a, "cv_fold": i}
             for i, a in enumerate(aucs)]
    summary = cv.summarize(folds)
    assert summary["auc_macro"]["mean"] == pytest.approx(0.75)
    assert summary["auc_macro"]["std"] == pytest.approx(np.sqrt((0.05 ** 2 * 2 + 0.15 ** 2 * 2) / 3))  # ddof=1
    assert summary["auc_macro"]["undefined_folds"] == [1] and summary["auc_macro"]["folds"] == 4
    assert summary["accuracy"]["std"] == pytest.approx(np.sqrt(sum((0.01 * i - 0.02) ** 2 for i in range(5)) / 4))
    table = cv.format_table({"coop": summary})
    assert "coop auc_macro: undefined in fold 1; mean ± std over the other 4 folds." in table
    cv._write(str(tmp_path), {"coop": summary}, {"coop": folds}, {})
    rows = open(tmp_path / "cv_folds.csv").read().splitlines()
    assert len(rows) == 1 + 5 and rows[2].startswith("coop,0,1,0.51,,,") and rows[2].split(",")[9] == "nan"
    assert len(open(tmp_path / "cv_folds.md").read().splitlines()) == 2 + 5
