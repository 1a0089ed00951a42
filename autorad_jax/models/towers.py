"""What the tower families (``aimv2``, ``clip``, ``siglip``) share, in Flax NNX.

config.json <-> config dataclasses, the outputs, initialisers carrying logical axis names, multi-head attention, the
unrolled or scanned stack of blocks, learned text embeddings, the patch embedding (with the optional resize folded in)
and the interpolation of learned position embeddings. Each family module builds its towers from these pieces; the
names of the attributes are the PyTorch ones, so that the family's name map reads one to one.

Conventions (all families): images are NHWC; parameters are float32; ``dtype`` is the compute dtype of matmuls,
convolutions and attention; norms, the residual stream and the final logits are float32; tower outputs are in
``dtype``. Logical axis names: ``embed`` (model width), ``mlp`` (feed-forward hidden), ``heads`` (attention heads x head
dim, flattened), ``vocab`` (token table rows), ``norm`` (norm scales and shifts), ``layers`` (stacked blocks);
``None`` for axes that are never sharded.
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


class TowerConfig:
    """config.json <-> dataclass for a tower config (keys the dataclass does not know are ignored)."""

    model_type: str

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]):
        return _from_dict(cls, d)

    def to_hf_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": self.model_type}


class JointConfig:
    """config.json <-> dataclass for an image-text config with ``vision_config`` and ``text_config`` fields, of the
    classes ``vision_config_class`` and ``text_config_class``."""

    model_type: str
    vision_config_class: type
    text_config_class: type

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]):
        d = dict(d)
        d["vision_config"] = cls.vision_config_class.from_hf_dict(d.get("vision_config") or {})
        d["text_config"] = cls.text_config_class.from_hf_dict(d.get("text_config") or {})
        return _from_dict(cls, d)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision_config"] = self.vision_config.to_hf_dict()
        d["text_config"] = self.text_config.to_hf_dict()
        return {**d, "model_type": self.model_type}


def check_heads(config) -> None:
    """ValueError unless the width splits into the heads."""
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} not divisible by heads {config.num_attention_heads}")


def check_square(config) -> None:
    """ValueError unless ``image_size`` and ``patch_size`` are single ints (square images and patches)."""
    if not isinstance(config.image_size, int) or not isinstance(config.patch_size, int):
        raise ValueError(f"image_size/patch_size must be ints, got {config.image_size!r}/{config.patch_size!r}")


class SquarePatches:
    """The patch grid of a vision config of square images and patches (see `check_square`)."""

    @property
    def grid_size(self) -> tuple[int, int]:
        n = self.image_size // self.patch_size
        return (n, n)


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
class ImageTextOutput(_Mapping):
    """A joint model's output (transformers' ``Aimv2Output``, ``CLIPOutput``, ``SiglipOutput``, without the loss)."""

    logits_per_image: Array
    logits_per_text: Array
    text_embeds: Array
    image_embeds: Array
    text_model_output: BaseModelOutputWithPooling
    vision_model_output: BaseModelOutputWithPooling


def l2_normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def param_init(names: tuple, init: Callable = nnx.initializers.normal(_INIT_STD)) -> Callable:
    """Initializer carrying logical axis names; sharding is applied explicitly (see train/sharding.py)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def linear(din: int, dout: int, names: tuple, *, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        kernel_init=param_init(names), bias_init=param_init(names[-1:], nnx.initializers.zeros_init()))


def layer_norm(dim: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm as torch's (statistics in float32, biased variance), output in ``dtype``."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs,
                         scale_init=param_init(("norm",), nnx.initializers.ones_init()),
                         bias_init=param_init(("norm",), nnx.initializers.zeros_init()))


class Attention(nnx.Module):
    """Multi-head self-attention via ``jax.nn.dot_product_attention`` (``implementation``: None = XLA, or 'cudnn')."""

    def __init__(self, hidden_size: int, num_heads: int, *, bias: bool, dtype, rngs: nnx.Rngs,
                 implementation: Optional[str] = None):
        d = hidden_size
        self.num_heads = num_heads
        self.implementation = implementation
        self.q_proj = linear(d, d, ("embed", "heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, d, ("embed", "heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, d, ("embed", "heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.out_proj = linear(d, d, ("heads", "embed"), bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, *, mask: Optional[Array] = None, causal: bool = False) -> Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        out = jax.nn.dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
            mask=mask, is_causal=causal, implementation=self.implementation)
        return self.out_proj(out.reshape(b, t, d))


def padding_mask(attention_mask: Optional[Array]) -> Optional[Array]:
    """[B, 1, 1, L] boolean key mask of an ``attention_mask`` [B, L] (1 = token, 0 = padding)."""
    return None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------------------
# The stack of blocks, unrolled or scanned
# ----------------------------------------------------------------------------------------------------------------------


def _run_layer(layer: nnx.Module, x: Array, mask: Optional[Array], causal: bool) -> Array:
    return layer(x, mask, causal)


def _stacked_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` blocks as one block whose parameters have a leading ``layers`` axis (``nnx.vmap``)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(rngs)

    return make(rngs)


def _scan_layers(stack: nnx.Module, x: Array, mask: Optional[Array], causal: bool, remat: bool,
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


class Encoder(nnx.Module):
    """``config.num_hidden_layers`` blocks of ``layer_class``, unrolled or scanned; ``remat=True`` wraps each block in
    ``jax.checkpoint`` (``remat_policy``). A block is built as ``layer_class(config, dtype=, rngs=,
    attention_implementation=)`` and called as ``block(x, mask, causal)``.

    Unrolled (``scan_layers=False``): ``layers`` is an ``nnx.List`` of the blocks, as transformers.
    Scanned: ``layers`` is an ``nnx.Dict`` of stacked groups keyed by their first block (``"0"``, and
    ``str(scan_split)`` when ``0 < scan_split < num_hidden_layers``), whose parameters have a leading ``layers`` axis;
    the groups run one after the other, each as one ``jax.lax.scan``, so trace and compile time do not grow with depth.
    Splitting the stack lets a parameter filter freeze the first blocks and train the last ones
    (``trainable='last_k'``). ``group_starts`` is None when unrolled.
    """

    def __init__(self, layer_class: type, config, *, dtype, rngs: nnx.Rngs,
                 attention_implementation: Optional[str] = None, remat: bool = False,
                 remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False, scan_split: int = 0):
        num_layers = config.num_hidden_layers
        make_layer = lambda rngs: layer_class(config, dtype=dtype, rngs=rngs,
                                              attention_implementation=attention_implementation)
        if scan_layers:
            self.group_starts = scan_group_starts(num_layers, scan_split)
            ends = self.group_starts[1:] + (num_layers,)
            self.layers = nnx.Dict({str(s): _stacked_layers(make_layer, e - s, rngs)
                                    for s, e in zip(self.group_starts, ends)})
        else:
            self.group_starts = None
            self.layers = nnx.List([make_layer(rngs) for _ in range(num_layers)])
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
# Embeddings
# ----------------------------------------------------------------------------------------------------------------------


class TextEmbeddings(nnx.Module):
    """Token embedding (``token_embedding.embedding`` is the [vocab, D] table) + learned absolute positions."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.token_embedding = nnx.Embed(config.vocab_size, d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
                                         embedding_init=param_init(("vocab", "embed")))
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings, d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=param_init((None, "embed")))

    def __call__(self, input_ids: Optional[Array] = None, inputs_embeds: Optional[Array] = None) -> Array:
        """float32 [B, L, D]; ``inputs_embeds`` [B, L, D], when given, replaces the token lookup."""
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        length = inputs_embeds.shape[-2]
        max_len = self.position_embedding.num_embeddings
        if length > max_len:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {max_len}")
        return inputs_embeds.astype(jnp.float32) + self.position_embedding.embedding[:length]


def patch_conv(config, *, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """The stride-``patch_size`` convolution cutting images into ``hidden_size``-wide patch tokens."""
    p, d = config.patch_size, config.hidden_size
    return nnx.Conv(config.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=bias,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                    kernel_init=param_init((None, None, None, "embed")),
                    bias_init=param_init(("embed",), nnx.initializers.zeros_init()))


def embed_patches(conv: nnx.Conv, pixel_values: Array, image_size: Optional[int], dtype) -> Array:
    """Patch tokens [B, gh, gw, D] of ``pixel_values`` [B, H, W, C], resized bilinearly to ``image_size`` first when
    given (folded into the patch convolution where the sizes allow, see ``autorad_jax.models.resize``)."""
    h, w = pixel_values.shape[1:3]
    patch = conv.kernel_size[0]
    if image_size is None or (h, w) == (image_size, image_size):
        return conv(pixel_values.astype(dtype))
    if all(resize.folds_into_patches(n, image_size, patch) for n in (h, w)):
        bias = None if conv.bias is None else conv.bias[...]
        return resize.resized_patch_conv(pixel_values, conv.kernel[...], bias, image_size, dtype)
    return conv(resize.resize(pixel_values, image_size).astype(dtype))


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
    align_corners=False)`` (transformers' ``interpolate_pos_encoding`` of CLIP and SigLIP, and the ViT/DINOv2
    codebases), computed separably in float32. An unchanged grid returns the table unchanged.
    """
    if tuple(old_grid) == tuple(new_grid):
        return table
    (gh, gw), (nh, nw) = old_grid, new_grid
    wh = jnp.asarray(bicubic_resize_matrix(gh, nh), jnp.float32)
    ww = jnp.asarray(bicubic_resize_matrix(gw, nw), jnp.float32)
    grid = table.astype(jnp.float32).reshape(gh, gw, -1)
    out = jnp.einsum("ph,hwd,qw->pqd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(nh * nw, -1)


# ----------------------------------------------------------------------------------------------------------------------
# Joint models
# ----------------------------------------------------------------------------------------------------------------------


class ImageTextModel(nnx.Module):
    """The calls of every joint model. A family's model holds ``config``, ``vision_model`` and ``text_model`` (of the
    classes ``vision_class`` and ``text_class``, see ``_init_towers``) and ``logit_scale``, and says how pooled tower
    outputs become embeddings (``project_image``, ``project_text``) and what the logit scale and bias are
    (``logit_scale_value``, ``logit_bias_value``).

    ``logits_per_text = logit_scale_value() * normalize(text_embeds) @ normalize(image_embeds).T + logit_bias_value()``
    (float32), as transformers.
    """

    vision_class: type
    text_class: type

    def _init_towers(self, config, *, scan_split: int, **tower_kwargs) -> None:
        """Sets ``config`` and the towers: ``scan_split`` goes to the vision tower, ``tower_kwargs`` (``dtype``,
        ``rngs``, ``attention_implementation``, ``remat``, ``remat_policy``, ``scan_layers``) to both."""
        self.config = config
        self.vision_model = self.vision_class(config.vision_config, scan_split=scan_split, **tower_kwargs)
        self.text_model = self.text_class(config.text_config, **tower_kwargs)

    def project_image(self, pooled: Array) -> Array:
        raise NotImplementedError

    def project_text(self, pooled: Array) -> Array:
        raise NotImplementedError

    def logit_scale_value(self) -> Array:
        """The scale of the cosine similarities: ``exp(logit_scale)`` (scalar, float32)."""
        return jnp.exp(jnp.reshape(self.logit_scale[...], ()))

    def logit_bias_value(self) -> Array:
        """What is added to the scaled cosine similarities (scalar, float32): 0 unless the family learns a bias."""
        return jnp.zeros((), jnp.float32)

    def get_image_features(self, pixel_values: Array, image_size: Optional[int] = None) -> Array:
        """Image embeddings [B, P], not normalised, of ``pixel_values`` [B, H, W, C] (resized to ``image_size`` first
        when given)."""
        return self.project_image(self.vision_model(pixel_values, image_size).pooler_output)

    def get_text_features(self, input_ids: Array, attention_mask: Optional[Array] = None,
                          inputs_embeds: Optional[Array] = None) -> Array:
        """Text embeddings [B, P], not normalised; ``inputs_embeds`` replaces the token lookup (see the text tower)."""
        return self.project_text(self.text_model(input_ids, attention_mask, inputs_embeds=inputs_embeds).pooler_output)

    def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Optional[Array] = None
                 ) -> ImageTextOutput:
        vision_out = self.vision_model(pixel_values)
        text_out = self.text_model(input_ids, attention_mask)
        image_embeds, text_embeds = (l2_normalize(self.project_image(vision_out.pooler_output)),
                                     l2_normalize(self.project_text(text_out.pooler_output)))
        logits_per_text = self.logit_scale_value() * text_embeds @ image_embeds.T + self.logit_bias_value()
        return ImageTextOutput(
            logits_per_image=logits_per_text.T, logits_per_text=logits_per_text, text_embeds=text_embeds,
            image_embeds=image_embeds, text_model_output=text_out, vision_model_output=vision_out)


class ProjectedImageTextModel(ImageTextModel):
    """Towers of the classes ``vision_class`` and ``text_class`` + bias-free linear projections (``visual_projection``,
    ``text_projection``) + a learned scalar ``logit_scale`` (AIMv2-LiT, CLIP). ``scan_layers`` applies to both towers,
    ``scan_split`` to the vision tower only (see ``Encoder``)."""

    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs, attention_implementation: Optional[str] = None,
                 remat: bool = False, remat_policy: Optional[Callable[..., bool]] = None, scan_layers: bool = False,
                 scan_split: int = 0):
        self._init_towers(config, scan_split=scan_split, dtype=dtype, rngs=rngs,
                          attention_implementation=attention_implementation, remat=remat, remat_policy=remat_policy,
                          scan_layers=scan_layers)
        p = config.projection_dim
        self.visual_projection = linear(config.vision_config.hidden_size, p, ("embed", None), bias=False, dtype=dtype,
                                        rngs=rngs)
        self.text_projection = linear(config.text_config.hidden_size, p, ("embed", None), bias=False, dtype=dtype,
                                      rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

    def project_image(self, pooled: Array) -> Array:
        return self.visual_projection(pooled)

    def project_text(self, pooled: Array) -> Array:
        return self.text_projection(pooled)
