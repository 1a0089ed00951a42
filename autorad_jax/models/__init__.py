"""Models: `Model(config.model, spec, rngs=...)` builds the one config.model.name asks for, random-init, from the config
and a `ModelSpec` (tower configs of one family, prompt token ids, classes, radiomics names); `trainable_filter` picks
what trains. Every tower model runs on every tower family (AIMv2, CLIP, SigLIP: `autorad_jax.models.families`).
This package imports jax, flax and numpy only: it reads no file. Pretrained weights are loaded into a built model by
`autorad_jax.modeling`.

Names: autorad_lung (radiomics-conditioned prompts), coop (learned context, no meta-network), cocoop (image-conditioned
prompts), zero_shot (fixed prompts "<ctx_init> <class>.", nothing learned), radiomics_logreg, radiomics_mlp,
linear_probe, late_fusion (vision features + radiomics, one linear layer). All share
`__call__(images, radiomics, *, train=False, image_size=None) -> (logits [B, C], aux)` (`image_size`: resize the
images to it first, in the vision tower). The trainer runs no steps for NO_STEP_MODELS:
the logistic regression is fitted as a convex problem (autorad_jax.train.convex_fit), zero-shot has nothing to fit.

Trainable parameters by config.model.trainable (the text tower, text projection, logit scale and bias never train):
  prompt  the prompt learner (`ctx`, `meta_net`) and the baselines' own layers (`classifier`, `hidden`);
  last_k  + the last `trainable_last_k` vision blocks and the top of the vision tower: its final norm (AIMv2's
          RMSNorm, CLIP's and SigLIP's post_layernorm), its attention-pool head (AIMv2, SigLIP) and
          `visual_projection` (AIMv2, CLIP) (with k = 0 only that top trains);
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
from autorad_jax.models import families
from autorad_jax.models.autorad_lung import AutoRadLung, build_towers
from autorad_jax.models.baselines import LateFusion, LinearProbe, RadiomicsLogReg, RadiomicsMLP, build_vision
from autorad_jax.models.prompt_learner import PromptLearner
from autorad_jax.models.spec import ModelSpec, PromptTokens

__all__ = ["MODEL_NAMES", "NO_STEP_MODELS", "PROMPT_MODELS", "TOWER_MODELS", "TRAINABLE_MODES", "VISION_MODELS",
           "Model", "ModelSpec", "PromptTokens", "trainable_filter"]

MODEL_NAMES = ("autorad_lung", "coop", "cocoop", "zero_shot", "radiomics_logreg", "radiomics_mlp", "linear_probe",
               "late_fusion")
PROMPT_MODELS = ("autorad_lung", "coop", "cocoop", "zero_shot")  # joint image-text towers + class prompts
VISION_MODELS = ("linear_probe", "late_fusion")  # a vision tower alone
TOWER_MODELS = PROMPT_MODELS + VISION_MODELS  # models with a vision tower
NO_STEP_MODELS = ("radiomics_logreg", "zero_shot")  # fitted without the trainer's step loop
TRAINABLE_MODES = ("prompt", "last_k", "full")
_FROZEN = frozenset({"text_model", "text_projection", "logit_scale", "logit_bias"})
_VISION = frozenset({"vision_model", "visual_projection"})


def Model(model_config, spec: ModelSpec, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model config.model.name names, random-init, with the towers, prompts and sizes of `spec`."""
    name = model_config.name
    dtype = jnp.dtype(model_config.dtype)
    num_classes, num_radiomics = len(spec.class_names), spec.num_radiomics
    if name in TOWER_MODELS and spec.towers is None:
        raise ConfigError(f"config.model.name={name!r} needs towers, and the model spec has none.")
    # The towers draw from `rngs`, the rest from its own key, taken first: unrolled and scanned blocks draw in another
    # order, and the layout must not change the other parameters' initial values.
    towers_rngs, rngs = rngs, nnx.Rngs(rngs.params())
    if name == "radiomics_logreg":
        return RadiomicsLogReg(num_radiomics, num_classes, dtype=dtype, rngs=rngs)
    if name == "radiomics_mlp":
        return RadiomicsMLP(num_radiomics, num_classes, tuple(model_config.radiomics_mlp_hidden), dtype=dtype,
                            rngs=rngs)
    if name == "linear_probe":
        return LinearProbe(build_vision(model_config, spec.vision_config, rngs=towers_rngs), num_classes,
                           pooling=model_config.pooling, dtype=dtype, rngs=rngs)
    if name == "late_fusion":
        return LateFusion(build_vision(model_config, spec.vision_config, rngs=towers_rngs), num_classes, num_radiomics,
                          pooling=model_config.pooling, dtype=dtype, rngs=rngs)
    if name in PROMPT_MODELS:
        return _prompt_model(model_config, spec, towers_rngs=towers_rngs, rngs=rngs)
    raise ConfigError(f"config.model.name must be one of {MODEL_NAMES}, got {name!r}")


def _prompt_model(model_config, spec: ModelSpec, *, towers_rngs: nnx.Rngs, rngs: nnx.Rngs) -> AutoRadLung:
    """Joint towers (drawn from `towers_rngs`) + the prompt learner of config.model.name (from `rngs`): conditioned on
    radiomics (autorad_lung) or on the image feature (cocoop), unconditioned (coop), or fixed (zero_shot)."""
    name = model_config.name
    if families.is_vision_only(spec.towers) or spec.prompts is None:
        raise ConfigError(f"config.model.name={name!r} needs joint image-text towers and class prompts; the "
                         f"model spec has {type(spec.towers).__name__} towers and "
                         f"{'no' if spec.prompts is None else 'its'} prompts.")
    if name == "zero_shot" and not spec.prompts.ctx_from_tokens:
        raise ConfigError("config.model.ctx_init must be a phrase (e.g. 'a CT scan of a') for zero_shot: its prompts "
                         "are that phrase and the class name, fixed.")
    towers = build_towers(model_config, spec.towers, rngs=towers_rngs)
    condition_on = "image" if name == "cocoop" else "radiomics"
    token_table = token_embedding(towers)
    prompt_learner = PromptLearner(
        tokens=spec.prompts, token_embedding=token_table[...],
        cond_dim=families.image_feature_width(spec.towers) if condition_on == "image" else spec.num_radiomics,
        meta_hidden_dim=model_config.meta_hidden_dim,
        conditioning=model_config.conditioning if name in ("autorad_lung", "cocoop") else None,
        learn_ctx=name != "zero_shot", dtype=jnp.dtype(model_config.dtype), rngs=rngs)
    return AutoRadLung(towers, prompt_learner, pooling=model_config.pooling,
                       prompt_chunk_size=model_config.prompt_chunk_size, condition_on=condition_on)


def token_embedding(towers: nnx.Module) -> nnx.Param:
    """The frozen text tower's token table [vocab, width] of a family's joint model."""
    return towers.text_model.embeddings.token_embedding.embedding


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
        if below[0] in families.VISION_TOPS:
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
