"""The jitted computations: state initialisation, the train step and the eval step (pure functions of nnx state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from autorad_jax import models
from autorad_jax.data import preprocess
from autorad_jax.data.preprocess import Preprocessing
from autorad_jax.errors import ConfigError
from autorad_jax.models.spec import ModelSpec
from autorad_jax.train.optim import make_optimizer


def build(config: ml_collections.ConfigDict, spec: ModelSpec) -> tuple[nnx.Module, nnx.Optimizer]:
    """(model, optimizer) for `config` and `spec`, random-init; only the parameters `trainable_filter` selects get
    optimiser state."""
    model = models.Model(config.model, spec, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, make_optimizer(config), wrt=models.trainable_filter(config.model, spec))


class LossOptions(NamedTuple):
    """Class-imbalance options of the training loss, constants from the training split's class counts."""
    class_weights: np.ndarray | None = None  # [C]: example c weighs class_weights[c] in a weighted mean
    logit_offset: np.ndarray | None = None  # [C]: added to the logits inside the loss (tau * log prior)


def loss_options(train_config: ml_collections.ConfigDict, class_counts: np.ndarray) -> LossOptions:
    """config.train.class_weights ('none' | 'balanced': n / (C n_c)) and logit_adjustment_tau (tau > 0: the loss
    sees logits + tau log(prior), Menon et al. 2021) for the training split's `class_counts` [C]. A class absent
    from the training split counts as one example (no example carries its weight; its prior stays finite)."""
    weighting = str(train_config.get("class_weights", "none"))
    if weighting not in ("none", "balanced"):
        raise ConfigError(f"config.train.class_weights={weighting!r}; use 'none' or 'balanced'.")
    tau = float(train_config.get("logit_adjustment_tau", 0.0))
    if not tau >= 0:
        raise ConfigError(f"config.train.logit_adjustment_tau={tau!r}; use 0 (off) or a positive value.")
    counts = np.asarray(class_counts, np.float64)
    present = np.maximum(counts, 1.0)  # a class absent from the training split counts as one example
    weights = (counts.sum() / (len(counts) * present)).astype(np.float32) if weighting == "balanced" else None
    offset = (tau * np.log(present / present.sum())).astype(np.float32) if tau > 0 else None
    return LossOptions(weights, offset)


def loss_and_metrics(logits: jax.Array, labels: jax.Array,
                     options: LossOptions = LossOptions()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy (float32) of the logits (+ options.logit_offset), averaged with the weights
    options.class_weights[label] (plain mean without), and the batch accuracy of the plain logits."""
    logits = logits.astype(jnp.float32)
    shifted = logits if options.logit_offset is None else logits + options.logit_offset
    losses = optax.softmax_cross_entropy_with_integer_labels(shifted, labels)
    if options.class_weights is None:
        loss = losses.mean()
    else:
        w = jnp.asarray(options.class_weights)[labels]
        loss = (w * losses).sum() / w.sum()
    return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}


def make_train_step(graphdef: nnx.GraphDef, trainable: nnx.filterlib.Filter, prep: Preprocessing,
                    options: LossOptions = LossOptions()) -> Callable:
    """(state, batch) -> (new state, metrics) for the (model, optimizer) pair that `graphdef` describes; the batch's
    HU views become images here (augmented with keys from the optimiser's step when `prep.augment`); `options` are
    the loss's class-imbalance constants."""

    def train_step(state: nnx.State, batch: dict[str, jax.Array]):
        model, optimizer = nnx.merge(graphdef, state)
        images = preprocess.model_inputs(batch["view"], prep, step=optimizer.step[...])

        def loss_fn(model):
            logits, _ = model(images, batch["radiomics"], train=True, image_size=prep.image_size)
            return loss_and_metrics(logits, batch["label"], options)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        optimizer.update(model, grads)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        return nnx.state((model, optimizer)), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, prep: Preprocessing) -> Callable:
    """(model state, batch) -> (class probabilities [B, C], record index [B]) in inference mode, from HU views, for
    the model that `graphdef` describes."""

    def eval_step(state: nnx.State, batch: dict[str, jax.Array]):
        model = nnx.merge(graphdef, state)
        logits, _ = model(preprocess.model_inputs(batch["view"], prep), batch["radiomics"], train=False,
                          image_size=prep.image_size)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), batch["index"]

    return eval_step


def all_finite(state: nnx.State) -> jax.Array:
    """True when every floating-point array of `state` is finite."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
