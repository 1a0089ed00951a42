"""The AIMv2 name map: transformers' ``Aimv2Model``/``Aimv2VisionModel``/``Aimv2TextModel`` state dicts <->
``autorad_jax.models.aimv2`` modules (unrolled or scanned blocks), both directions. Folders: ``autorad_jax.weights``.
"""

from __future__ import annotations

from autorad_jax.models.aimv2 import (
    Aimv2Config,
    Aimv2Model,
    Aimv2TextConfig,
    Aimv2TextModel,
    Aimv2VisionConfig,
    Aimv2VisionModel,
)
from autorad_jax.weights.hf_towers import Entry, Family, GroupStarts, blocks, linear, projections, text_embeddings
from autorad_jax.weights.name_map import CONV, COPY, Path


def _encoder(config: Aimv2VisionConfig | Aimv2TextConfig, starts: GroupStarts) -> list[Entry]:
    def block(hf: str, path: Path, row) -> list[Entry]:
        entries = []
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            entries += linear(f"{hf}.attention.{proj}", path + ("attention", proj), config.qkv_bias, row)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries += linear(f"{hf}.ffn.{proj}", path + ("ffn", proj), config.mlp_bias, row)
        for norm in ("rms_norm1", "rms_norm2"):
            entries.append((f"{hf}.{norm}.weight", path + (norm, "weight"), COPY, row))
        return entries

    return blocks(config.num_hidden_layers, starts, block) + [("rms_norm.weight", ("rms_norm", "weight"), COPY, None)]


def _vision(config: Aimv2VisionConfig, starts: GroupStarts) -> list[Entry]:
    entries = [
        ("embeddings.patch_embed.weight", ("embeddings", "patch_embed", "kernel"), CONV, None),
        ("embeddings.patch_embed.bias", ("embeddings", "patch_embed", "bias"), COPY, None),
        ("embeddings.rms_norm.weight", ("embeddings", "rms_norm", "weight"), COPY, None),
        ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY, None),
    ] + _encoder(config, starts)
    if config.use_head:
        entries += [("head.cls_token", ("head", "cls_token"), COPY, None)]
        entries += linear("head.k_proj", ("head", "k_proj"), config.qkv_bias)
        entries += linear("head.v_proj", ("head", "v_proj"), config.qkv_bias)
        entries += linear("head.output_proj", ("head", "output_proj"), True)
    return entries


def _text(config: Aimv2TextConfig, starts: GroupStarts) -> list[Entry]:
    return text_embeddings() + _encoder(config, starts)


FAMILY = Family("aimv2", joint=(Aimv2Config, Aimv2Model), vision=(Aimv2VisionConfig, Aimv2VisionModel),
                text=(Aimv2TextConfig, Aimv2TextModel), vision_entries=_vision, text_entries=_text,
                joint_entries=projections)
