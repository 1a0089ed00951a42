"""Baselines with AutoRad-Lung's call signature: `__call__(images, radiomics, *, train=False, image_size=None) ->
(logits, aux)`.

  RadiomicsLogReg  one linear layer on the standardised radiomics (logistic regression through softmax cross-entropy);
  RadiomicsMLP     Linear -> ReLU blocks on the radiomics, then a linear classifier;
  LinearProbe      vision features of a tower family (frozen unless config.model.trainable says otherwise) -> linear classifier;
  LateFusion       the linear probe's classifier on [pooled vision features, standardised radiomics].
CoOp is `AutoRadLung` with a prompt learner without meta-network (see `autorad_jax.models.Model`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from autorad_jax.errors import ConfigError
from autorad_jax.models import families
from autorad_jax.models.autorad_lung import POOLINGS, pooled_image_features, tower_options, vision_scan_split

Array = jax.Array


def build_vision(model_config, vision, *, rngs: nnx.Rngs) -> nnx.Module:
    """The vision tower of `vision` (a family's vision config), random-init, with config.model's compute options."""
    return families.of_config(vision).vision_model(
        vision, rngs=rngs, scan_split=vision_scan_split(model_config, vision.num_hidden_layers),
        **tower_options(model_config))


def _dense(din: int, dout: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class RadiomicsLogReg(nnx.Module):
    """Logits = `classifier(radiomics)`; `aux` is empty."""

    def __init__(self, num_radiomics: int, num_classes: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.classifier = _dense(num_radiomics, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, images: Array, radiomics: Array, *, train: bool = False,
                 image_size: int | None = None) -> tuple[Array, dict[str, Any]]:
        del images, train, image_size
        return self.classifier(radiomics.astype(self.dtype)).astype(jnp.float32), {}


class RadiomicsMLP(nnx.Module):
    """Logits = `classifier(relu(hidden[-1](... relu(hidden[0](radiomics)))))`; `aux['features']` is the last hidden."""

    def __init__(self, num_radiomics: int, num_classes: int, hidden: Sequence[int], *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        dims = [num_radiomics, *hidden]
        self.dtype = dtype
        self.hidden = nnx.List([_dense(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.classifier = _dense(dims[-1], num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, images: Array, radiomics: Array, *, train: bool = False,
                 image_size: int | None = None) -> tuple[Array, dict[str, Any]]:
        del images, train, image_size
        x = radiomics.astype(self.dtype)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.classifier(x).astype(jnp.float32), {"features": x}


class LinearProbe(nnx.Module):
    """Logits = `classifier(pooled vision features)`; `aux['image_features']` are the pooled features."""

    def __init__(self, vision_model: nnx.Module, num_classes: int, *, pooling: str = "head", dtype=jnp.float32,
                 rngs: nnx.Rngs, num_radiomics: int = 0):
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.vision_model = vision_model
        self.pooling = pooling
        # The classifier's rows are sharded along 'embed' only when they are the vision features alone.
        rows = "embed" if num_radiomics == 0 else None
        self.classifier = nnx.Linear(
            vision_model.config.hidden_size + num_radiomics, num_classes, dtype=dtype, param_dtype=jnp.float32,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (rows, None), eager_sharding=False),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,), eager_sharding=False))

    def classifier_input(self, features: Array, radiomics: Array) -> Array:
        """What the classifier reads: the pooled vision features [B, hidden]."""
        del radiomics
        return features

    def __call__(self, images: Array, radiomics: Array, *, train: bool = False,
                 image_size: int | None = None) -> tuple[Array, dict[str, Any]]:
        del train
        features = pooled_image_features(self.vision_model, images, self.pooling, image_size)
        logits = self.classifier(self.classifier_input(features, radiomics))
        return logits.astype(jnp.float32), {"image_features": features}


class LateFusion(LinearProbe):
    """Logits = `classifier([pooled vision features, standardised radiomics])` (one linear layer);
    `aux['image_features']` are the pooled features."""

    def __init__(self, vision_model: nnx.Module, num_classes: int, num_radiomics: int, *, pooling: str = "head",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(vision_model, num_classes, pooling=pooling, dtype=dtype, rngs=rngs,
                         num_radiomics=num_radiomics)

    def classifier_input(self, features: Array, radiomics: Array) -> Array:
        """[pooled vision features, radiomics] [B, hidden + F]."""
        return jnp.concatenate([features, radiomics.astype(features.dtype)], axis=-1)
