"""AIMv2 (vision tower, LiT text tower, joint model) in Flax NNX.

A port of `transformers`' ``modeling_aimv2.py`` (``Aimv2VisionModel``, ``Aimv2TextModel``, ``Aimv2Model``), which in
turn follows apple/ml-aim. Module and attribute names mirror the PyTorch ones so that the weight map in
``autorad_jax.weights.hf_aimv2`` reads one to one.

Conventions (dtypes, logical axis names) and the shared pieces: ``autorad_jax.models.towers``.
"""

from __future__ import annotations

import dataclasses
import math
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
    linear,
    padding_mask,
    param_init,
    patch_conv,
)

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------------------
# Configs (field names as in transformers' config.json)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Aimv2VisionConfig(SquarePatches, TowerConfig):
    """Vision tower configuration (``model_type`` ``aimv2_vision_model``)."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    use_head: bool = True
    is_native: bool = False

    model_type = "aimv2_vision_model"
    architecture = "Aimv2VisionModel"

    def __post_init__(self):
        _check_common(self)
        if self.is_native:
            raise ValueError("is_native=True (sinusoidal position embeddings) is not supported")
        check_square(self)


@dataclasses.dataclass(frozen=True)
class Aimv2TextConfig(TowerConfig):
    """Text tower configuration (``model_type`` ``aimv2_text_model``)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    max_position_embeddings: int = 77
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    eos_token_id: int = 49407
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02

    model_type = "aimv2_text_model"
    architecture = "Aimv2TextModel"

    def __post_init__(self):
        _check_common(self)
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be a single int, got {self.eos_token_id!r}")


@dataclasses.dataclass(frozen=True)
class Aimv2Config(JointConfig):
    """Joint image-text configuration (``model_type`` ``aimv2``)."""

    vision_config: Aimv2VisionConfig = dataclasses.field(default_factory=Aimv2VisionConfig)
    text_config: Aimv2TextConfig = dataclasses.field(default_factory=Aimv2TextConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    max_logit_scale: float = 100.0
    initializer_factor: float = 1.0

    model_type = "aimv2"
    architecture = "Aimv2Model"
    vision_config_class = Aimv2VisionConfig
    text_config_class = Aimv2TextConfig


def _check_common(config) -> None:
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {config.hidden_act!r}")
    check_heads(config)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class Aimv2RMSNorm(nnx.Module):
    """RMSNorm computed in float32: ``weight * x / sqrt(mean(x^2) + eps)``, returned in ``dtype``."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * x).astype(self.dtype)


class Aimv2MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config, *, dtype, rngs: nnx.Rngs):
        d, h, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = linear(d, h, ("embed", "mlp"), bias=b, dtype=dtype, rngs=rngs)
        self.up_proj = linear(d, h, ("embed", "mlp"), bias=b, dtype=dtype, rngs=rngs)
        self.down_proj = linear(h, d, ("mlp", "embed"), bias=b, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Aimv2EncoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(rms_norm1(x))`` then ``x + ffn(rms_norm2(x))``."""

    def __init__(self, config, *, dtype, rngs: nnx.Rngs, attention_implementation: Optional[str] = None):
        self.attention = Attention(config.hidden_size, config.num_attention_heads, bias=config.qkv_bias, dtype=dtype,
                                   rngs=rngs, implementation=attention_implementation)
        self.ffn = Aimv2MLP(config, dtype=dtype, rngs=rngs)
        self.rms_norm1 = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.rms_norm2 = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def __call__(self, x: Array, mask: Optional[Array] = None, causal: bool = False) -> Array:
        x = x + self.attention(self.rms_norm1(x), mask=mask, causal=causal).astype(x.dtype)
        return x + self.ffn(self.rms_norm2(x)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------------------


class Aimv2VisionEmbeddings(nnx.Module):
    """Patch conv (stride = patch) -> RMSNorm -> + learned position embedding (interpolated for other image sizes)."""

    def __init__(self, config: Aimv2VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.grid_size = config.grid_size
        self.dtype = dtype
        self.patch_embed = patch_conv(config, bias=True, dtype=dtype, rngs=rngs)
        self.rms_norm = Aimv2RMSNorm(d, config.rms_norm_eps, dtype=dtype)
        self.position_embedding = nnx.Embed(
            self.grid_size[0] * self.grid_size[1], d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=param_init((None, "embed")))

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> Array:
        """Patch tokens of `pixel_values` [B, H, W, C], resized bilinearly to `image_size` first when given."""
        x = embed_patches(self.patch_embed, pixel_values, image_size, self.dtype)
        b, gh, gw, d = x.shape
        x = self.rms_norm(x.reshape(b, gh * gw, d)).astype(jnp.float32)
        return x + interpolate_position_embedding(self.position_embedding.embedding[...], self.grid_size, (gh, gw))


class Aimv2AttentionPoolingHead(nnx.Module):
    """One learned query (``cls_token``) attends over the tokens; per-head outputs concatenated -> ``output_proj``."""

    def __init__(self, config: Aimv2VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, b = config.hidden_size, config.qkv_bias
        self.num_heads = config.num_attention_heads
        self.dtype = dtype
        self.k_proj = linear(d, d, ("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, d, ("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(
            param_init((None, None, "embed"))(rngs.params(), (1, 1, d), jnp.float32))
        self.output_proj = linear(d, d, ("heads", "embed"), bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        hd = d // self.num_heads
        q = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d)).reshape(b, 1, self.num_heads, hd)
        k = self.k_proj(x).reshape(b, t, self.num_heads, hd)
        v = self.v_proj(x).reshape(b, t, self.num_heads, hd)
        out = jax.nn.dot_product_attention(q, k, v)
        return self.output_proj(out.reshape(b, d))


class Aimv2VisionModel(nnx.Module):
    """AIMv2 vision tower. ``__call__(pixel_values [B,H,W,C]) -> BaseModelOutputWithPooling``.

    ``last_hidden_state`` [B, N, D] is the final-RMSNorm output. ``pooler_output`` [B, D] is the attention-pooling head
    output when ``config.use_head``; otherwise the mean over tokens of ``last_hidden_state`` (transformers returns None
    there). ``H`` and ``W`` may differ from ``config.image_size``: the position embedding is then resized with
    ``interpolate_position_embedding``. With ``image_size``, the pixels are first resized bilinearly to that size
    (``autorad_jax.models.resize``; folded into the patch convolution where the sizes allow).
    ``scan_layers``/``scan_split``: the blocks' layout (see ``towers.Encoder``).
    """

    def __init__(self, config: Aimv2VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False, scan_split: int = 0):
        self.config = config
        self.embeddings = Aimv2VisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(Aimv2EncoderLayer, config, dtype=dtype, rngs=rngs,
                               attention_implementation=attention_implementation, remat=remat,
                               remat_policy=remat_policy, scan_layers=scan_layers, scan_split=scan_split)
        self.rms_norm = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.head = Aimv2AttentionPoolingHead(config, dtype=dtype, rngs=rngs) if config.use_head else None

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> BaseModelOutputWithPooling:
        x = self.rms_norm(self.encoder(self.embeddings(pixel_values, image_size)))
        pooled = self.head(x) if self.head is not None else jnp.mean(x, axis=1)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------------------------------


class Aimv2TextModel(nnx.Module):
    """AIMv2-LiT text tower. ``__call__(input_ids [B,L], attention_mask=None, *, inputs_embeds=None)``.

    Attention is always causal, as in the original AIMv2-LiT text encoder; ``attention_mask`` [B, L] (1 = token,
    0 = padding) additionally hides padded keys. Note: transformers' ``Aimv2TextModel`` builds its causal mask only when
    an ``attention_mask`` is passed (without one it attends bidirectionally), and with its default ``sdpa`` attention
    an all-ones mask is dropped altogether (bidirectional again); compare against it with an ``attention_mask`` and
    ``attn_implementation="eager"``. ``pooler_output`` is ``last_hidden_state`` at the first ``eos_token_id`` in ``input_ids``
    (position 0 when there is none, as transformers' argmax). ``inputs_embeds`` [B, L, D], when given, replaces the
    token-embedding lookup (position embeddings are still added) while ``input_ids`` still selects the pooled position.
    """

    def __init__(self, config: Aimv2TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False):
        self.config = config
        self.embeddings = TextEmbeddings(config, rngs=rngs)
        self.encoder = Encoder(Aimv2EncoderLayer, config, dtype=dtype, rngs=rngs,
                               attention_implementation=attention_implementation, remat=remat,
                               remat_policy=remat_policy, scan_layers=scan_layers)
        self.rms_norm = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 inputs_embeds: Optional[Array] = None) -> BaseModelOutputWithPooling:
        x = self.embeddings(input_ids, inputs_embeds)
        x = self.rms_norm(self.encoder(x, padding_mask(attention_mask), True))
        eos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------------------------------
# Joint model
# ----------------------------------------------------------------------------------------------------------------------


class Aimv2Model(ProjectedImageTextModel):
    """AIMv2-LiT: vision tower + text tower + bias-free projections + clamped logit scale:
    ``logit_scale_value() = exp(clip(logit_scale, 0, log(max_logit_scale)))`` as transformers. The calls:
    ``towers.ImageTextModel``.
    """

    vision_class = Aimv2VisionModel
    text_class = Aimv2TextModel

    def logit_scale_value(self) -> Array:
        return jnp.exp(jnp.clip(self.logit_scale[...], 0.0, math.log(self.config.max_logit_scale)))
