"""AutoRad-Lung and CoOp: prompt assembly, EOS pooling, conditioning, vectorisation, chunking, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from autorad_jax import modeling
from autorad_jax.data.tokenizer import load_tokenizer
from autorad_jax.models import Model, trainable_filter
from compiled import forward
from configs import autorad_lung as experiment

NUM_RADIOMICS, BATCH, EOS = 6, 3, 49407
CLASS_NAMES = experiment.CLASS_NAMES
RADIOMICS_NAMES = tuple(f"feature_{i}" for i in range(NUM_RADIOMICS))


def tiny_config(**overrides):
    config = experiment.get_config("tiny").model
    config.vision.update(dict(image_size=28, num_hidden_layers=1))
    config.text.num_hidden_layers = 1
    config.update(overrides)
    return config


def spec_of(config, num_radiomics: int = NUM_RADIOMICS):
    return modeling.model_spec(config, CLASS_NAMES, RADIOMICS_NAMES[:num_radiomics] if num_radiomics <= NUM_RADIOMICS
                               else tuple(f"feature_{i}" for i in range(num_radiomics)))


def build(config, seed: int = 0):
    return Model(config, spec_of(config), rngs=nnx.Rngs(seed))


def loss_fn(model, images, radiomics, labels):
    logits, _ = model(images, radiomics)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@nnx.jit(static_argnums=(4,))
def value_and_grad(model, images, radiomics, labels, wrt):
    """((loss, logits), grads) with respect to the parameters `wrt` selects."""
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    return grad_fn(model, images, radiomics, labels)


@nnx.jit
def text_features_and_hidden_states(model, prompts):
    """The model's class features, and the text tower's hidden states [B, C, L, D] on the same prompts."""
    b, c, length, d = prompts.shape
    ids = jnp.tile(model.prompt_learner.tokenized_prompts[...], (b, 1))
    hidden = model.aimv2.text_model(ids, inputs_embeds=prompts.reshape(b * c, length, d)).last_hidden_state
    return model.text_features(prompts), hidden.reshape(b, c, length, -1)


@nnx.jit
def clip_features(aimv2, ids, embeds, images):
    return aimv2.get_text_features(ids, inputs_embeds=embeds), aimv2.get_image_features(images)


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def model(config):
    return build(config)


@pytest.fixture(scope="module")
def wrt(config):
    return trainable_filter(config, spec_of(config))  # one filter object, so that jitted functions taking it compile once


@pytest.fixture(scope="module")
def batch():
    k1, k2 = jax.random.split(jax.random.key(1))
    return (jax.random.normal(k1, (BATCH, 28, 28, 3)), jax.random.normal(k2, (BATCH, NUM_RADIOMICS)),
            jnp.arange(BATCH) % len(CLASS_NAMES))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def flat(state) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def class_token_ids(tokenizer, prefix: str) -> list[list[int]]:
    return [tokenizer(f"{prefix} {name}.")["input_ids"] for name in CLASS_NAMES]


def test_large_model_initialises_abstractly():
    config = experiment.get_config("large").model
    spec = spec_of(config, 107)
    model = nnx.eval_shape(lambda: Model(config, spec, rngs=nnx.Rngs(0)))
    assert model.aimv2.vision_model.encoder.layers["0"].ffn.up_proj.kernel.shape == (24, 1024, 2816)  # scanned
    assert model.aimv2.text_model.embeddings.token_embedding.embedding.shape == (49408, 768)
    assert model.prompt_learner.ctx.shape == (5, 768)  # "a CT scan of a" is 5 BPE tokens
    assert model.prompt_learner.ctx.get_metadata()["out_sharding"] == (None, "embed")
    assert model.prompt_learner.meta_net.linear2.kernel.shape == (48, 768)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    radiomics = jax.ShapeDtypeStruct((2, 107), jnp.float32)
    logits, aux = nnx.eval_shape(lambda m, x, r: m(x, r), model, images, radiomics)
    assert logits.shape == (2, 3) and aux["text_features"].shape == (2, 3, 768)


def test_gradients_reach_prompt_learner_only_and_optimizer_skips_frozen(model, batch, wrt):
    (loss, _), grads = value_and_grad(model, *batch, wrt)
    grads = flat(grads)
    assert np.isfinite(loss)
    assert {p[:2] for p in grads} == {("prompt_learner", "ctx"), ("prompt_learner", "meta_net")}
    assert all(np.abs(g).max() > 0 for g in grads.values())

    trained = nnx.clone(model)
    optimizer = nnx.Optimizer(trained, optax.adam(1e-2), wrt=wrt)
    assert not [p for p, _ in nnx.to_flat_state(nnx.state(optimizer, nnx.OptState)) if "aimv2" in p]
    _, grads = value_and_grad(trained, *batch, wrt)
    optimizer.update(trained, grads)
    before, after = flat(nnx.state(model)), flat(nnx.state(trained))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == set(flat(nnx.state(model, wrt)))


def test_text_tower_pools_at_each_prompts_eos(model, config, batch, tokenizer):
    learner = model.prompt_learner
    prompts = learner(batch[1])
    ids = np.asarray(learner.tokenized_prompts[...])
    table = np.asarray(model.aimv2.text_model.embeddings.token_embedding.embedding[...])
    expected_eos = []
    for c, reference in enumerate(class_token_ids(tokenizer, config.ctx_init)):
        eos = reference.index(EOS)
        expected_eos.append(eos)
        np.testing.assert_array_equal(ids[c, :eos + 1], reference)
        np.testing.assert_allclose(prompts[:, c, eos], np.broadcast_to(table[EOS], (BATCH, table.shape[1])))
    features, hidden = text_features_and_hidden_states(model, prompts)
    at_eos = hidden[:, np.arange(len(CLASS_NAMES)), np.array(expected_eos)]
    np.testing.assert_allclose(model.aimv2.text_projection(at_eos), features, rtol=1e-5, atol=1e-6)


def test_zeroed_meta_net_gives_plain_coop_prompt_logits(model, config, batch, tokenizer):
    zeroed = nnx.clone(model)
    for _, variable in nnx.to_flat_state(nnx.state(zeroed.prompt_learner.meta_net, nnx.Param)):
        variable[...] = jnp.zeros_like(variable[...])
    images, radiomics, _ = batch
    logits, _ = forward(zeroed, images, radiomics)

    # Independent reference: the full-length prompt "a CT scan of a <class>." embedded by hand from the token table.
    length = config.text.max_position_embeddings
    ids = np.full((len(CLASS_NAMES), length), EOS, np.int32)
    for c, row in enumerate(class_token_ids(tokenizer, config.ctx_init)):
        ids[c, :len(row)] = row
    table = np.asarray(model.aimv2.text_model.embeddings.token_embedding.embedding[...])
    text, image = map(np.array, clip_features(model.aimv2, jnp.asarray(ids), jnp.asarray(table[ids]), images))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    expected = float(model.aimv2.logit_scale_value()) * image @ text.T
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conditioning", ["shared", "per_token"])
def test_one_samples_radiomics_change_only_its_logits(model, batch, conditioning):
    if conditioning != "shared":
        model = build(tiny_config(conditioning=conditioning))
    images, radiomics, _ = batch
    logits, _ = forward(model, images, radiomics)
    changed, _ = forward(model, images, radiomics.at[1].add(1.0))
    assert not np.allclose(logits[1], changed[1])
    np.testing.assert_array_equal(np.delete(np.asarray(logits), 1, 0), np.delete(np.asarray(changed), 1, 0))


def test_vectorised_prompts_equal_a_per_sample_loop(model, batch):
    images, radiomics, _ = batch
    learner = model.prompt_learner
    prompts = np.asarray(learner(radiomics))
    ctx = np.asarray(learner.ctx[...])
    prefix, suffix = np.asarray(learner.token_prefix[...]), np.asarray(learner.token_suffix[...])
    for i in range(BATCH):  # CoCoOp's loop: shift the context by this sample's meta-net output, then per class
        shift = np.asarray(learner.meta_net(radiomics[i:i + 1]))[0]
        for c in range(len(CLASS_NAMES)):
            expected = np.concatenate([prefix[c], ctx + shift, suffix[c]])
            np.testing.assert_allclose(prompts[i, c], expected, rtol=1e-6, atol=1e-6)
    logits, _ = forward(model, images, radiomics)
    looped = np.concatenate([forward(model, images[i:i + 1], radiomics[i:i + 1])[0] for i in range(BATCH)])
    np.testing.assert_allclose(logits, looped, rtol=1e-5, atol=1e-5)


def test_chunked_text_path_equals_unchunked(model, batch, wrt):
    chunked = nnx.clone(model)
    chunked.prompt_chunk_size = 4  # 3 samples x 3 classes = 9 prompts: chunks of 4, the last one padded
    (loss, logits), grads = value_and_grad(model, *batch, wrt)
    (chunked_loss, chunked_logits), chunked_grads = value_and_grad(chunked, *batch, wrt)
    np.testing.assert_allclose(chunked_logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked_loss, loss, rtol=1e-5)
    grads, chunked_grads = flat(grads), flat(chunked_grads)
    for path, g in grads.items():
        np.testing.assert_allclose(chunked_grads[path], g, rtol=1e-4, atol=1e-7, err_msg=str(path))


def test_coop_shares_one_context_and_random_init_without_phrase(batch, tokenizer, config, wrt):
    model = build(tiny_config(name="coop", ctx_init=""))
    learner = model.prompt_learner
    assert learner.meta_net is None and learner.ctx.shape == (4, 64)
    x_token = tokenizer("X", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray(learner.tokenized_prompts[...])[:, 1:5], np.tile(x_token, (3, 4)))
    images, radiomics, labels = batch
    (_, logits), grads = value_and_grad(model, images, radiomics, labels, wrt)
    (_, other_logits), _ = value_and_grad(model, images, -radiomics, labels, wrt)
    np.testing.assert_array_equal(logits, other_logits)
    assert set(flat(grads)) == {("prompt_learner", "ctx")} and config.trainable == "prompt"
    assert np.abs(flat(grads)[("prompt_learner", "ctx")]).max() > 0
