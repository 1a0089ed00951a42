"""AIMv2 (vision tower, LiT text tower, joint model) in Flax NNX.

A port of `transformers`' ``modeling_aimv2.py`` (``Aimv2VisionModel``, ``Aimv2TextModel``, ``Aimv2Model``), which in
turn follows apple/ml-aim. Module and attribute names mirror the PyTorch ones so that the weight map in
``autorad_jax.weights.hf_aimv2`` reads one to one.

Conventions:
    * images are NHWC;
    * parameters are float32; ``dtype`` is the compute dtype (float32 or bfloat16) of matmuls, convolutions and
      attention; RMSNorm, the residual stream and the final logits are float32; outputs are in ``dtype``;
    * parameters carry logical axis names (``out_sharding`` metadata) that ``autorad_jax.train.sharding`` maps to
      mesh axes: ``embed`` (model width), ``mlp`` (SwiGLU hidden), ``heads`` (attention heads x head dim, flattened),
      ``vocab`` (token table rows), ``norm`` (RMSNorm scales); ``None`` for axes that are never sharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autorad_jax.models import resize

Array = jax.Array
_INIT_STD = 0.02


# ----------------------------------------------------------------------------------------------------------------------
# Configs (field names as in transformers' config.json)
# ----------------------------------------------------------------------------------------------------------------------


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class _TowerConfig:
    """config.json <-> dataclass for a tower config (keys the dataclass does not know are ignored)."""

    model_type: str

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]):
        return _from_dict(cls, d)

    def to_hf_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": self.model_type}


@dataclasses.dataclass(frozen=True)
class Aimv2VisionConfig(_TowerConfig):
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
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise ValueError(f"image_size/patch_size must be ints, got {self.image_size!r}/{self.patch_size!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        n = self.image_size // self.patch_size
        return (n, n)



@dataclasses.dataclass(frozen=True)
class Aimv2TextConfig(_TowerConfig):
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
class Aimv2Config:
    """Joint image-text configuration (``model_type`` ``aimv2``)."""

    vision_config: Aimv2VisionConfig = dataclasses.field(default_factory=Aimv2VisionConfig)
    text_config: Aimv2TextConfig = dataclasses.field(default_factory=Aimv2TextConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    max_logit_scale: float = 100.0
    initializer_factor: float = 1.0

    model_type = "aimv2"
    architecture = "Aimv2Model"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Aimv2Config":
        d = dict(d)
        d["vision_config"] = Aimv2VisionConfig.from_hf_dict(d.get("vision_config") or {})
        d["text_config"] = Aimv2TextConfig.from_hf_dict(d.get("text_config") or {})
        return _from_dict(cls, d)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision_config"] = self.vision_config.to_hf_dict()
        d["text_config"] = self.text_config.to_hf_dict()
        return {**d, "model_type": self.model_type}


def _check_common(config) -> None:
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {config.hidden_act!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} not divisible by heads {config.num_attention_heads}")


# ----------------------------------------------------------------------------------------------------------------------
# Outputs (attribute access and mapping-style access, as transformers' ModelOutput)
# ----------------------------------------------------------------------------------------------------------------------


class _Mapping:
    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]


@flax.struct.dataclass
class BaseModelOutputWithPooling(_Mapping):
    last_hidden_state: Array
    pooler_output: Array


@flax.struct.dataclass
class Aimv2Output(_Mapping):
    logits_per_image: Array
    logits_per_text: Array
    text_embeds: Array
    image_embeds: Array
    text_model_output: BaseModelOutputWithPooling
    vision_model_output: BaseModelOutputWithPooling


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def _init(names: tuple, init: Callable = nnx.initializers.normal(_INIT_STD)) -> Callable:
    """Initializer carrying logical axis names; sharding is applied explicitly (see train/sharding.py)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(din: int, dout: int, names: tuple, *, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        kernel_init=_init(names), bias_init=_init(names[-1:], nnx.initializers.zeros_init()))


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
        self.gate_proj = _linear(d, h, ("embed", "mlp"), bias=b, dtype=dtype, rngs=rngs)
        self.up_proj = _linear(d, h, ("embed", "mlp"), bias=b, dtype=dtype, rngs=rngs)
        self.down_proj = _linear(h, d, ("mlp", "embed"), bias=b, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Aimv2Attention(nnx.Module):
    """Multi-head self-attention via ``jax.nn.dot_product_attention`` (``implementation``: None = XLA, or 'cudnn')."""

    def __init__(self, config, *, dtype, rngs: nnx.Rngs, implementation: Optional[str] = None):
        d, b = config.hidden_size, config.qkv_bias
        self.num_heads = config.num_attention_heads
        self.implementation = implementation
        self.q_proj = _linear(d, d, ("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.k_proj = _linear(d, d, ("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(d, d, ("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.out_proj = _linear(d, d, ("heads", "embed"), bias=b, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, *, mask: Optional[Array] = None, causal: bool = False) -> Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        out = jax.nn.dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
            mask=mask, is_causal=causal, implementation=self.implementation)
        return self.out_proj(out.reshape(b, t, d))


class Aimv2EncoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(rms_norm1(x))`` then ``x + ffn(rms_norm2(x))``."""

    def __init__(self, config, *, dtype, rngs: nnx.Rngs, attention_implementation: Optional[str] = None):
        self.attention = Aimv2Attention(config, dtype=dtype, rngs=rngs, implementation=attention_implementation)
        self.ffn = Aimv2MLP(config, dtype=dtype, rngs=rngs)
        self.rms_norm1 = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.rms_norm2 = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def __call__(self, x: Array, mask: Optional[Array] = None, causal: bool = False) -> Array:
        x = x + self.attention(self.rms_norm1(x), mask=mask, causal=causal).astype(x.dtype)
        return x + self.ffn(self.rms_norm2(x)).astype(x.dtype)


def _run_layer(layer: Aimv2EncoderLayer, x: Array, mask: Optional[Array], causal: bool) -> Array:
    return layer(x, mask, causal)


def _stacked_layers(config, count: int, *, dtype, rngs: nnx.Rngs,
                    attention_implementation: Optional[str]) -> Aimv2EncoderLayer:
    """``count`` blocks as one ``Aimv2EncoderLayer`` whose parameters have a leading ``layers`` axis (``nnx.vmap``)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Aimv2EncoderLayer:
        return Aimv2EncoderLayer(config, dtype=dtype, rngs=rngs, attention_implementation=attention_implementation)

    return make(rngs)


def _scan_layers(stack: Aimv2EncoderLayer, x: Array, mask: Optional[Array], causal: bool, remat: bool,
                 policy: Optional[Callable[..., bool]]) -> Array:
    """``x`` through the stacked blocks of ``stack`` in order (``jax.lax.scan``), each rematerialised with ``remat``."""
    graphdef, state = nnx.split(stack)

    def body(h: Array, layer_state) -> tuple[Array, None]:
        return nnx.merge(graphdef, layer_state)(h, mask, causal), None

    if remat:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return jax.lax.scan(body, x, state)[0]


def scan_group_starts(num_layers: int, split: int = 0) -> tuple[int, ...]:
    """First block of each scanned group: one group, or two (``[0, split)`` and ``[split, num_layers)``)."""
    return (0, split) if 0 < split < num_layers else (0,)


class Aimv2Encoder(nnx.Module):
    """The blocks, unrolled or scanned; ``remat=True`` wraps each block in ``jax.checkpoint`` (``remat_policy``).

    Unrolled (``scan_layers=False``): ``layers`` is an ``nnx.List`` of ``num_hidden_layers`` blocks, as transformers.
    Scanned: ``layers`` is an ``nnx.Dict`` of stacked groups keyed by their first block (``"0"``, and ``str(scan_split)``
    when ``0 < scan_split < num_hidden_layers``), whose parameters have a leading ``layers`` axis; the groups run one
    after the other, each as one ``jax.lax.scan``, so trace and compile time do not grow with depth. Splitting the
    stack lets a parameter filter freeze the first blocks and train the last ones (``trainable='last_k'``).
    ``group_starts`` is None when unrolled.
    """

    def __init__(self, config, *, dtype, rngs: nnx.Rngs, attention_implementation: Optional[str] = None,
                 remat: bool = False, remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False,
                 scan_split: int = 0):
        n = config.num_hidden_layers
        kw = dict(dtype=dtype, rngs=rngs, attention_implementation=attention_implementation)
        if scan_layers:
            self.group_starts = scan_group_starts(n, scan_split)
            ends = self.group_starts[1:] + (n,)
            self.layers = nnx.Dict({str(s): _stacked_layers(config, e - s, **kw)
                                    for s, e in zip(self.group_starts, ends)})
        else:
            self.group_starts = None
            self.layers = nnx.List([Aimv2EncoderLayer(config, **kw) for _ in range(n)])
        self.remat = remat
        self.remat_policy = remat_policy

    def __call__(self, x: Array, mask: Optional[Array] = None, causal: bool = False) -> Array:
        if self.group_starts is not None:
            for start in self.group_starts:
                x = _scan_layers(self.layers[str(start)], x, mask, causal, self.remat, self.remat_policy)
            return x
        run = nnx.remat(_run_layer, static_argnums=(3,), policy=self.remat_policy) if self.remat else _run_layer
        for layer in self.layers:
            x = run(layer, x, mask, causal)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------------------


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (a = -0.75 as PyTorch/OpenCV)."""
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of 1-D bicubic resampling, half-pixel centres, edge-clamped taps, no antialiasing.

    Identical to ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`` along one axis.
    """
    w = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = scale * (o + 0.5) - 0.5
        i0 = math.floor(src)
        for k, c in zip(range(i0 - 1, i0 + 3), _cubic_weights(src - i0)):
            w[o, min(max(k, 0), in_size - 1)] += c
    return w


def interpolate_position_embedding(table: Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Array:
    """Resize a learned position-embedding grid ``[gh*gw, D]`` (row-major patches) to ``[nh*nw, D]``.

    Bicubic, ``align_corners=False``, no antialiasing: the same function as
    ``torch.nn.functional.interpolate(grid[None].permute(0, 3, 1, 2), size=new_grid, mode='bicubic',
    align_corners=False)`` (the resize ViT/DINOv2 codebases use for position embeddings), computed separably in float32.
    An unchanged grid returns the table unchanged.
    """
    if tuple(old_grid) == tuple(new_grid):
        return table
    (gh, gw), (nh, nw) = old_grid, new_grid
    wh = jnp.asarray(bicubic_resize_matrix(gh, nh), jnp.float32)
    ww = jnp.asarray(bicubic_resize_matrix(gw, nw), jnp.float32)
    grid = table.astype(jnp.float32).reshape(gh, gw, -1)
    out = jnp.einsum("ph,hwd,qw->pqd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(nh * nw, -1)


class Aimv2VisionEmbeddings(nnx.Module):
    """Patch conv (stride = patch) -> RMSNorm -> + learned position embedding (interpolated for other image sizes)."""

    def __init__(self, config: Aimv2VisionConfig, *, dtype, rngs: nnx.Rngs):
        p, d = config.patch_size, config.hidden_size
        self.grid_size = config.grid_size
        self.patch_size = p
        self.dtype = dtype
        self.patch_embed = nnx.Conv(
            config.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=True, dtype=dtype,
            param_dtype=jnp.float32, rngs=rngs, kernel_init=_init((None, None, None, "embed")),
            bias_init=_init(("embed",), nnx.initializers.zeros_init()))
        self.rms_norm = Aimv2RMSNorm(d, config.rms_norm_eps, dtype=dtype)
        self.position_embedding = nnx.Embed(
            self.grid_size[0] * self.grid_size[1], d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=_init((None, "embed")))

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> Array:
        """Patch tokens of `pixel_values` [B, H, W, C], resized bilinearly to `image_size` first when given."""
        h, w = pixel_values.shape[1:3]
        if image_size is None or (h, w) == (image_size, image_size):
            x = self.patch_embed(pixel_values.astype(self.dtype))
        elif all(resize.folds_into_patches(n, image_size, self.patch_size) for n in (h, w)):
            x = resize.resized_patch_conv(pixel_values, self.patch_embed.kernel[...], self.patch_embed.bias[...],
                                          image_size, self.dtype)
        else:
            x = self.patch_embed(resize.resize(pixel_values, image_size).astype(self.dtype))
        b, gh, gw, d = x.shape
        x = self.rms_norm(x.reshape(b, gh * gw, d)).astype(jnp.float32)
        return x + interpolate_position_embedding(self.position_embedding.embedding[...], self.grid_size, (gh, gw))


class Aimv2AttentionPoolingHead(nnx.Module):
    """One learned query (``cls_token``) attends over the tokens; per-head outputs concatenated -> ``output_proj``."""

    def __init__(self, config: Aimv2VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, b = config.hidden_size, config.qkv_bias
        self.num_heads = config.num_attention_heads
        self.dtype = dtype
        self.k_proj = _linear(d, d, ("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(d, d, ("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(
            _init((None, None, "embed"))(rngs.params(), (1, 1, d), jnp.float32))
        self.output_proj = _linear(d, d, ("heads", "embed"), bias=True, dtype=dtype, rngs=rngs)

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
    ``scan_layers``/``scan_split``: the blocks' layout (see ``Aimv2Encoder``).
    """

    def __init__(self, config: Aimv2VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False, scan_split: int = 0):
        self.config = config
        self.embeddings = Aimv2VisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = Aimv2Encoder(config, dtype=dtype, rngs=rngs, attention_implementation=attention_implementation,
                                    remat=remat, remat_policy=remat_policy, scan_layers=scan_layers,
                                    scan_split=scan_split)
        self.rms_norm = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.head = Aimv2AttentionPoolingHead(config, dtype=dtype, rngs=rngs) if config.use_head else None

    def __call__(self, pixel_values: Array, image_size: Optional[int] = None) -> BaseModelOutputWithPooling:
        x = self.rms_norm(self.encoder(self.embeddings(pixel_values, image_size)))
        pooled = self.head(x) if self.head is not None else jnp.mean(x, axis=1)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------------------------------


class Aimv2TextEmbeddings(nnx.Module):
    """Token embedding (``token_embedding.embedding`` is the [vocab, D] table) + learned absolute positions."""

    def __init__(self, config: Aimv2TextConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.token_embedding = nnx.Embed(config.vocab_size, d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
                                         embedding_init=_init(("vocab", "embed")))
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings, d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=_init((None, "embed")))

    def __call__(self, input_ids: Optional[Array] = None, inputs_embeds: Optional[Array] = None) -> Array:
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        length = inputs_embeds.shape[-2]
        max_len = self.position_embedding.num_embeddings
        if length > max_len:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {max_len}")
        return inputs_embeds.astype(jnp.float32) + self.position_embedding.embedding[:length]


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
        self.embeddings = Aimv2TextEmbeddings(config, rngs=rngs)
        self.encoder = Aimv2Encoder(config, dtype=dtype, rngs=rngs, attention_implementation=attention_implementation,
                                    remat=remat, remat_policy=remat_policy, scan_layers=scan_layers)
        self.rms_norm = Aimv2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 inputs_embeds: Optional[Array] = None) -> BaseModelOutputWithPooling:
        x = self.embeddings(input_ids, inputs_embeds)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = self.rms_norm(self.encoder(x, mask, True))
        eos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------------------------------
# Joint model
# ----------------------------------------------------------------------------------------------------------------------


def _l2_normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class Aimv2Model(nnx.Module):
    """AIMv2-LiT: vision tower + text tower + bias-free projections + clamped logit scale.

    ``logits_per_text = logit_scale_value() * normalize(text_embeds) @ normalize(image_embeds).T`` (float32), with
    ``logit_scale_value() = exp(clip(logit_scale, 0, log(max_logit_scale)))`` as transformers. ``scan_layers``
    applies to both towers, ``scan_split`` to the vision tower only (see ``Aimv2Encoder``).
    """

    def __init__(self, config: Aimv2Config, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False, scan_split: int = 0):
        self.config = config
        kw = dict(dtype=dtype, rngs=rngs, attention_implementation=attention_implementation, remat=remat,
                  remat_policy=remat_policy, scan_layers=scan_layers)
        self.vision_model = Aimv2VisionModel(config.vision_config, scan_split=scan_split, **kw)
        self.text_model = Aimv2TextModel(config.text_config, **kw)
        p = config.projection_dim
        self.visual_projection = _linear(config.vision_config.hidden_size, p, ("embed", None), bias=False, dtype=dtype,
                                         rngs=rngs)
        self.text_projection = _linear(config.text_config.hidden_size, p, ("embed", None), bias=False, dtype=dtype,
                                       rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

    def logit_scale_value(self) -> Array:
        return jnp.exp(jnp.clip(self.logit_scale[...], 0.0, math.log(self.config.max_logit_scale)))

    def get_image_features(self, pixel_values: Array) -> Array:
        """Projected (not normalised) pooled image features [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def get_text_features(self, input_ids: Array, attention_mask: Optional[Array] = None,
                          inputs_embeds: Optional[Array] = None) -> Array:
        """Projected (not normalised) pooled text features [B, projection_dim]."""
        out = self.text_model(input_ids, attention_mask, inputs_embeds=inputs_embeds)
        return self.text_projection(out.pooler_output)

    def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Optional[Array] = None) -> Aimv2Output:
        vision_out = self.vision_model(pixel_values)
        text_out = self.text_model(input_ids, attention_mask)
        image_embeds = _l2_normalize(self.visual_projection(vision_out.pooler_output))
        text_embeds = _l2_normalize(self.text_projection(text_out.pooler_output))
        logits_per_text = self.logit_scale_value() * text_embeds @ image_embeds.T
        return Aimv2Output(
            logits_per_image=logits_per_text.T, logits_per_text=logits_per_text, text_embeds=text_embeds,
            image_embeds=image_embeds, text_model_output=text_out, vision_model_output=vision_out)
