"""From a config to a model: resolve its `ModelSpec` (on a fresh start only), build it, load pretrained AIMv2 weights.

    fresh start   spec = resolve_spec(config, radiomics_names)   reads config.model.aimv2_dir/config.json and the
                                                                 tokenizer, once
                  model = models.Model(config.model, spec, rngs)  random init (sharded, by the trainer)
                  load_pretrained(model, config.model, spec)      reads the safetensors, once
    any restore   spec = ModelSpec.from_json(saved)               the checkpoint or export holds it: nothing else is read

`autorad_jax.models` itself reads no file; this module is the one place that connects it to files.
"""

from __future__ import annotations

import os

import ml_collections
from flax import nnx

from autorad_jax import models
from autorad_jax.data import pipeline
from autorad_jax.data.tokenizer import EOT_TOKEN_ID, VOCAB_SIZE, count_tokens, load_tokenizer, tokenize_prompts
from autorad_jax.errors import ConfigError
from autorad_jax.models.aimv2 import Aimv2Config, Aimv2TextConfig, Aimv2VisionConfig
from autorad_jax.models.spec import ModelSpec, PromptTokens, Towers
from autorad_jax.weights import pretrained
from autorad_jax.weights.pretrained import PretrainedFolderError

TOKENIZER_DIR = "tokenizer"  # in a workdir: the text tower's tokenizer, saved on a fresh start


def random_towers(model_config: ml_collections.ConfigDict) -> Aimv2Config:
    """Joint AIMv2 config of random-init towers from config.model.vision/text/projection_dim (CLIP's BPE vocabulary)."""
    return Aimv2Config(
        vision_config=Aimv2VisionConfig(**model_config.vision.to_dict()),
        text_config=Aimv2TextConfig(**model_config.text.to_dict(), vocab_size=VOCAB_SIZE, eos_token_id=EOT_TOKEN_ID),
        projection_dim=model_config.projection_dim)


def towers_config(model_config: ml_collections.ConfigDict) -> Towers | None:
    """The AIMv2 config the model needs: config.model.aimv2_dir's config.json when set, else random-init towers;
    the vision tower alone for the linear probe and late fusion; None for the radiomics-only baselines."""
    name = model_config.name
    if name not in models.TOWER_MODELS:
        return None
    towers = pretrained.read_config(model_config.aimv2_dir) if model_config.aimv2_dir else random_towers(model_config)
    if name in models.VISION_MODELS:
        if isinstance(towers, Aimv2TextConfig):
            raise PretrainedFolderError(f"{model_config.aimv2_dir} holds an AIMv2 text tower; {name} needs "
                                        f"a vision tower (model_type aimv2 or aimv2_vision_model).")
        return towers.vision_config if isinstance(towers, Aimv2Config) else towers
    if not isinstance(towers, Aimv2Config):
        raise PretrainedFolderError(
            f"{model_config.aimv2_dir} holds a {towers.architecture}; {name} needs a joint AIMv2(-LiT) image-text "
            f"model (config.json model_type 'aimv2').")
    return towers


def prompt_tokens(model_config: ml_collections.ConfigDict, class_names: tuple[str, ...],
                  towers: Aimv2Config) -> PromptTokens:
    """Token ids of `[SOS] ctx class-name . [EOS]` per class, with the tokenizer of config.model.aimv2_dir (or CLIP's
    BPE vocabulary), cut after the last EOS. With config.model.ctx_init the context is that phrase (n_ctx its token
    count, as CoOp); without, n_ctx placeholder tokens whose embeddings are replaced by a random context."""
    tokenizer = load_tokenizer(model_config.aimv2_dir or None)
    text = towers.text_config
    if tokenizer.eos_token_id != text.eos_token_id or len(tokenizer) > text.vocab_size:
        raise PretrainedFolderError(
            f"The tokenizer of {model_config.aimv2_dir or 'CLIP BPE'} (EOS {tokenizer.eos_token_id}, {len(tokenizer)} "
            f"tokens) does not fit the text tower (eos_token_id {text.eos_token_id}, vocab_size {text.vocab_size}).")
    ctx_init = model_config.ctx_init.strip()
    n_ctx = count_tokens(tokenizer, ctx_init) if ctx_init else int(model_config.n_ctx)
    prefix = ctx_init or " ".join(["X"] * n_ctx)
    tokens = tokenize_prompts(tokenizer, [f"{prefix} {name}." for name in class_names], text.max_position_embeddings)
    length = int(tokens.eos_index.max()) + 1
    return PromptTokens(tokens.input_ids[:, :length], n_ctx, bool(ctx_init))


def model_spec(model_config: ml_collections.ConfigDict, class_names: tuple[str, ...],
               radiomics_names: tuple[str, ...]) -> ModelSpec:
    """The spec of config.model's model for `class_names` and `radiomics_names`: towers from config.model (reading
    aimv2_dir's config.json when set) and, for the prompt models, the prompts' token ids."""
    towers = towers_config(model_config)
    prompts = prompt_tokens(model_config, class_names, towers) if model_config.name in models.PROMPT_MODELS else None
    return ModelSpec(towers, prompts, tuple(class_names), tuple(radiomics_names))


def resolve_spec(config: ml_collections.ConfigDict, radiomics_names: tuple[str, ...]) -> ModelSpec:
    """The model spec of a fresh start: `model_spec` for the label scheme's class names."""
    return model_spec(config.model, pipeline.class_names(config), radiomics_names)


def save_tokenizer(model_config: ml_collections.ConfigDict, workdir: str) -> None:
    """Saves the prompt models' tokenizer (config.model.aimv2_dir's, or CLIP's BPE) into the workdir, for export."""
    if model_config.name in models.PROMPT_MODELS:
        load_tokenizer(model_config.aimv2_dir or None).save_pretrained(os.path.join(workdir, TOKENIZER_DIR))


def load_pretrained(model: nnx.Module, model_config: ml_collections.ConfigDict, spec: ModelSpec) -> None:
    """Writes config.model.aimv2_dir's weights into the model's AIMv2 towers, in place (strict: every key once, every
    shape checked), and the prompts' fixed token embeddings (`spec.prompts`) from its token table. The linear probe
    and late fusion take the vision tower of a joint folder."""
    folder = model_config.aimv2_dir
    state = pretrained.read_safetensors(folder)
    if model_config.name in models.PROMPT_MODELS:
        pretrained.hf_state_to_nnx(model.aimv2, state, folder)
        model.prompt_learner.embed_tokens(spec.prompts,
                                          model.aimv2.text_model.embeddings.token_embedding.embedding.get_value())
        return
    if model_config.name not in models.VISION_MODELS:
        raise ConfigError(f"config.model.name={model_config.name!r} has no AIMv2 tower to load {folder} into.")
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in state):  # a joint folder: its vision tower
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    pretrained.hf_state_to_nnx(model.vision_model, state, folder)
