"""CLIP (vision tower, text tower, joint model) in Flax NNX.

A port of `transformers`' ``modeling_clip.py`` (``CLIPVisionModel``, ``CLIPTextModel``, ``CLIPModel``). Module and
attribute names mirror the PyTorch ones so that the weight map in ``autorad_jax.weights.hf_clip`` reads one to one.
The pre-LayerNorm block (``ClipEncoderLayer``) and its MLP are SigLIP's too (``autorad_jax.models.siglip``).

Conventions (dtypes, logical axis names) and the shared pieces: ``autorad_jax.models.towers``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from autorad_jax.models.towers import (
    Attention,
    BaseModelOutputWithPooling,
    Encoder,
    JointConfig,
    ProjectedImageTextModel,
    SquarePatches,
    TextEmbeddings,
    TowerConfig,
    check_heads,
    check_square,
    embed_patches,
    interpolate_position_embedding,
    layer_norm,
    linear,
    padding_mask,
    param_init,
    patch_conv,
)

Array = jax.Array

# transformers' ACT2FN entries of the CLIP and SigLIP checkpoints.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}


def check_tower(config) -> None:
    """ValueError unless the tower's activation is known and its width splits into the heads."""
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {config.hidden_act!r}")
    check_heads(config)


# ----------------------------------------------------------------------------------------------------------------------
# Configs (field names as in transformers' config.json)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(SquarePatches, TowerConfig):
    """Vision tower configuration (``model_type`` ``clip_vision_model``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    model_type = "clip_vision_model"
    architecture = "CLIPVisionModel"

    def __post_init__(self):
        check_tower(self)
        check_square(self)


@dataclasses.dataclass(frozen=True)
class ClipTextConfig(TowerConfig):
    """Text tower configuration (``model_type`` ``clip_text_model``)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    model_type = "clip_text_model"
    architecture = "CLIPTextModel"

    def __post_init__(self):
        check_tower(self)
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be a single int, got {self.eos_token_id!r}")


@dataclasses.dataclass(frozen=True)
class ClipConfig(JointConfig):
    """Joint image-text configuration (``model_type`` ``clip``)."""

    vision_config: ClipVisionConfig = dataclasses.field(default_factory=ClipVisionConfig)
    text_config: ClipTextConfig = dataclasses.field(default_factory=ClipTextConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0

    model_type = "clip"
    architecture = "CLIPModel"
    vision_config_class = ClipVisionConfig
    text_config_class = ClipTextConfig


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks (SigLIP's too)
# ----------------------------------------------------------------------------------------------------------------------


class ClipMLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with the config's ``hidden_act``."""

    def __init__(self, config, *, dtype, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.intermediate_size
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = linear(d, h, ("embed", "mlp"), bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = linear(h, d, ("mlp", "embed"), bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.activation(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    """Pre-norm block: ``x + self_attn(layer_norm1(x))`` then ``x + mlp(layer_norm2(x))``."""

    def __init__(self, config, *, dtype, rngs: nnx.Rngs, attention_implementation: Optional[str] = None):
        d = config.hidden_size
        self.self_attn = Attention(d, config.num_attention_heads, bias=True, dtype=dtype, rngs=rngs,
                                   implementation=attention_implementation)
        self.layer_norm1 = layer_norm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = ClipMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Optional[Array] = None, causal: bool = False) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, causal=causal).astype(x.dtype)
        return x + self.mlp(self.layer_norm2(x)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------------------


class ClipVisionEmbeddings(nnx.Module):
    """``[class_embedding, patch tokens]`` + learned position embedding (the patch part interpolated for other image
    sizes); the patch convolution has no bias."""

    def __init__(self, config: ClipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.grid_size = config.grid_size
        self.dtype = dtype
        self.class_embedding = nnx.Param(param_init(("embed",))(rngs.params(), (d,), jnp.float32))
        self.patch_embedding = patch_conv(config, bias=False, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(
            self.grid_size[0] * self.grid_size[1] + 1, d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=param_init((None, "embed")))

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> Array:
        """float32 tokens [B, 1 + gh*gw, D] of `pixel_values` [B, H, W, C], resized to `image_size` first when given."""
        x = embed_patches(self.patch_embedding, pixel_values, image_size, self.dtype)
        b, gh, gw, d = x.shape
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, d))
        x = jnp.concatenate([cls, x.reshape(b, gh * gw, d).astype(jnp.float32)], axis=1)
        table = self.position_embedding.embedding[...]
        patches = interpolate_position_embedding(table[1:], self.grid_size, (gh, gw))
        return x + jnp.concatenate([table[:1], patches], axis=0)


class ClipVisionModel(nnx.Module):
    """CLIP vision tower. ``__call__(pixel_values [B,H,W,C], image_size=None) -> BaseModelOutputWithPooling``.

    As transformers: ``last_hidden_state`` [B, 1 + N, D] is the last block's output (no final norm) and
    ``pooler_output`` [B, D] is ``post_layernorm`` of its class token. ``H`` and ``W`` may differ from
    ``config.image_size``: the position embedding is then resized (transformers' ``interpolate_pos_encoding=True``).
    With ``image_size``, the pixels are first resized bilinearly to that size. ``scan_layers``/``scan_split``: the
    blocks' layout (see ``towers.Encoder``).
    """

    def __init__(self, config: ClipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False, scan_split: int = 0):
        self.config = config
        self.dtype = dtype
        self.embeddings = ClipVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(ClipEncoderLayer, config, dtype=dtype, rngs=rngs,
                               attention_implementation=attention_implementation, remat=remat,
                               remat_policy=remat_policy, scan_layers=scan_layers, scan_split=scan_split)
        self.post_layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> BaseModelOutputWithPooling:
        x = self.pre_layrnorm(self.embeddings(pixel_values, image_size)).astype(jnp.float32)
        x = self.encoder(x)
        return BaseModelOutputWithPooling(last_hidden_state=x.astype(self.dtype),
                                          pooler_output=self.post_layernorm(x[:, 0]))


# ----------------------------------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------------------------------


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """[B] position of each row's end-of-text token, as transformers' ``CLIPTextModel``: the first ``eos_token_id``
    (0 when there is none), or, for the legacy configs whose ``eos_token_id`` is 2, the highest token id (the
    original CLIP vocabulary ends with its EOS token)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class ClipTextModel(nnx.Module):
    """CLIP text tower. ``__call__(input_ids [B,L], attention_mask=None, *, inputs_embeds=None)``.

    Causal attention; ``attention_mask`` [B, L] (1 = token, 0 = padding) additionally hides padded keys.
    ``last_hidden_state`` is the ``final_layer_norm`` output and ``pooler_output`` its row at ``eos_positions``.
    ``inputs_embeds`` [B, L, D], when given, replaces the token-embedding lookup (position embeddings are still added)
    while ``input_ids`` still selects the pooled position.
    """

    def __init__(self, config: ClipTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False):
        self.config = config
        self.embeddings = TextEmbeddings(config, rngs=rngs)
        self.encoder = Encoder(ClipEncoderLayer, config, dtype=dtype, rngs=rngs,
                               attention_implementation=attention_implementation, remat=remat,
                               remat_policy=remat_policy, scan_layers=scan_layers)
        self.final_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 inputs_embeds: Optional[Array] = None) -> BaseModelOutputWithPooling:
        x = self.embeddings(input_ids, inputs_embeds)
        x = self.final_layer_norm(self.encoder(x, padding_mask(attention_mask), True))
        eos = eos_positions(input_ids, self.config.eos_token_id)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------------------------------
# Joint model
# ----------------------------------------------------------------------------------------------------------------------


class ClipModel(ProjectedImageTextModel):
    """CLIP: vision tower + text tower + bias-free projections + ``logit_scale_value() = exp(logit_scale)`` (not
    clamped, as transformers). The calls: ``towers.ImageTextModel``."""

    vision_class = ClipVisionModel
    text_class = ClipTextModel
