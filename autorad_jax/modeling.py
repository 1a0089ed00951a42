"""From a config to a model: resolve its `ModelSpec` (on a fresh start only), build it, load pretrained weights.

    fresh start   spec = resolve_spec(config, radiomics_names)   reads config.model.pretrained_dir/config.json and
                                                                 its tokenizer, once (any tower family)
                  model = models.Model(config.model, spec, rngs)  random init (sharded, by the trainer)
                  load_pretrained(model, config.model, spec)      reads the safetensors, once (init 'pretrained')
    any restore   spec = ModelSpec.from_json(saved)               the checkpoint or export holds it: nothing else is read

Towers come from config.model.pretrained_dir (a transformers save_pretrained folder of AIMv2, CLIP or SigLIP; its
config.json's model_type names the family) or, without a folder, are random-init towers of the family
config.model.towers with the sizes of config.model.vision/text/projection_dim and CLIP's BPE vocabulary.
config.model.init = 'random' builds a folder's towers untrained (its config and tokenizer, not its weights).
`autorad_jax.models` itself reads no file; this module is the one place that connects it to files.
"""

from __future__ import annotations

import os
import shutil

import ml_collections
import numpy as np
from flax import nnx

from autorad_jax import models
from autorad_jax.data import pipeline
from autorad_jax.data.tokenizer import (EOT_TOKEN_ID, SOT_TOKEN_ID, VOCAB_SIZE, count_tokens, folder_tokenizer,
                                        load_tokenizer, tokenize_prompts)
from autorad_jax.errors import ConfigError
from autorad_jax.models import families
from autorad_jax.models.spec import ModelSpec, PromptTokens, Towers
from autorad_jax.weights import pretrained
from autorad_jax.weights.pretrained import PretrainedFolderError

TOKENIZER_DIR = "tokenizer"  # in a workdir: the text tower's tokenizer, saved on a fresh start
INITS = ("pretrained", "random")
_CLIP_BPE = families.TextTokens(vocab_size=VOCAB_SIZE, eos_token_id=EOT_TOKEN_ID, pad_token_id=EOT_TOKEN_ID,
                                bos_token_id=SOT_TOKEN_ID)


def pretrained_dir(model_config: ml_collections.ConfigDict) -> str:
    """config.model.pretrained_dir, or the aimv2_dir of configs written before it ('' when neither is set)."""
    return model_config.get("pretrained_dir") or model_config.get("aimv2_dir") or ""


def loads_pretrained(model_config: ml_collections.ConfigDict) -> bool:
    """True when a fresh start writes a folder's weights into the towers: a folder is given, config.model.init is
    'pretrained' and the model has towers."""
    init = model_config.get("init", "pretrained")
    if init not in INITS:
        raise ConfigError(f"config.model.init must be one of {INITS}, got {init!r}")
    return bool(pretrained_dir(model_config)) and init == "pretrained" and model_config.name in models.TOWER_MODELS


def random_towers(model_config: ml_collections.ConfigDict) -> Towers:
    """Joint config of random-init towers of the family config.model.towers, sized by config.model.vision/text/
    projection_dim, with CLIP's BPE vocabulary."""
    family = families.get(model_config.get("towers", "aimv2"))
    return family.joint_config.from_hf_dict(family.random_config(
        model_config.vision.to_dict(), model_config.text.to_dict(), model_config.projection_dim, _CLIP_BPE))


def towers_config(model_config: ml_collections.ConfigDict) -> Towers | None:
    """The tower config the model needs: the folder's config.json when one is given, else random-init towers; the
    vision tower alone for the linear probe and late fusion; None for the radiomics-only baselines."""
    name = model_config.name
    if name not in models.TOWER_MODELS:
        return None
    folder = pretrained_dir(model_config)
    towers = pretrained.read_config(folder) if folder else random_towers(model_config)
    found = families.by_model_type(towers.model_type)
    joint_types = " or ".join(repr(f.model_type) for f in families.FAMILIES.values())
    if found is None:  # a text tower alone
        raise PretrainedFolderError(f"{folder} holds a {towers.architecture}; {name} needs a vision tower or a joint "
                                    f"image-text model (config.json model_type {joint_types}).")
    _, vision_only = found
    if name in models.VISION_MODELS:
        return towers if vision_only else towers.vision_config
    if vision_only:
        raise PretrainedFolderError(f"{folder} holds a {towers.architecture}; {name} needs a joint image-text model "
                                    f"(config.json model_type {joint_types}).")
    return towers


def tokenizer(model_config: ml_collections.ConfigDict, towers: Towers):
    """The prompts' tokenizer: the folder's (of its family's kind), or CLIP's BPE for random-init towers."""
    folder = pretrained_dir(model_config)
    if not folder:
        return load_tokenizer()
    family = families.of_config(towers)
    return folder_tokenizer(folder, family.tokenizer_class, family.tokenizer_files, bpe_fallback=family.bpe_fallback)


def prompt_tokens(model_config: ml_collections.ConfigDict, class_names: tuple[str, ...], towers: Towers,
                  tokenizer) -> PromptTokens:
    """Token ids of `[SOS] ctx class-name . [EOS]` per class (no SOS where the tokenizer adds none): cut after the last
    EOS for a text tower pooled at EOS, padded to the tower's length for one pooled at its last position (SigLIP).
    With config.model.ctx_init the context is that phrase (n_ctx its token count, as CoOp); without, n_ctx
    placeholder tokens whose embeddings are replaced by a random context."""
    family, text = families.of_config(towers), towers.text_config
    source = pretrained_dir(model_config) or "CLIP BPE"
    # transformers' CLIP pools at the largest id when eos_token_id is 2 (configs written before it was fixed).
    eos_mismatch = family.text_pooling == "eos" and text.eos_token_id not in (tokenizer.eos_token_id, 2)
    if eos_mismatch or len(tokenizer) > text.vocab_size:
        raise PretrainedFolderError(
            f"The tokenizer of {source} (EOS {tokenizer.eos_token_id}, {len(tokenizer)} tokens) does not fit the text "
            f"tower (eos_token_id {text.eos_token_id}, vocab_size {text.vocab_size}).")
    ctx_init = model_config.ctx_init.strip()
    n_ctx = count_tokens(tokenizer, ctx_init) if ctx_init else int(model_config.n_ctx)
    prefix = ctx_init or " ".join(["X"] * n_ctx)
    if count_tokens(tokenizer, prefix) != n_ctx:
        raise ConfigError(f"The tokenizer of {source} splits the placeholder context {prefix!r} into other than "
                          f"{n_ctx} tokens: set config.model.ctx_init.")
    tokens = tokenize_prompts(tokenizer, [f"{prefix} {name}." for name in class_names], text.max_position_embeddings)
    ids = tokens.input_ids if family.text_pooling == "last" else tokens.input_ids[:, :int(tokens.eos_index.max()) + 1]
    ctx_start = int(tokenizer.bos_token_id is not None and ids[0, 0] == tokenizer.bos_token_id)
    return PromptTokens(np.asarray(ids, np.int32), n_ctx, bool(ctx_init), ctx_start)


def model_spec(model_config: ml_collections.ConfigDict, class_names: tuple[str, ...],
               radiomics_names: tuple[str, ...]) -> ModelSpec:
    """The spec of config.model's model for `class_names` and `radiomics_names`: towers from config.model (reading
    the pretrained folder's config.json when set) and, for the prompt models, the prompts' token ids."""
    towers = towers_config(model_config)
    prompts = None
    if model_config.name in models.PROMPT_MODELS:
        prompts = prompt_tokens(model_config, class_names, towers, tokenizer(model_config, towers))
    return ModelSpec(towers, prompts, tuple(class_names), tuple(radiomics_names))


def resolve_spec(config: ml_collections.ConfigDict, radiomics_names: tuple[str, ...]) -> ModelSpec:
    """The model spec of a fresh start: `model_spec` for the label scheme's class names."""
    return model_spec(config.model, pipeline.class_names(config), radiomics_names)


def save_tokenizer(model_config: ml_collections.ConfigDict, workdir: str) -> None:
    """Saves the prompt models' tokenizer (the pretrained folder's, or CLIP's BPE) into the workdir, for export."""
    if model_config.name in models.PROMPT_MODELS:
        tokenizer(model_config, towers_config(model_config)).save_pretrained(os.path.join(workdir, TOKENIZER_DIR))


def copy_tokenizer(tokenizer_dir: str | None, out_dir: str) -> None:
    """Copies a run's saved tokenizer files into `out_dir` (CLIP's BPE when there is none)."""
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        shutil.copytree(tokenizer_dir, out_dir, dirs_exist_ok=True)
    else:
        load_tokenizer().save_pretrained(out_dir)


def load_pretrained(model: nnx.Module, model_config: ml_collections.ConfigDict, spec: ModelSpec) -> None:
    """Writes the pretrained folder's weights into the model's towers, in place (strict: every key once, every shape
    checked), and the prompts' fixed token embeddings (`spec.prompts`) from its token table. The linear probe and
    late fusion take the vision tower of a joint folder."""
    folder = pretrained_dir(model_config)
    state = pretrained.read_safetensors(folder)
    if model_config.name in models.PROMPT_MODELS:
        pretrained.hf_state_to_nnx(model.towers, state, folder)
        model.prompt_learner.embed_tokens(spec.prompts, models.token_embedding(model.towers).get_value())
        return
    if model_config.name not in models.VISION_MODELS:
        raise ConfigError(f"config.model.name={model_config.name!r} has no tower to load {folder} into.")
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in state):  # a joint folder: its vision tower
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    pretrained.hf_state_to_nnx(model.vision_model, state, folder)
