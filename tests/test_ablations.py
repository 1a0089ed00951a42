"""The ablations (cocoop, late_fusion, zero_shot) and the convex logistic regression: what each computes, and each
through train, eval and cross-validation."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from autorad_jax import export, models
from autorad_jax.data import pipeline
from autorad_jax.data.tokenizer import load_tokenizer
from autorad_jax.errors import ConfigError
from autorad_jax.models.autorad_lung import l2_normalize
from autorad_jax.models.baselines import RadiomicsLogReg
from autorad_jax.train import checkpointing, convex_fit, cv, experiment, trainer
from autorad_jax.weights.torch_model import ExportFolderError
import test_export as export_test
from compiled import forward
from lidc_testdata import read_predictions, tiny_config
from test_model_baselines import BATCH, CLASS_NAMES, NUM_RADIOMICS, build, spec_of
from test_model_baselines import tiny_config as tiny_model_config

ABLATIONS = ("cocoop", "late_fusion", "zero_shot", "radiomics_logreg")


def run_config(data_dir: str, name: str, num_steps: int = 2):
    config = tiny_config(data_dir, batch_size=8, eval_batch_size=8)
    config.model.name = name
    config.train.update(num_steps=num_steps, log_every=1, eval_every=num_steps, checkpoint_every=num_steps)
    return config


@pytest.fixture(scope="module")
def trained(lidc_data, tmp_path_factory) -> dict:
    """name -> (config, workdir, result) of a short run of each ablation."""
    out = {}
    for name in ABLATIONS:
        workdir = str(tmp_path_factory.mktemp(name))
        config = run_config(lidc_data, name)
        out[name] = (config, workdir, trainer.train_and_evaluate(config, workdir))
    return out


def inputs(seed: int = 3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (BATCH, 28, 28, 3)), jax.random.normal(k2, (BATCH, NUM_RADIOMICS))


def macro_auc_of(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes; NaN when a class is absent (or alone) in the labels."""
    if any(not 0 < np.sum(labels == k) < len(labels) for k in range(probs.shape[1])):
        return float("nan")
    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in range(probs.shape[1])]))


# ---- What each model computes -------------------------------------------------------------------------------------

def test_cocoop_prompts_follow_the_normalised_image_feature_not_the_radiomics():
    model = build(tiny_model_config(name="cocoop"))
    images, radiomics = inputs()
    logits, aux = forward(model, images, radiomics)

    @nnx.jit
    def class_features(model, images):
        image = l2_normalize(model.aimv2.get_image_features(images))
        learner = model.prompt_learner
        shift = learner.meta_net.linear2(jax.nn.relu(learner.meta_net.linear1(image)))
        return l2_normalize(model.text_features(learner.construct_prompts(learner.ctx[...][None] + shift[:, None])))

    text = class_features(model, images)
    np.testing.assert_allclose(aux["text_features"], text, atol=1e-5)
    assert np.abs(np.diff(np.asarray(text), axis=0)).max() > 1e-4  # each image has its own class features
    np.testing.assert_allclose(forward(model, images, radiomics * 10.0 + 3.0)[0], logits, atol=0)
    assert model.prompt_learner.meta_net.linear1.in_features == model.aimv2.config.projection_dim


def test_late_fusion_is_one_linear_layer_on_vision_features_and_radiomics():
    model = build(tiny_model_config(name="late_fusion"))
    images, radiomics = inputs()
    logits, aux = forward(model, images, radiomics)
    pooled = np.asarray(forward(model.vision_model, images).pooler_output)
    np.testing.assert_allclose(aux["image_features"], pooled, atol=1e-6)
    fused = np.concatenate([pooled, np.asarray(radiomics)], axis=1)
    expected = fused @ np.asarray(model.classifier.kernel[...]) + np.asarray(model.classifier.bias[...])
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_zero_shot_is_the_text_tower_on_the_fixed_prompts_and_has_nothing_to_train():
    config = tiny_model_config(name="zero_shot")
    model = build(config)
    images, radiomics = inputs()
    logits, _ = model(images, radiomics)
    ids = jnp.asarray(model.prompt_learner.tokenized_prompts[...])
    tokenizer = load_tokenizer(None)
    assert ids.tolist() == [tokenizer(f"a CT scan of a {name}.")["input_ids"] for name in CLASS_NAMES]
    text = l2_normalize(model.aimv2.get_text_features(ids))  # the token ids' own embeddings, no prompt learner
    image = l2_normalize(model.aimv2.get_image_features(images))
    np.testing.assert_allclose(logits, model.aimv2.logit_scale_value() * image @ text.T, atol=1e-5)
    np.testing.assert_allclose(model(images, radiomics * 5.0)[0], logits, atol=0)
    assert not nnx.state(model, models.trainable_filter(config, spec_of(config)))


def test_cocoop_export_gives_the_jax_logits_in_pytorch_and_back(tmp_path):
    config, spec, model = export_test.build(name="cocoop")
    images, raw, stats = export_test.inputs(config, batch=3)
    expected, _ = model(images, stats.apply(raw))
    out = export.export_model(model, config, spec, stats, str(tmp_path))
    export_test.assert_relative(export_test.torch_logits(out, images, raw), expected, 1e-4)
    reloaded, export_config = export.load_export(out)
    np.testing.assert_allclose(reloaded(images, stats.apply(raw))[0], expected, rtol=1e-6, atol=1e-6)
    assert export_config["model"]["condition_on"] == "image"


def test_zero_shot_has_no_pytorch_export(tmp_path):
    config, spec, model = export_test.build(name="zero_shot")
    _, _, stats = export_test.inputs(config, batch=1)
    with pytest.raises(ExportFolderError, match="'zero_shot' model"):
        export.export_model(model, config, spec, stats, str(tmp_path))


def test_zero_shot_needs_a_context_phrase():
    with pytest.raises(ConfigError, match="ctx_init"):
        build(tiny_model_config(name="zero_shot", ctx_init=""))


@pytest.mark.parametrize("num_labels", [2, 3])
def test_convex_logreg_takes_the_c_of_lowest_out_of_fold_log_loss_on_patient_groups(num_labels):
    rng = np.random.default_rng(num_labels)
    x = rng.normal(size=(60, NUM_RADIOMICS))
    y = np.digitize(x[:, 0] + 0.7 * rng.normal(size=60), [-0.5, 0.5][:num_labels - 1])
    patients = np.repeat(np.arange(20), 3)
    model = RadiomicsLogReg(NUM_RADIOMICS, 3, rngs=nnx.Rngs(0))  # 3 outputs: the binary case leaves one class out
    info = convex_fit.fit_radiomics_logreg(model, x, y, patients, validation=None)

    def sklearn_fit(c):
        return LogisticRegression(C=c, solver="lbfgs", max_iter=100_000, tol=1e-8)

    losses = [log_loss(y, cross_val_predict(sklearn_fit(c), x, y, groups=patients, cv=GroupKFold(5),
                                            method="predict_proba")) for c in info["grid"]]
    np.testing.assert_allclose(info["log_loss"], losses, rtol=1e-6)
    assert info["C"] == info["grid"][int(np.argmin(losses))]
    probs = np.asarray(jax.nn.softmax(model(None, jnp.asarray(x, jnp.float32))[0]))
    np.testing.assert_allclose(probs[:, :num_labels], sklearn_fit(info["C"]).fit(x, y).predict_proba(x), atol=1e-5)
    assert np.all(probs[:, num_labels:] < 1e-6)


# ---- Through the trainer, eval and cross-validation ---------------------------------------------------------------

@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_trains_and_evaluates_with_reports_that_match_their_predictions(trained, name):
    config, workdir, result = trained[name]
    labels, probs = read_predictions(os.path.join(workdir, "predictions.csv"))
    saved = json.load(open(os.path.join(workdir, "metrics.json")))
    assert labels.tolist() == pipeline.records(config.data, "test").labels.tolist()
    assert saved["auc_macro"] == pytest.approx(macro_auc_of(labels, probs), abs=1e-6, nan_ok=True)
    assert result["step"] == (0 if name in models.NO_STEP_MODELS else config.train.num_steps)
    metrics = trainer.evaluate(config, workdir, split="validation")
    val_labels, val_probs = read_predictions(os.path.join(workdir, "reports", f"validation_step{result['best_step']}",
                                                          "predictions.csv"))
    assert metrics["auc_macro"] == pytest.approx(macro_auc_of(val_labels, val_probs), abs=1e-6, nan_ok=True)


def test_zero_shot_run_saves_its_untouched_initial_state_at_step_zero(trained):
    config, workdir, result = trained["zero_shot"]
    assert result["train_loss"] == [] and result["best_step"] == 0
    with checkpointing.open_manager(workdir, read_only=True) as manager:
        assert list(manager.all_steps()) == [0]
    restored = experiment.load_model(workdir)
    fresh = models.Model(config.model, restored.spec, rngs=nnx.Rngs(config.seed))
    for a, b in zip(jax.tree.leaves(nnx.state(restored.model)), jax.tree.leaves(nnx.state(fresh))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)  # jitted vs eager init


def test_logreg_is_sklearns_fit_with_the_c_of_lowest_validation_log_loss(trained):
    config, workdir, _ = trained["radiomics_logreg"]
    train, val = pipeline.records(config.data, "train"), pipeline.records(config.data, "validation")
    stats = pipeline.RadiomicsStats.fit(train.radiomics)
    x, xv = (stats.apply(r).astype(np.float64) for r in (train.radiomics, val.radiomics))
    classes = np.unique(train.labels)

    def refit(c):
        # converged as the module promises (gradient below 1e-8), so any correct fit agrees with it
        return LogisticRegression(C=c, solver="lbfgs", max_iter=100_000, tol=1e-8).fit(x, train.labels)

    grid = np.logspace(-3, 3, 7)
    scores = [log_loss(val.labels, refit(c).predict_proba(xv), labels=classes) for c in grid]
    info = json.load(open(os.path.join(workdir, "convex_fit.json")))
    np.testing.assert_allclose(info["grid"], grid)
    np.testing.assert_allclose(info["log_loss"], scores, rtol=1e-6)
    assert info["C"] == pytest.approx(grid[int(np.argmin(scores))])
    model = experiment.load_model(workdir).model
    logits, _ = model(None, jnp.asarray(xv, jnp.float32))
    expected = refit(info["C"]).predict_proba(xv)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits))[:, classes], expected, atol=1e-5)


def test_logreg_in_cross_validation_ignores_the_held_out_fold(lidc_data, tmp_path, monkeypatch):
    def fit(workdir: str) -> np.ndarray:
        config = run_config(lidc_data, "radiomics_logreg")
        config.data.cv_fold = 1
        trainer.train_and_evaluate(config, workdir)
        return np.asarray(experiment.load_model(workdir).model.classifier.kernel[...])

    kernel = fit(str(tmp_path / "a"))
    assert json.load(open(tmp_path / "a" / "convex_fit.json"))["selection"].startswith("patient-grouped")
    records = pipeline.records

    def perturbed(data_config, role):
        recs = records(data_config, role)
        return dataclasses.replace(recs, radiomics=-5.0 * recs.radiomics + 1.0) if role == "validation" else recs

    monkeypatch.setattr(pipeline, "records", perturbed)
    np.testing.assert_array_equal(fit(str(tmp_path / "b")), kernel)


def test_cross_validation_runs_every_ablation(lidc_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cv, "MODELS", ABLATIONS)
    monkeypatch.setattr(cv, "NUM_FOLDS", 1)
    summary = cv.cross_validate(run_config(lidc_data, "autorad_lung"), str(tmp_path))
    assert set(summary) == set(ABLATIONS)
    for name in ABLATIONS:
        labels, probs = read_predictions(str(tmp_path / name / "fold0" / "predictions.csv"))
        assert summary[name]["auc_macro"]["mean"] == pytest.approx(macro_auc_of(labels, probs), abs=1e-6, nan_ok=True)
        assert json.load(open(tmp_path / name / "fold0" / "metrics.json"))["cv_fold"] == 0
