"""SigLIP (vision tower, text tower, joint model) in Flax NNX.

A port of `transformers`' ``modeling_siglip.py`` (``SiglipVisionModel``, ``SiglipTextModel``, ``SiglipModel``): the
SigLIP checkpoints and SigLIP 2's fixed-resolution ones (``model_type`` ``siglip`` too); SigLIP 2's NaFlex variant
(``model_type`` ``siglip2``: flattened patches of any aspect ratio) is another architecture. The blocks are CLIP's
(``clip.ClipEncoderLayer``); the vision tower pools with a multi-head attention probe (MAP head), the text tower takes
its last position through a linear ``head``, and the joint model has no projections but a learned logit bias.
Module and attribute names mirror the PyTorch ones so that the weight map in ``autorad_jax.weights.hf_siglip`` reads
one to one.

Conventions (dtypes, logical axis names) and the shared pieces: ``autorad_jax.models.towers``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from autorad_jax.models.clip import ClipEncoderLayer, ClipMLP, check_tower
from autorad_jax.models.towers import (
    BaseModelOutputWithPooling,
    Encoder,
    ImageTextModel,
    JointConfig,
    SquarePatches,
    TextEmbeddings,
    TowerConfig,
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

# The initial temperature and bias of the SigLIP paper (Zhai et al. 2023, section 3.2) for random-init towers.
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0


# ----------------------------------------------------------------------------------------------------------------------
# Configs (field names as in transformers' config.json)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(SquarePatches, TowerConfig):
    """Vision tower configuration (``model_type`` ``siglip_vision_model``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True

    model_type = "siglip_vision_model"
    architecture = "SiglipVisionModel"

    def __post_init__(self):
        check_tower(self)
        check_square(self)


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(TowerConfig):
    """Text tower configuration (``model_type`` ``siglip_text_model``); ``projection_size`` (the width of the
    pooled output) is ``hidden_size`` unless set, as transformers."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    projection_size: Optional[int] = None

    model_type = "siglip_text_model"
    architecture = "SiglipTextModel"

    def __post_init__(self):
        check_tower(self)
        if self.projection_size is None:
            object.__setattr__(self, "projection_size", self.hidden_size)


@dataclasses.dataclass(frozen=True)
class SiglipConfig(JointConfig):
    """Joint image-text configuration (``model_type`` ``siglip``)."""

    vision_config: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig)
    text_config: SiglipTextConfig = dataclasses.field(default_factory=SiglipTextConfig)
    initializer_factor: float = 1.0

    model_type = "siglip"
    architecture = "SiglipModel"
    vision_config_class = SiglipVisionConfig
    text_config_class = SiglipTextConfig

    def __post_init__(self):
        if self.text_config.projection_size != self.vision_config.hidden_size:
            raise ValueError(f"text_config.projection_size {self.text_config.projection_size} must equal "
                             f"vision_config.hidden_size {self.vision_config.hidden_size} (the embeddings' width)")


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------------------


class SiglipVisionEmbeddings(nnx.Module):
    """Patch tokens (convolution with bias) + learned position embedding (interpolated for other image sizes)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.grid_size = config.grid_size
        self.dtype = dtype
        self.patch_embedding = patch_conv(config, bias=True, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(
            self.grid_size[0] * self.grid_size[1], config.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
            rngs=rngs, embedding_init=param_init((None, "embed")))

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> Array:
        """float32 tokens [B, gh*gw, D] of `pixel_values` [B, H, W, C], resized to `image_size` first when given."""
        x = embed_patches(self.patch_embedding, pixel_values, image_size, self.dtype)
        b, gh, gw, d = x.shape
        table = interpolate_position_embedding(self.position_embedding.embedding[...], self.grid_size, (gh, gw))
        return x.reshape(b, gh * gw, d).astype(jnp.float32) + table


class SiglipMultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention``'s parameters and maths: ``in_proj`` packs the query, key and value projections
    ([D, 3D] kernel, as its ``in_proj_weight``), ``out_proj`` maps the concatenated heads back."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.dtype = dtype
        self.in_proj = linear(hidden_size, 3 * hidden_size, ("embed", "heads"), bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = linear(hidden_size, hidden_size, ("heads", "embed"), bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, query: Array, x: Array) -> Array:
        (b, t, d), q_len = x.shape, query.shape[1]
        kernel, bias = self.in_proj.kernel[...].astype(self.dtype), self.in_proj.bias[...].astype(self.dtype)
        project = lambda y, i: y.astype(self.dtype) @ kernel[:, i * d:(i + 1) * d] + bias[i * d:(i + 1) * d]
        split = lambda y: y.reshape(b, -1, self.num_heads, d // self.num_heads)
        out = jax.nn.dot_product_attention(split(project(query, 0)), split(project(x, 1)), split(project(x, 2)))
        return self.out_proj(out.reshape(b, q_len, d))


class SiglipMultiheadAttentionPoolingHead(nnx.Module):
    """MAP head: a learned ``probe`` attends over the tokens, then ``h + mlp(layernorm(h))``; [B, D]."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.dtype = dtype
        self.probe = nnx.Param(param_init((None, None, "embed"))(rngs.params(), (1, 1, d), jnp.float32))
        self.attention = SiglipMultiheadAttention(d, config.num_attention_heads, dtype=dtype, rngs=rngs)
        self.layernorm = layer_norm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = ClipMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x).astype(jnp.float32)
        h = h + self.mlp(self.layernorm(h)).astype(jnp.float32)
        return h[:, 0].astype(self.dtype)


class SiglipVisionModel(nnx.Module):
    """SigLIP vision tower. ``__call__(pixel_values [B,H,W,C], image_size=None) -> BaseModelOutputWithPooling``.

    ``last_hidden_state`` [B, N, D] is the ``post_layernorm`` output; ``pooler_output`` [B, D] is the MAP head's
    output when ``config.vision_use_head``, otherwise the mean over tokens of ``last_hidden_state`` (transformers
    returns None there). ``H`` and ``W`` may differ from ``config.image_size``: the position embedding is then resized
    (transformers' ``interpolate_pos_encoding=True``). With ``image_size``, the pixels are first resized bilinearly to
    that size. ``scan_layers``/``scan_split``: the blocks' layout (see ``towers.Encoder``).
    """

    def __init__(self, config: SiglipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False, scan_split: int = 0):
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(ClipEncoderLayer, config, dtype=dtype, rngs=rngs,
                               attention_implementation=attention_implementation, remat=remat,
                               remat_policy=remat_policy, scan_layers=scan_layers, scan_split=scan_split)
        self.post_layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.head = (SiglipMultiheadAttentionPoolingHead(config, dtype=dtype, rngs=rngs) if config.vision_use_head
                     else None)

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> BaseModelOutputWithPooling:
        x = self.post_layernorm(self.encoder(self.embeddings(pixel_values, image_size)))
        pooled = self.head(x) if self.head is not None else jnp.mean(x, axis=1)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------------------------------


class SiglipTextModel(nnx.Module):
    """SigLIP text tower. ``__call__(input_ids [B,L], attention_mask=None, *, inputs_embeds=None)``.

    Bidirectional attention; ``attention_mask`` [B, L] (1 = token, 0 = padding) hides padded keys (the SigLIP
    checkpoints were trained on texts padded to ``max_position_embeddings`` without a mask). ``last_hidden_state`` is
    the ``final_layer_norm`` output; ``pooler_output`` [B, projection_size] is ``head`` of its last position, whatever
    the tokens. ``inputs_embeds`` [B, L, D], when given, replaces the token-embedding lookup (position embeddings are
    still added).
    """

    def __init__(self, config: SiglipTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False):
        self.config = config
        self.embeddings = TextEmbeddings(config, rngs=rngs)
        self.encoder = Encoder(ClipEncoderLayer, config, dtype=dtype, rngs=rngs,
                               attention_implementation=attention_implementation, remat=remat,
                               remat_policy=remat_policy, scan_layers=scan_layers)
        self.final_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.head = linear(config.hidden_size, config.projection_size, ("embed", None), bias=True, dtype=dtype,
                           rngs=rngs)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 inputs_embeds: Optional[Array] = None) -> BaseModelOutputWithPooling:
        x = self.embeddings(input_ids, inputs_embeds)
        x = self.final_layer_norm(self.encoder(x, padding_mask(attention_mask), False))
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=self.head(x[:, -1]))


# ----------------------------------------------------------------------------------------------------------------------
# Joint model
# ----------------------------------------------------------------------------------------------------------------------


class SiglipModel(ImageTextModel):
    """SigLIP: the towers' pooled outputs are the embeddings (no projections); ``logit_scale`` and ``logit_bias``
    (shape [1] each, as transformers) give ``logits = exp(logit_scale) * cos + logit_bias``, the logits of SigLIP's
    per-pair sigmoid. Random init: the SigLIP paper's ``log(10)`` and ``-10``. The calls: ``towers.ImageTextModel``."""

    vision_class = SiglipVisionModel
    text_class = SiglipTextModel

    def __init__(self, config: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False, scan_split: int = 0):
        self._init_towers(config, scan_split=scan_split, dtype=dtype, rngs=rngs,
                          attention_implementation=attention_implementation, remat=remat, remat_policy=remat_policy,
                          scan_layers=scan_layers)
        self.logit_scale = nnx.Param(jnp.full((1,), LOGIT_SCALE_INIT, jnp.float32))
        self.logit_bias = nnx.Param(jnp.full((1,), LOGIT_BIAS_INIT, jnp.float32))

    def project_image(self, pooled: Array) -> Array:
        return pooled

    def project_text(self, pooled: Array) -> Array:
        return pooled

    def logit_bias_value(self) -> Array:
        return jnp.reshape(self.logit_bias[...], ())
