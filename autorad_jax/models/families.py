"""The tower families (AIMv2, CLIP, SigLIP): the one place that says how they differ.

Every family is one models/ module with a joint image-text model (`autorad_jax.models.towers.ImageTextModel`:
`vision_model`, `text_model`, `project_image`, `get_text_features(input_ids, attention_mask=None, inputs_embeds=None)`,
`logit_scale_value()`, `logit_bias_value()`) and a vision-only model, both built from a config dataclass that reads
and writes transformers' config.json (`from_hf_dict`/`to_hf_dict`). What the rest of the code needs to know about a
family is a field of its `Family`: which config.json `model_type`s it reads, where its text tower pools (CLIP and
AIMv2 at the EOS token of a causal tower, so a prompt can end there; SigLIP at the last position of a bidirectional
tower, so its prompts keep the fixed padding length it was trained with), whether its image feature is projected,
which tokenizer its folders carry and how random-init towers are configured. Family modules are imported when first
used.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import numpy as np

from autorad_jax.errors import ConfigError

# The input pipeline's normalisation (autorad_jax.data.preprocess): OpenAI CLIP's per-channel mean and std, which AIMv2
# was trained with too. A family trained with other values gets the pipeline's images re-normalised in its vision
# tower's input (`to_family_normalisation`).
PIPELINE_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIPELINE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Family:
    """One tower family. `module` holds the classes named by the `*_class` fields (imported on first use)."""
    name: str
    module: str
    joint_class: str
    joint_config_class: str
    vision_class: str
    vision_config_class: str
    model_type: str  # config.json of a joint folder
    vision_model_type: str  # config.json of a vision-only folder
    text_pooling: str  # 'eos': causal tower pooled at EOS (prompts cut after it); 'last': last of a fixed length
    projects_image: bool  # a projection after the vision pooler (else the pooler's width is the feature's)
    tokenizer_class: str  # transformers class of the folder's tokenizer
    tokenizer_files: tuple[tuple[str, ...], ...]  # the files a folder needs for it: one of these sets
    bpe_fallback: bool  # a folder without tokenizer files takes CLIP's BPE vocabulary (AIMv2-LiT was trained on it)
    random_config: Callable[..., dict[str, Any]]  # (vision, text, projection_dim, tokens) -> joint config.json dict
    vision_tops: tuple[str, ...]  # children of vision_model above its blocks (they train with trainable='last_k')
    image_mean: tuple[float, ...] = PIPELINE_MEAN  # the per-channel normalisation its vision tower was trained with
    image_std: tuple[float, ...] = PIPELINE_STD

    def _attr(self, name: str):
        return getattr(importlib.import_module(self.module), name)

    @property
    def joint_model(self) -> type:
        return self._attr(self.joint_class)

    @property
    def vision_model(self) -> type:
        return self._attr(self.vision_class)

    @property
    def joint_config(self) -> type:
        return self._attr(self.joint_config_class)

    @property
    def vision_config(self) -> type:
        return self._attr(self.vision_config_class)


@dataclasses.dataclass(frozen=True)
class TextTokens:
    """What a random text tower needs to know of its tokenizer."""
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: Optional[int]


def _aimv2_config(vision: dict, text: dict, projection_dim: int, tokens: TextTokens) -> dict[str, Any]:
    return {"model_type": "aimv2", "projection_dim": projection_dim, "vision_config": vision,
            "text_config": {**text, "vocab_size": tokens.vocab_size, "eos_token_id": tokens.eos_token_id}}


def _clip_config(vision: dict, text: dict, projection_dim: int, tokens: TextTokens) -> dict[str, Any]:
    return {"model_type": "clip", "projection_dim": projection_dim, "vision_config": vision,
            "text_config": {**text, "vocab_size": tokens.vocab_size, "eos_token_id": tokens.eos_token_id,
                            "pad_token_id": tokens.pad_token_id, "bos_token_id": tokens.bos_token_id}}


def _siglip_config(vision: dict, text: dict, projection_dim: int, tokens: TextTokens) -> dict[str, Any]:
    # SigLIP has no projections: the text tower's head maps to the vision tower's width, the embeddings' width.
    del projection_dim
    return {"model_type": "siglip", "vision_config": vision,
            "text_config": {**text, "vocab_size": tokens.vocab_size, "eos_token_id": tokens.eos_token_id,
                            "pad_token_id": tokens.pad_token_id, "projection_size": vision["hidden_size"]}}


_CLIP_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
FAMILIES = {f.name: f for f in (
    Family("aimv2", "autorad_jax.models.aimv2", "Aimv2Model", "Aimv2Config", "Aimv2VisionModel", "Aimv2VisionConfig",
           "aimv2", "aimv2_vision_model", text_pooling="eos", projects_image=True,
           tokenizer_class="CLIPTokenizer", tokenizer_files=_CLIP_FILES, bpe_fallback=True,
           random_config=_aimv2_config, vision_tops=("rms_norm", "head")),
    Family("clip", "autorad_jax.models.clip", "ClipModel", "ClipConfig", "ClipVisionModel", "ClipVisionConfig",
           "clip", "clip_vision_model", text_pooling="eos", projects_image=True,
           tokenizer_class="CLIPTokenizer", tokenizer_files=_CLIP_FILES, bpe_fallback=False,
           random_config=_clip_config, vision_tops=("post_layernorm",)),
    Family("siglip", "autorad_jax.models.siglip", "SiglipModel", "SiglipConfig", "SiglipVisionModel",
           "SiglipVisionConfig", "siglip", "siglip_vision_model", text_pooling="last", projects_image=False,
           tokenizer_class="SiglipTokenizer", tokenizer_files=(("spiece.model",),), bpe_fallback=False,
           random_config=_siglip_config, vision_tops=("post_layernorm", "head"), image_mean=(0.5, 0.5, 0.5),
           image_std=(0.5, 0.5, 0.5)),
)}
VISION_TOPS = frozenset(name for f in FAMILIES.values() for name in f.vision_tops)


def get(name: str) -> Family:
    """The family called `name` ('aimv2', 'clip', 'siglip')."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown tower family {name!r}; the families are {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def by_model_type(model_type: str) -> Optional[tuple[Family, bool]]:
    """(family, is the vision tower alone) of a config.json `model_type`, None when no family reads it."""
    for family in FAMILIES.values():
        if model_type in (family.model_type, family.vision_model_type):
            return family, model_type == family.vision_model_type
    return None


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for f in FAMILIES.values() for t in (f.model_type, f.vision_model_type))


def of_config(towers) -> Family:
    """The family of a joint or vision tower config."""
    return by_model_type(towers.model_type)[0]


def is_vision_only(towers) -> bool:
    """True for a vision tower's config, False for a joint image-text config."""
    return by_model_type(towers.model_type)[1]


def to_family_normalisation(images, vision_config):
    """Images [B, H, W, 3] normalised as the pipeline does, normalised instead as `vision_config`'s family was trained
    (an affine map per channel, which commutes with the bilinear resize); unchanged for AIMv2 and CLIP."""
    family = of_config(vision_config)
    if (family.image_mean, family.image_std) == (PIPELINE_MEAN, PIPELINE_STD):
        return images
    pipeline_mean, pipeline_std = np.asarray(PIPELINE_MEAN, np.float32), np.asarray(PIPELINE_STD, np.float32)
    mean, std = np.asarray(family.image_mean, np.float32), np.asarray(family.image_std, np.float32)
    return images * (pipeline_std / std) + (pipeline_mean - mean) / std


def image_feature_width(towers) -> int:
    """Width of a joint model's image feature: its projection's, or the vision tower's own without one."""
    return towers.projection_dim if of_config(towers).projects_image else towers.vision_config.hidden_size


def config_from_hf_dict(d: dict[str, Any]):
    """The config dataclass of a config.json dict (joint or vision-only), by its `model_type`."""
    found = by_model_type(d.get("model_type", ""))
    if found is None:
        raise ConfigError(f"model_type {d.get('model_type')!r} is none of {', '.join(supported_model_types())}.")
    family, vision_only = found
    return (family.vision_config if vision_only else family.joint_config).from_hf_dict(d)
