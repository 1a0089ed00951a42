"""The SigLIP name map: transformers' ``SiglipModel``/``SiglipVisionModel``/``SiglipTextModel`` state dicts <->
``autorad_jax.models.siglip`` modules (unrolled or scanned blocks), both directions. Folders: ``autorad_jax.weights``.
"""

from __future__ import annotations

from autorad_jax.models.siglip import (
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from autorad_jax.weights.hf_clip import encoder_layer
from autorad_jax.weights.hf_towers import Entry, Family, GroupStarts, blocks, layer_norm, linear, text_embeddings
from autorad_jax.weights.name_map import CONV, COPY, LINEAR


def _head(config: SiglipVisionConfig) -> list[Entry]:
    """The MAP head; torch.nn.MultiheadAttention's packed in_proj_weight/in_proj_bias map to one [D, 3D] linear."""
    path = ("head",)
    return ([("head.probe", path + ("probe",), COPY, None),
             ("head.attention.in_proj_weight", path + ("attention", "in_proj", "kernel"), LINEAR, None),
             ("head.attention.in_proj_bias", path + ("attention", "in_proj", "bias"), COPY, None)]
            + linear("head.attention.out_proj", path + ("attention", "out_proj"), True)
            + layer_norm("head.layernorm", path + ("layernorm",))
            + linear("head.mlp.fc1", path + ("mlp", "fc1"), True)
            + linear("head.mlp.fc2", path + ("mlp", "fc2"), True))


def _vision(config: SiglipVisionConfig, starts: GroupStarts) -> list[Entry]:
    entries = ([("embeddings.patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"), CONV, None),
                ("embeddings.patch_embedding.bias", ("embeddings", "patch_embedding", "bias"), COPY, None),
                ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY,
                 None)]
               + blocks(config.num_hidden_layers, starts, encoder_layer)
               + layer_norm("post_layernorm", ("post_layernorm",)))
    return entries + _head(config) if config.vision_use_head else entries


def _text(config: SiglipTextConfig, starts: GroupStarts) -> list[Entry]:
    return (text_embeddings() + blocks(config.num_hidden_layers, starts, encoder_layer)
            + layer_norm("final_layer_norm", ("final_layer_norm",)) + linear("head", ("head",), True))


def _joint(config: SiglipConfig) -> list[Entry]:
    del config  # the same keys for every size
    return [("logit_scale", ("logit_scale",), COPY, None), ("logit_bias", ("logit_bias",), COPY, None)]


FAMILY = Family("siglip", joint=(SiglipConfig, SiglipModel), vision=(SiglipVisionConfig, SiglipVisionModel),
                text=(SiglipTextConfig, SiglipTextModel), vision_entries=_vision, text_entries=_text,
                joint_entries=_joint)
