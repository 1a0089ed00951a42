"""Training and evaluation (see trainer.py for the workdir layout); cross-validation is `autorad_jax.train.cv`."""

from autorad_jax.train.trainer import evaluate, train_and_evaluate

__all__ = ["evaluate", "train_and_evaluate"]
