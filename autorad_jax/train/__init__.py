"""Training, evaluation and cross-validation (see trainer.py for the workdir layout)."""

from autorad_jax.train.cv import cross_validate
from autorad_jax.train.trainer import evaluate, train_and_evaluate

__all__ = ["cross_validate", "evaluate", "train_and_evaluate"]
