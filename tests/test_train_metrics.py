"""Evaluation metrics and reports against independent numpy computations."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from autorad_jax.train.metrics import classification_metrics
from autorad_jax.train.reports import write_report
from fault_checks import ROOT


def pairwise_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("num_classes", [2, 3])
def test_metrics_match_numpy(num_classes):
    rng = np.random.default_rng(num_classes)
    n = 200
    labels = rng.integers(num_classes, size=n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:10] = np.round(probs[:10], 1)  # some ties
    names = ["benign", "unsure", "malignant"][:num_classes]
    m = classification_metrics(labels, probs, names)

    pred = probs.argmax(1)
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=range(num_classes)).tolist()
    assert m["accuracy"] == pytest.approx(np.mean(pred == labels))
    recall = [np.mean(pred[labels == k] == k) for k in range(num_classes)]
    precision = [np.mean(labels[pred == k] == k) for k in range(num_classes)]
    specificity = [np.mean(pred[labels != k] != k) for k in range(num_classes)]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    auc = [pairwise_auc(labels == k, probs[:, k]) for k in range(num_classes)]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert m["auc_macro"] == pytest.approx(np.mean(auc))
    for k, name in enumerate(names):
        assert m[f"recall_{name}"] == pytest.approx(recall[k])
        assert m[f"precision_{name}"] == pytest.approx(precision[k])
        assert m[f"specificity_{name}"] == pytest.approx(specificity[k])
        assert m[f"f1_{name}"] == pytest.approx(f1[k])
        assert m[f"auc_{name}"] == pytest.approx(auc[k])
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    assert m["specificity_macro"] == pytest.approx(np.mean(specificity))


def test_auc_of_an_absent_class_is_nan_not_an_error_and_macro_auc_says_so():
    labels = np.array([0, 0, 2, 2])
    probs = np.array([[.8, .1, .1], [.6, .2, .2], [.2, .2, .6], [.1, .1, .8]])
    m = classification_metrics(labels, probs, ["benign", "unsure", "malignant"])
    assert np.isnan(m["auc_unsure"]) and m["auc_benign"] == m["auc_malignant"] == 1.0
    assert np.isnan(m["auc_macro"])  # never the mean of the classes that happen to occur
    assert any(n.startswith("auc_macro is undefined") and "benign, malignant" in n for n in m["notes"])
    assert any(n.startswith("auc_unsure is undefined") and "no unsure" in n for n in m["notes"])


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(3, size=50)
    probs = rng.dirichlet(np.ones(3), size=50)
    names = ["benign", "unsure", "malignant"]
    m = classification_metrics(labels, probs, names)
    patients = np.arange(50) // 2
    write_report(str(tmp_path), m, labels, probs, names, patients, info={"split": "test", "step": 7})
    assert sorted(os.listdir(tmp_path)) == ["confusion.png", "metrics.csv", "metrics.json", "predictions.csv",
                                            "reliability.png", "roc.png"]
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["step"] == 7 and saved["accuracy"] == m["accuracy"]
    rows = open(tmp_path / "metrics.csv").read().splitlines()
    assert rows[0] == "metric,value,ci95_low,ci95_high" and any(r.startswith("auc_macro,") for r in rows)
    predictions = np.genfromtxt(tmp_path / "predictions.csv", delimiter=",", names=True)
    np.testing.assert_array_equal(predictions["patient_id"], patients)
    np.testing.assert_array_equal(predictions["label"], labels)
    np.testing.assert_allclose(predictions["prob_unsure"], probs[:, 1])


def test_mfu_uses_the_device_peak_only_when_known():
    from autorad_jax.train import perf

    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert perf.peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert perf.peak_flops(Device("TPU v5 lite")) == 197e12
    assert perf.peak_flops(Device("cpu")) is None
    assert perf.throughput(2e12, 0.5, 989e12) == pytest.approx({"tflops_per_device": 4.0, "mfu": 4e12 / 989e12})
    assert perf.throughput(2e12, 0.5, None) == pytest.approx({"tflops_per_device": 4.0})


def read_scalars(events_dir) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of the scalar summaries in a TensorBoard events file, read record by record (8-byte length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2
    (name,) = os.listdir(events_dir)
    data, scalars, pos = open(os.path.join(events_dir, name), "rb").read(), {}, 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 16 + length
        for value in event.summary.value:
            scalars[value.tag, event.step] = value.simple_value
    return scalars


def test_metric_writer_logs_scalars_without_importing_pytorch(tmp_path):
    code = ("import sys; from autorad_jax.train.metric_writer import MetricWriter; "
            "w = MetricWriter(sys.argv[1], True); w.write(3, {'loss': 0.25, 'auc': float('nan')}, prefix='train', "
            "jsonl='train'); w.write(4, {'loss': 0.125}, prefix='train'); w.close(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT)
    assert read_scalars(tmp_path / "tensorboard") == {("train/loss", 3): 0.25, ("train/loss", 4): 0.125}
    assert [json.loads(line)["loss"] for line in open(tmp_path / "train.jsonl")] == [0.25]
