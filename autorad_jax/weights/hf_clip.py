"""The CLIP name map: transformers' ``CLIPModel``/``CLIPVisionModel``/``CLIPTextModel`` state dicts <->
``autorad_jax.models.clip`` modules (unrolled or scanned blocks), both directions. Folders: ``autorad_jax.weights``.
"""

from __future__ import annotations

from typing import Optional

from autorad_jax.models.clip import (
    ClipConfig,
    ClipModel,
    ClipTextConfig,
    ClipTextModel,
    ClipVisionConfig,
    ClipVisionModel,
)
from autorad_jax.weights.hf_towers import (
    Entry,
    Family,
    GroupStarts,
    blocks,
    layer_norm,
    linear,
    projections,
    text_embeddings,
)
from autorad_jax.weights.name_map import CONV, COPY, Path


def encoder_layer(hf: str, path: Path, row: Optional[int]) -> list[Entry]:
    """One ``ClipEncoderLayer`` (SigLIP's blocks too)."""
    entries = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        entries += linear(f"{hf}.self_attn.{proj}", path + ("self_attn", proj), True, row)
    for fc in ("fc1", "fc2"):
        entries += linear(f"{hf}.mlp.{fc}", path + ("mlp", fc), True, row)
    for norm in ("layer_norm1", "layer_norm2"):
        entries += layer_norm(f"{hf}.{norm}", path + (norm,), row)
    return entries


def _vision(config: ClipVisionConfig, starts: GroupStarts) -> list[Entry]:
    return ([("embeddings.class_embedding", ("embeddings", "class_embedding"), COPY, None),
             ("embeddings.patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"), CONV, None),
             ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY, None)]
            + layer_norm("pre_layrnorm", ("pre_layrnorm",))
            + blocks(config.num_hidden_layers, starts, encoder_layer)
            + layer_norm("post_layernorm", ("post_layernorm",)))


def _text(config: ClipTextConfig, starts: GroupStarts) -> list[Entry]:
    return (text_embeddings() + blocks(config.num_hidden_layers, starts, encoder_layer)
            + layer_norm("final_layer_norm", ("final_layer_norm",)))


FAMILY = Family("clip", joint=(ClipConfig, ClipModel), vision=(ClipVisionConfig, ClipVisionModel),
                text=(ClipTextConfig, ClipTextModel), vision_entries=_vision, text_entries=_text,
                joint_entries=projections)
