"""Models: `Model(config.model, spec, rngs=...)` builds the one config.model.name asks for, random-init, from the config
and a `ModelSpec` (tower configs, prompt token ids, classes, radiomics names); `trainable_filter` picks what trains.
This package imports jax, flax and numpy only: it reads no file. Pretrained weights are loaded into a built model by
`autorad_jax.modeling`.

Names: autorad_lung (radiomics-conditioned prompts), coop (learned context, no meta-network), radiomics_logreg,
radiomics_mlp, linear_probe. All share `__call__(images, radiomics, *, train=False) -> (logits [B, C], aux)`.

Trainable parameters by config.model.trainable (the text tower, text projection and logit scale never train):
  prompt  the prompt learner (`ctx`, `meta_net`) and the baselines' own layers (`classifier`, `hidden`);
  last_k  + the last `trainable_last_k` vision blocks and the top of the vision tower: its final RMSNorm, its
          attention-pool head and `visual_projection` (with k = 0 only that top trains);
  full    + the whole vision tower (patch embedding and position embedding included).
With config.model.scan_layers the vision blocks are stacked in scanned groups keyed by their first block, and for
last_k the stack is split at the first trainable block, so that the filter selects whole groups: `("encoder",
"layers", i)` is block i unrolled, or the group of blocks from i on when scanned.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx

from autorad_jax.errors import ConfigError
from autorad_jax.models.aimv2 import Aimv2Config
from autorad_jax.models.autorad_lung import AutoRadLung, build_aimv2
from autorad_jax.models.baselines import LinearProbe, RadiomicsLogReg, RadiomicsMLP, build_vision
from autorad_jax.models.prompt_learner import PromptLearner
from autorad_jax.models.spec import ModelSpec, PromptTokens

__all__ = ["MODEL_NAMES", "PROMPT_MODELS", "TOWER_MODELS", "TRAINABLE_MODES", "Model", "ModelSpec", "PromptTokens",
           "trainable_filter"]

MODEL_NAMES = ("autorad_lung", "coop", "radiomics_logreg", "radiomics_mlp", "linear_probe")
PROMPT_MODELS = ("autorad_lung", "coop")  # joint AIMv2 towers + class prompts
TOWER_MODELS = PROMPT_MODELS + ("linear_probe",)  # models with an AIMv2 vision tower
TRAINABLE_MODES = ("prompt", "last_k", "full")
_FROZEN = frozenset({"text_model", "text_projection", "logit_scale"})
_VISION = frozenset({"vision_model", "visual_projection"})
_VISION_TOP = frozenset({"rms_norm", "head"})  # children of vision_model that train in 'last_k'


def Model(model_config, spec: ModelSpec, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model config.model.name names, random-init, with the towers, prompts and sizes of `spec`."""
    name = model_config.name
    dtype = jnp.dtype(model_config.dtype)
    num_classes, num_radiomics = len(spec.class_names), spec.num_radiomics
    if name in TOWER_MODELS and spec.towers is None:
        raise ConfigError(f"config.model.name={name!r} needs AIMv2 towers, and the model spec has none.")
    if name == "radiomics_logreg":
        return RadiomicsLogReg(num_radiomics, num_classes, dtype=dtype, rngs=rngs)
    if name == "radiomics_mlp":
        return RadiomicsMLP(num_radiomics, num_classes, tuple(model_config.radiomics_mlp_hidden), dtype=dtype,
                            rngs=rngs)
    if name == "linear_probe":
        return LinearProbe(build_vision(model_config, spec.vision_config, rngs=rngs), num_classes,
                           pooling=model_config.pooling, dtype=dtype, rngs=rngs)
    if name in PROMPT_MODELS:
        if not isinstance(spec.towers, Aimv2Config) or spec.prompts is None:
            raise ConfigError(f"config.model.name={name!r} needs joint AIMv2 image-text towers and class prompts; the "
                             f"model spec has {type(spec.towers).__name__} towers and "
                             f"{'no' if spec.prompts is None else 'its'} prompts.")
        aimv2 = build_aimv2(model_config, spec.towers, rngs=rngs)
        prompt_learner = PromptLearner(
            tokens=spec.prompts, token_embedding=aimv2.text_model.embeddings.token_embedding.embedding[...],
            num_radiomics=num_radiomics, meta_hidden_dim=model_config.meta_hidden_dim,
            conditioning=model_config.conditioning if name == "autorad_lung" else None, dtype=dtype, rngs=rngs)
        return AutoRadLung(aimv2, prompt_learner, pooling=model_config.pooling,
                           prompt_chunk_size=model_config.prompt_chunk_size)
    raise ConfigError(f"config.model.name must be one of {MODEL_NAMES}, got {name!r}")


def trainable_filter(model_config, spec: ModelSpec) -> Callable[[tuple, object], bool]:
    """nnx filter `(path, variable) -> bool` of the trainable `nnx.Param`s for config.model.trainable (see above)."""
    mode = model_config.trainable
    if mode not in TRAINABLE_MODES:
        raise ConfigError(f"config.model.trainable must be one of {TRAINABLE_MODES}, got {mode!r}")
    first_block = 0
    if mode == "last_k" and spec.vision_config is not None:
        num_layers, k = spec.vision_config.num_hidden_layers, model_config.trainable_last_k
        if not 0 <= k <= num_layers:
            raise ConfigError(f"trainable_last_k={k} is not in [0, {num_layers}] (vision blocks)")
        first_block = num_layers - k

    def vision_trains(path: tuple) -> bool:
        if mode != "last_k":
            return mode == "full"
        if "vision_model" not in path:
            return True  # visual_projection
        below = path[path.index("vision_model") + 1:]
        if below[0] in _VISION_TOP:
            return True
        return below[:2] == ("encoder", "layers") and int(below[2]) >= first_block

    def is_trainable(path: tuple, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        names = {p for p in path if isinstance(p, str)}
        if names & _FROZEN:
            return False
        return vision_trains(tuple(path)) if names & _VISION else True

    return is_trainable
