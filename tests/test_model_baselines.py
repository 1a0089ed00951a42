"""Baselines (radiomics logistic regression / MLP, linear probe), the Model factory, and trainable_filter's modes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from autorad_jax import modeling
from autorad_jax.models import Model, trainable_filter
from compiled import forward
from configs import autorad_lung as experiment

NUM_RADIOMICS, BATCH = 6, 3
CLASS_NAMES = ("benign lung nodule", "malignant lung nodule")  # the binary scheme
RADIOMICS_NAMES = tuple(f"feature_{i}" for i in range(NUM_RADIOMICS))


def tiny_config(**overrides):
    config = experiment.get_config("tiny").model
    config.vision.image_size = 28
    config.update(overrides)
    return config


def spec_of(config):
    return modeling.model_spec(config, CLASS_NAMES, RADIOMICS_NAMES)


def build(config):
    return Model(config, spec_of(config), rngs=nnx.Rngs(0))


def filter_of(config):
    return trainable_filter(config, spec_of(config))


@pytest.fixture(scope="module")
def batch():
    k1, k2 = jax.random.split(jax.random.key(3))
    return (jax.random.normal(k1, (BATCH, 28, 28, 3)), jax.random.normal(k2, (BATCH, NUM_RADIOMICS)),
            jnp.array([0, 1, 1]))


def trainable_paths(model, config) -> set:
    return {path for path, _ in nnx.to_flat_state(nnx.state(model, filter_of(config)))}


@pytest.mark.parametrize("name", ["radiomics_logreg", "radiomics_mlp", "linear_probe"])
def test_baseline_forward_backward(name, batch):
    config = tiny_config(name=name)
    model = build(config)

    def loss_fn(m):
        logits, _ = m(*batch[:2])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[2]).mean(), logits

    (loss, logits), grads = nnx.jit(nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, filter_of(config)), has_aux=True))(model)
    assert logits.shape == (BATCH, 2) and np.isfinite(loss)
    grads = {path: np.asarray(g[...]) for path, g in nnx.to_flat_state(grads)}
    assert grads and all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads.values())
    assert {p[0] for p in grads} == ({"classifier"} if name != "radiomics_mlp" else {"classifier", "hidden"})


def test_radiomics_baselines_compute_what_they_say(batch):
    images, radiomics, _ = batch
    x = np.asarray(radiomics)
    logreg = build(tiny_config(name="radiomics_logreg"))
    w, b = np.asarray(logreg.classifier.kernel[...]), np.asarray(logreg.classifier.bias[...])
    np.testing.assert_allclose(logreg(images, radiomics)[0], x @ w + b, rtol=1e-5, atol=1e-6)

    mlp = build(tiny_config(name="radiomics_mlp", radiomics_mlp_hidden=(8, 5)))
    h = x
    for layer in mlp.hidden:
        h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0.0)
    expected = h @ np.asarray(mlp.classifier.kernel[...]) + np.asarray(mlp.classifier.bias[...])
    np.testing.assert_allclose(mlp(images, radiomics)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["head", "mean"])
def test_linear_probe_reads_pooled_vision_features(pooling, batch):
    images, radiomics, _ = batch
    model = build(tiny_config(name="linear_probe", pooling=pooling))
    out = forward(model.vision_model, images)
    features = out.pooler_output if pooling == "head" else out.last_hidden_state.mean(axis=1)
    logits, aux = forward(model, images, radiomics)
    np.testing.assert_allclose(aux["image_features"], features, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, model.classifier(features), rtol=1e-6, atol=1e-6)


def test_trainable_filter_modes():
    config = tiny_config()
    model = nnx.eval_shape(lambda: build(config))  # 2 vision blocks
    everything = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    prompt = {p for p in everything if p[0] == "prompt_learner"}
    vision = {p for p in everything if p[:2] in {("aimv2", "vision_model"), ("aimv2", "visual_projection")}}
    top = {p for p in vision if p[2:3] in {("rms_norm",), ("head",)} or p[1] == "visual_projection"}
    block1 = {p for p in vision if p[2:5] == ("encoder", "layers", 1)}
    assert prompt == {("prompt_learner", "ctx")} | {p for p in everything if p[1] == "meta_net"}
    assert top and block1 and not any(p[1].startswith("text") or p[1] == "logit_scale" for p in prompt | vision)

    assert trainable_paths(model, config) == prompt
    config.update(dict(trainable="last_k", trainable_last_k=0))
    assert trainable_paths(model, config) == prompt | top
    config.trainable_last_k = 1
    assert trainable_paths(model, config) == prompt | top | block1
    config.trainable = "full"
    assert trainable_paths(model, config) == prompt | vision
    selected = [v for p, v in nnx.to_flat_state(nnx.state(model)) if filter_of(config)(p, v)]
    assert selected and all(isinstance(v, nnx.Param) for v in selected)  # never the prompt's constant buffers

    with pytest.raises(ValueError, match="trainable_last_k"):
        filter_of(tiny_config(trainable="last_k", trainable_last_k=3))
    with pytest.raises(ValueError, match="trainable must be one of"):
        filter_of(tiny_config(trainable="text"))
    with pytest.raises(ValueError, match="name must be one of"):
        build(tiny_config(name="clip"))


def test_trainable_filter_for_linear_probe():
    config = tiny_config(name="linear_probe", trainable="last_k", trainable_last_k=1)
    model = nnx.eval_shape(lambda: build(config))
    paths = trainable_paths(model, config)
    assert {p[0] for p in paths} == {"classifier", "vision_model"}
    assert not any(p[:3] == ("vision_model", "encoder", "layers") and p[3] == 0 for p in paths)
    assert ("vision_model", "rms_norm", "weight") in paths
    config.trainable = "prompt"
    assert {p[0] for p in trainable_paths(model, config)} == {"classifier"}
