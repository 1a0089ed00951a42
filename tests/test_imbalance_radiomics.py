"""Radiomics transforms (against sklearn and numpy, numpy against torch), the shuffled-radiomics ablation, and the
class-imbalance options (weighted and logit-adjusted losses against hand computation, the balanced sampler)."""

import glob
import json
import os
import signal

import numpy as np
import pytest
import torch
from sklearn.preprocessing import QuantileTransformer

from autorad_jax import export
from autorad_jax.data import pipeline
from autorad_jax.errors import ConfigError
from autorad_jax.predict import predict
from autorad_jax.train import steps, trainer
from autorad_jax.weights.torch_model import RadiomicsStandardizer
from configs import autorad_lung
from lidc_testdata import tiny_config
from test_train import losses, saved_state, train_config


def heavy_tailed(n: int, seed: int) -> np.ndarray:
    """[n, 4] features: log-normal, signed Cauchy, a discrete one with many ties, and a constant."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.lognormal(2.0, 1.5, n), rng.standard_cauchy(n) * 100.0,
                     rng.integers(0, 4, n).astype(np.float64), np.full(n, 3.0)], axis=1)


# ------------------------------------------------------------------------------------------------------------------
# Radiomics transforms.
# ------------------------------------------------------------------------------------------------------------------

def test_quantile_transform_matches_sklearn():
    """Normal scores of the training quantiles equal sklearn's QuantileTransformer(output_distribution='normal') fitted
    on the same data, on the training rows and on new rows (some beyond the training range), within 1e-6."""
    train, new = heavy_tailed(300, 0), heavy_tailed(200, 1) * 1.5
    stats = pipeline.RadiomicsStats.fit(train, transform="quantile")
    qt = QuantileTransformer(n_quantiles=101, output_distribution="normal").fit(train)
    assert stats.quantiles.shape == (101, 4)
    for x in (train, new):
        np.testing.assert_allclose(stats.transformed(x), qt.transform(x), atol=1e-6)
    t = qt.transform(train)
    std = np.where(t.std(0) > 1e-12, t.std(0), 1.0)
    np.testing.assert_allclose(stats.apply(new), (qt.transform(new) - t.mean(0)) / std, atol=1e-5)


def test_signed_log_and_none_match_numpy():
    """signed_log: standardised sign(x) log1p(|x|); none: (x - mean) / std of the raw features, as before transforms."""
    train, new = heavy_tailed(100, 0), heavy_tailed(20, 1)
    t = np.sign(train) * np.log1p(np.abs(train))
    std = np.where(t.std(0) > 1e-12, t.std(0), 1.0)
    expected = (np.sign(new) * np.log1p(np.abs(new)) - t.mean(0)) / std
    np.testing.assert_allclose(pipeline.RadiomicsStats.fit(train, "signed_log").apply(new), expected, atol=1e-5)
    none = pipeline.RadiomicsStats.fit(train)
    std = np.where(train.std(0) > 1e-12, train.std(0), 1.0)
    old = ((new.astype(np.float32) - train.mean(0).astype(np.float32)) / std.astype(np.float32)).astype(np.float32)
    np.testing.assert_array_equal(none.apply(new), old)


@pytest.mark.parametrize("transform", ["none", "signed_log", "quantile"])
def test_clip_bounds_standardised_values(transform):
    train, new = heavy_tailed(100, 0), heavy_tailed(50, 1) * 3.0
    free = pipeline.RadiomicsStats.fit(train, transform).apply(new)
    clipped = pipeline.RadiomicsStats.fit(train, transform, clip=1.5).apply(new)
    assert (np.abs(free) > 1.5).any()
    np.testing.assert_array_equal(clipped, np.clip(free, -1.5, 1.5))


@pytest.mark.parametrize("transform,clip", [("none", 0.0), ("signed_log", 2.0), ("quantile", 3.0)])
def test_stats_json_round_trip_and_torch_agree(transform, clip):
    """Statistics survive JSON; the PyTorch standardiser built from that JSON gives the numpy inputs (non-finite
    values included)."""
    train, new = heavy_tailed(150, 0), heavy_tailed(40, 1) * 2.0
    new[0, 1], new[1, 0] = np.nan, np.inf
    stats = pipeline.RadiomicsStats.fit(train, transform, clip)
    d = json.loads(json.dumps(stats.to_json()))
    np.testing.assert_array_equal(pipeline.RadiomicsStats.from_json(d).apply(new), stats.apply(new))
    with torch.no_grad():
        out = RadiomicsStandardizer.from_json(d)(torch.from_numpy(new.astype(np.float32))).numpy()
    np.testing.assert_allclose(out, stats.apply(new.astype(np.float32)), atol=2e-5)


def test_old_stats_json_loads_as_none():
    """A checkpoint's statistics from before transforms ({'mean', 'std'}) load as transform 'none' without clipping,
    in numpy and torch."""
    d = {"mean": [1.0, -2.0], "std": [2.0, 0.5]}
    stats = pipeline.RadiomicsStats.from_json(d)
    assert (stats.transform, stats.clip, stats.quantiles) == ("none", 0.0, None)
    x = np.array([[3.0, 10.0], [np.nan, -2.0]], np.float32)
    np.testing.assert_array_equal(stats.apply(x), [[1.0, 24.0], [0.0, 0.0]])
    np.testing.assert_array_equal(RadiomicsStandardizer.from_json(d)(torch.from_numpy(x)).numpy(), stats.apply(x))


@pytest.mark.parametrize("key,value", [("radiomics_transform", "log"), ("radiomics_clip", -1.0)])
def test_bad_radiomics_config_names_the_key(key, value):
    data = autorad_lung.get_config("tiny").data
    data[key] = value
    with pytest.raises(ConfigError, match=f"config.data.{key}"):
        pipeline.RadiomicsStats.from_config(data, heavy_tailed(10, 0))


# ------------------------------------------------------------------------------------------------------------------
# Shuffled-radiomics ablation.
# ------------------------------------------------------------------------------------------------------------------

def test_shuffled_radiomics_permute_rows_only(lidc_data):
    """Each split keeps its multiset of radiomics rows, but assigned to other nodules, fixed by the seed; labels,
    views and patients are untouched. (The demo's training split has 8 distinct rows.)"""
    plain = tiny_config(lidc_data)
    for split in pipeline.SPLITS:
        base = pipeline.records(plain.data, split)
        runs = {}
        for seed in (0, 0, 1):
            config = tiny_config(lidc_data, shuffle_radiomics=True)
            config.seed = seed
            runs.setdefault(seed, []).append(pipeline.records(config.data, split))
        shuffled = runs[0][0]
        np.testing.assert_array_equal(shuffled.labels, base.labels)
        np.testing.assert_array_equal(shuffled.views, base.views)
        np.testing.assert_array_equal(shuffled.patients, base.patients)
        rows = lambda r: sorted(map(tuple, r.radiomics.tolist()))  # noqa: E731
        assert rows(shuffled) == rows(base)
        np.testing.assert_array_equal(runs[0][1].radiomics, shuffled.radiomics)
        if len(base) > 2:  # (the demo's validation and test splits hold one nodule each)
            assert not np.array_equal(shuffled.radiomics, base.radiomics)
            assert not np.array_equal(runs[1][0].radiomics, shuffled.radiomics)


# ------------------------------------------------------------------------------------------------------------------
# Class imbalance.
# ------------------------------------------------------------------------------------------------------------------

def softmax_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy by hand (float64)."""
    z = logits - logits.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]


def loss_inputs():
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, 3)).astype(np.float32) * 3, np.array([0, 0, 0, 0, 1, 2, 2]), np.array([60, 30, 10])


def test_balanced_class_weights_loss_is_the_weighted_mean():
    logits, labels, counts = loss_inputs()
    train = autorad_lung.get_config("tiny").train
    train.class_weights = "balanced"
    options = steps.loss_options(train, counts)
    np.testing.assert_allclose(options.class_weights, 100 / (3 * counts), rtol=1e-6)
    assert options.logit_offset is None
    w = (100 / (3 * counts))[labels]
    expected = (w * softmax_ce(logits.astype(np.float64), labels)).sum() / w.sum()
    loss, _ = steps.loss_and_metrics(logits, labels, options)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(steps.loss_and_metrics(logits, labels)[0]),
                               softmax_ce(logits.astype(np.float64), labels).mean(), rtol=1e-5)


def test_logit_adjusted_loss_adds_tau_log_prior_and_accuracy_reads_plain_logits():
    logits, labels, counts = loss_inputs()
    train = autorad_lung.get_config("tiny").train
    train.logit_adjustment_tau = 1.5
    options = steps.loss_options(train, counts)
    assert options.class_weights is None
    shifted = logits.astype(np.float64) + 1.5 * np.log(counts / counts.sum())
    loss, metrics = steps.loss_and_metrics(logits, labels, options)
    np.testing.assert_allclose(float(loss), softmax_ce(shifted, labels).mean(), rtol=1e-5)
    assert (shifted.argmax(-1) != logits.argmax(-1)).any()  # the check below can tell the two apart
    np.testing.assert_allclose(float(metrics["accuracy"]), (logits.argmax(-1) == labels).mean())


@pytest.mark.parametrize("key,value", [("class_weights", "inverse"), ("logit_adjustment_tau", -1.0)])
def test_bad_imbalance_config_names_the_key(key, value):
    train = autorad_lung.get_config("tiny").train
    train[key] = value
    with pytest.raises(ConfigError, match=f"config.train.{key}"):
        steps.loss_options(train, np.array([3, 2, 1]))


def test_balanced_sampler_draws_classes_uniformly_and_is_fixed_by_its_seed():
    """Over many draws each class's frequency is 1/3 within 4 binomial standard deviations (so is each minority
    record's 1/(3 n_c)); the same seed gives the same draws, another seed others."""
    labels = np.array([0] * 50 + [1] * 10 + [2] * 5)
    draws = 30_000
    sampler = pipeline.EpochSampler(len(labels), 7, labels)
    keys = np.array([sampler[k].record_key for k in range(draws)])
    freq = np.bincount(labels[keys], minlength=3) / draws
    np.testing.assert_allclose(freq, 1 / 3, atol=4 * np.sqrt((1 / 3) * (2 / 3) / draws))
    p = 1 / 15
    np.testing.assert_allclose(np.bincount(keys, minlength=65)[60:] / draws, p, atol=4 * np.sqrt(p * (1 - p) / draws))
    again = pipeline.EpochSampler(len(labels), 7, labels)
    assert [again[k].record_key for k in range(500)] == keys[:500].tolist()
    other = pipeline.EpochSampler(len(labels), 8, labels)
    assert [other[k].record_key for k in range(500)] != keys[:500].tolist()


# ------------------------------------------------------------------------------------------------------------------
# Short training runs with the options: both predict backends agree; resuming stays bitwise.
# ------------------------------------------------------------------------------------------------------------------

OPTIONS = {
    "signed_log_balanced": dict(data=dict(radiomics_transform="signed_log", balanced_sampling=True),
                                train=dict(class_weights="balanced")),
    "quantile_clip_adjusted_shuffled": dict(data=dict(radiomics_transform="quantile", radiomics_clip=3.0,
                                                      shuffle_radiomics=True),
                                            train=dict(logit_adjustment_tau=1.0)),
}


def options_config(lidc_data: str, name: str):
    config = train_config(lidc_data)
    config.data.update(OPTIONS[name]["data"])
    config.train.update(OPTIONS[name]["train"])
    return config


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def trained_with(request, lidc_data, tmp_path_factory):
    """(option set name, config, workdir, result) of a 6-step run of the tiny config with the option set."""
    workdir = str(tmp_path_factory.mktemp(request.param))
    config = options_config(lidc_data, request.param)
    return request.param, config, workdir, trainer.train_and_evaluate(config, workdir)


def test_training_with_options_and_predict_backends_agree(trained_with, lidc_data, tmp_path):
    """The run finishes with finite losses and saves its transform; `predict` on one scan through the workdir (JAX)
    and through the export (PyTorch) gives the same probabilities."""
    name, config, workdir, result = trained_with
    assert result["step"] == 6 and np.isfinite(losses(workdir)).all()
    out = export.export(workdir, str(tmp_path / "export"))
    with open(os.path.join(out, "autorad_lung.json")) as f:
        assert json.load(f)["radiomics"]["transform"] == config.data.radiomics_transform
    series_dir = sorted(glob.glob(os.path.join(os.path.dirname(lidc_data), "scans", "*", "*", "*")))[0]
    xml = glob.glob(os.path.join(series_dir, "*.xml"))[0]
    jax_result = predict(ct=series_dir, xml=xml, backend="jax", workdir=workdir)
    torch_result = predict(ct=series_dir, xml=xml, backend="torch", export_dir=out)
    assert jax_result["nodules"]
    for a, b in zip(jax_result["nodules"], torch_result["nodules"], strict=True):
        np.testing.assert_allclose(list(b["probabilities"].values()), list(a["probabilities"].values()), atol=1e-5)


@pytest.mark.parametrize("trained_with", ["signed_log_balanced"], indirect=True)  # the options that hold state
def test_resume_is_bitwise_with_the_options(trained_with, tmp_path, monkeypatch):
    """A run preempted at step 3 and resumed logs the losses and saves the state of the uninterrupted run (the
    balanced sampler's position, the loss constants and the transform's statistics come back)."""
    name, config, workdir, _ = trained_with
    reached = trainer._Preemption.reached

    def sigterm_at_step_3(self, step, manager):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return reached(self, step, manager)

    monkeypatch.setattr(trainer._Preemption, "reached", sigterm_at_step_3)
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"step": 3, "preempted": True}
    monkeypatch.setattr(trainer._Preemption, "reached", reached)
    assert trainer.train_and_evaluate(config, str(tmp_path))["step"] == 6
    assert losses(str(tmp_path)) == losses(workdir)
    for a, b in zip(saved_state(str(tmp_path), 6), saved_state(workdir, 6)):
        np.testing.assert_array_equal(a, b)
