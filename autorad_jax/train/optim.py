"""Optimiser from config.optim: AdamW or SGD, warm-up + cosine decay, gradient clipping, gradient accumulation."""

from __future__ import annotations

import ml_collections
import optax

from autorad_jax.errors import ConfigError


def num_updates(config: ml_collections.ConfigDict) -> int:
    """Optimiser updates in a run: train.num_steps counts micro-batches, optim.grad_accum_steps of them per update."""
    return max(1, config.train.num_steps // config.optim.grad_accum_steps)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to optim.learning_rate over optim.warmup_steps updates, then cosine decay to 0."""
    total = num_updates(config)
    warmup = min(config.optim.warmup_steps, total - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.optim.learning_rate, warmup_steps=warmup, decay_steps=total, end_value=0.0)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The gradient transformation for config.optim (applied to the trainable parameters only)."""
    o = config.optim
    schedule = learning_rate_schedule(config)
    if o.name == "adamw":
        base = optax.adamw(schedule, weight_decay=o.weight_decay)
    elif o.name == "sgd":
        base = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(schedule, momentum=o.momentum))
    else:
        raise ConfigError(f"config.optim.name={o.name!r}; use 'adamw' or 'sgd'.")
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), base) if o.grad_clip_norm > 0 else base
    if o.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
    return tx
