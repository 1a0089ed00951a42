"""The jitted computations: state initialisation, the train step and the eval step (pure functions of nnx state)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from autorad_jax import models
from autorad_jax.data import preprocess
from autorad_jax.data.preprocess import Preprocessing
from autorad_jax.models.spec import ModelSpec
from autorad_jax.train.optim import make_optimizer


def build(config: ml_collections.ConfigDict, spec: ModelSpec) -> tuple[nnx.Module, nnx.Optimizer]:
    """(model, optimizer) for `config` and `spec`, random-init; only the parameters `trainable_filter` selects get
    optimiser state."""
    model = models.Model(config.model, spec, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, make_optimizer(config), wrt=models.trainable_filter(config.model, spec))


def loss_and_metrics(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean softmax cross-entropy (float32) and batch accuracy."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}


def make_train_step(graphdef: nnx.GraphDef, trainable: nnx.filterlib.Filter, prep: Preprocessing) -> Callable:
    """(state, batch) -> (new state, metrics) for the (model, optimizer) pair that `graphdef` describes; the batch's
    HU views become images here (augmented with keys from the optimiser's step when `prep.augment`)."""

    def train_step(state: nnx.State, batch: dict[str, jax.Array]):
        model, optimizer = nnx.merge(graphdef, state)
        images = preprocess.images(batch["view"], prep, step=optimizer.step[...])

        def loss_fn(model):
            logits, _ = model(images, batch["radiomics"], train=True)
            return loss_and_metrics(logits, batch["label"])

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        optimizer.update(model, grads)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        return nnx.state((model, optimizer)), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, prep: Preprocessing) -> Callable:
    """(state, batch) -> (class probabilities [B, C], record index [B]) in inference mode, from HU views."""

    def eval_step(state: nnx.State, batch: dict[str, jax.Array]):
        model, _ = nnx.merge(graphdef, state)
        logits, _ = model(preprocess.images(batch["view"], prep), batch["radiomics"], train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), batch["index"]

    return eval_step


def all_finite(state: nnx.State) -> jax.Array:
    """True when every floating-point array of `state` is finite."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
