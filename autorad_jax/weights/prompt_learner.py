"""The prompt learner's name map: PyTorch `PromptLearner` key (`autorad_jax.weights.torch_model`) <-> JAX variable
path, on the strict engine of `autorad_jax.weights.name_map`, used in both directions."""

from __future__ import annotations

import numpy as np
from flax import nnx

from autorad_jax.models.prompt_learner import PromptLearner
from autorad_jax.weights.name_map import COPY, LINEAR, NameMap, dump, load, variables


def prompt_learner_map(prompt_learner: PromptLearner) -> NameMap:
    """torch key -> (nnx path inside the prompt learner, transform) for every variable of the module."""
    entries = {"ctx": (("ctx",), COPY), "tokenized_prompts": (("tokenized_prompts",), COPY),
               "token_suffix": (("token_suffix",), COPY)}
    if prompt_learner.token_prefix is not None:  # prompts without SOS have none
        entries["token_prefix"] = (("token_prefix",), COPY)
    if prompt_learner.meta_net is not None:
        for layer in ("linear1", "linear2"):
            entries[f"meta_net.{layer}.weight"] = (("meta_net", layer, "kernel"), LINEAR)
            entries[f"meta_net.{layer}.bias"] = (("meta_net", layer, "bias"), COPY)
    return entries


def prompt_learner_state(prompt_learner: PromptLearner) -> dict[str, np.ndarray]:
    """The PyTorch state dict of the prompt learner (float32 parameters, int32 token ids)."""
    return dump(variables(prompt_learner, nnx.Variable), prompt_learner_map(prompt_learner), "prompt learner")


def load_prompt_learner_state(prompt_learner: PromptLearner, state: dict[str, np.ndarray], source: str) -> None:
    """Writes a PyTorch prompt-learner state dict into the JAX module, strictly (`source` names it in errors)."""
    load(variables(prompt_learner, nnx.Variable), prompt_learner_map(prompt_learner), state, source)
