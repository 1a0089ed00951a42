"""AIMv2 weights: transformers ``save_pretrained`` folders <-> ``autorad_jax.models.aimv2`` modules.

One name map (``name_map``) serves both directions: each entry pairs a transformers state-dict key with an NNX
parameter path and a layout transform (``LINEAR``: torch (out, in) <-> flax (in, out); ``CONV``: OIHW <-> HWIO;
``COPY``). Conversion is strict: every source key is used exactly once, every target parameter is written, and every
shape is checked; anything else fails naming the key. Weights are read and written as safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from autorad_jax.models.aimv2 import (
    Aimv2Config,
    Aimv2Model,
    Aimv2TextConfig,
    Aimv2TextModel,
    Aimv2VisionConfig,
    Aimv2VisionModel,
)

AnyModel = Union[Aimv2VisionModel, Aimv2TextModel, Aimv2Model]
Path = tuple[Union[str, int], ...]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_MODELS = {
    Aimv2VisionConfig.model_type: (Aimv2VisionConfig, Aimv2VisionModel),
    Aimv2TextConfig.model_type: (Aimv2TextConfig, Aimv2TextModel),
    Aimv2Config.model_type: (Aimv2Config, Aimv2Model),
}


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change between the transformers tensor and the NNX parameter, in both directions."""

    name: str
    to_nnx: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Transform("copy", lambda w: w, lambda w: w)
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T)
CONV = Transform("conv", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))


# ----------------------------------------------------------------------------------------------------------------------
# The name map
# ----------------------------------------------------------------------------------------------------------------------


def _linear(hf: str, path: Path, bias: bool) -> list[tuple[str, Path, Transform]]:
    entries = [(f"{hf}.weight", path + ("kernel",), LINEAR)]
    if bias:
        entries.append((f"{hf}.bias", path + ("bias",), COPY))
    return entries


def _encoder(config: Union[Aimv2VisionConfig, Aimv2TextConfig]) -> list[tuple[str, Path, Transform]]:
    entries = []
    for i in range(config.num_hidden_layers):
        hf, path = f"encoder.layers.{i}", ("encoder", "layers", i)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            entries += _linear(f"{hf}.attention.{proj}", path + ("attention", proj), config.qkv_bias)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries += _linear(f"{hf}.ffn.{proj}", path + ("ffn", proj), config.mlp_bias)
        for norm in ("rms_norm1", "rms_norm2"):
            entries.append((f"{hf}.{norm}.weight", path + (norm, "weight"), COPY))
    entries.append(("rms_norm.weight", ("rms_norm", "weight"), COPY))
    return entries


def _vision(config: Aimv2VisionConfig) -> list[tuple[str, Path, Transform]]:
    entries = [
        ("embeddings.patch_embed.weight", ("embeddings", "patch_embed", "kernel"), CONV),
        ("embeddings.patch_embed.bias", ("embeddings", "patch_embed", "bias"), COPY),
        ("embeddings.rms_norm.weight", ("embeddings", "rms_norm", "weight"), COPY),
        ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY),
    ] + _encoder(config)
    if config.use_head:
        entries += [("head.cls_token", ("head", "cls_token"), COPY)]
        entries += _linear("head.k_proj", ("head", "k_proj"), config.qkv_bias)
        entries += _linear("head.v_proj", ("head", "v_proj"), config.qkv_bias)
        entries += _linear("head.output_proj", ("head", "output_proj"), True)
    return entries


def _text(config: Aimv2TextConfig) -> list[tuple[str, Path, Transform]]:
    return [
        ("embeddings.token_embedding.weight", ("embeddings", "token_embedding", "embedding"), COPY),
        ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY),
    ] + _encoder(config)


def _prefixed(prefix: str, entries: list[tuple[str, Path, Transform]]) -> list[tuple[str, Path, Transform]]:
    return [(f"{prefix}.{hf}", (prefix,) + path, t) for hf, path, t in entries]


def name_map(config: Union[Aimv2VisionConfig, Aimv2TextConfig, Aimv2Config]) -> dict[str, tuple[Path, Transform]]:
    """transformers key -> (NNX parameter path, transform) for the model that ``config`` describes."""
    if isinstance(config, Aimv2VisionConfig):
        entries = _vision(config)
    elif isinstance(config, Aimv2TextConfig):
        entries = _text(config)
    elif isinstance(config, Aimv2Config):
        entries = (_prefixed("vision_model", _vision(config.vision_config))
                   + _prefixed("text_model", _text(config.text_config))
                   + [("visual_projection.weight", ("visual_projection", "kernel"), LINEAR),
                      ("text_projection.weight", ("text_projection", "kernel"), LINEAR),
                      ("logit_scale", ("logit_scale",), COPY)])
    else:
        raise TypeError(f"not an AIMv2 config: {type(config).__name__}")
    return {hf: (path, t) for hf, path, t in entries}


# ----------------------------------------------------------------------------------------------------------------------
# State conversion
# ----------------------------------------------------------------------------------------------------------------------


def _params(model: AnyModel) -> dict[Path, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _check_covers(mapping: dict[str, tuple[Path, Transform]], params: dict[Path, nnx.Variable]) -> None:
    mapped = {path for path, _ in mapping.values()}
    unmapped = sorted(map(str, set(params) - mapped))
    absent = sorted(map(str, mapped - set(params)))
    if unmapped or absent:
        raise ValueError(f"name map and model disagree: model params not mapped {unmapped}, mapped paths absent {absent}")


def hf_state_to_nnx(model: AnyModel, state_dict: dict[str, np.ndarray]) -> AnyModel:
    """Writes a transformers state dict into ``model`` (in place; abstract models from ``nnx.eval_shape`` too).

    Parameters keep their float32 dtype. Raises ``ValueError`` naming any missing, unexpected or misshapen key.
    """
    mapping = name_map(model.config)
    params = _params(model)
    _check_covers(mapping, params)
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    if missing or unexpected:
        raise ValueError(f"checkpoint keys do not match the model: missing {missing}, unexpected {unexpected}")
    for key, (path, transform) in mapping.items():
        var = params[path]
        value = transform.to_nnx(np.asarray(state_dict[key]))
        if value.shape != tuple(var.shape):
            raise ValueError(
                f"{key}: checkpoint shape {np.shape(state_dict[key])} -> {value.shape} after '{transform.name}', "
                f"model parameter {'/'.join(map(str, path))} expects {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    return model


def nnx_to_hf_state(model: AnyModel) -> dict[str, np.ndarray]:
    """The transformers state dict of ``model`` (contiguous numpy arrays in the parameters' dtype)."""
    mapping = name_map(model.config)
    params = _params(model)
    _check_covers(mapping, params)
    return {key: np.array(transform.to_hf(np.asarray(jax.device_get(params[path][...]))), order="C")
            for key, (path, transform) in mapping.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------------


def read_config(path: str) -> Union[Aimv2VisionConfig, Aimv2TextConfig, Aimv2Config]:
    """The config dataclass for ``path/config.json``, chosen by its ``model_type``."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    with open(file) as f:
        d = json.load(f)
    model_type = d.get("model_type")
    if model_type not in _MODELS:
        raise ValueError(f"{file}: model_type {model_type!r} is not one of {sorted(_MODELS)}")
    return _MODELS[model_type][0].from_hf_dict(d)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of ``path/model.safetensors`` (or of the shards listed in ``model.safetensors.index.json``)."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {path}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f, safe_open(file, framework="flax") as f_jax:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"{file}: key {key} appears in more than one shard")
                # numpy has no bfloat16; the flax backend reads it.
                bf16 = f.get_slice(key).get_dtype() == "BF16"
                tensors[key] = np.asarray(f_jax.get_tensor(key), np.float32) if bf16 else f.get_tensor(key)
    return tensors


def load_pretrained(path: str, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None, **module_kwargs) -> AnyModel:
    """The vision, text or joint model of a transformers AIMv2 folder (``config.json`` + safetensors).

    ``dtype`` is the compute dtype (parameters are float32). ``module_kwargs`` go to the module constructor
    (``attention_implementation``, ``remat``, ``remat_policy``). The model is built abstractly (no random init) unless
    ``rngs`` is given.
    """
    config = read_config(path)
    cls = _MODELS[config.model_type][1]
    state_dict = read_safetensors(path)
    if rngs is None:
        model = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), **module_kwargs))
    else:
        model = cls(config, dtype=dtype, rngs=rngs, **module_kwargs)
    return hf_state_to_nnx(model, state_dict)


def save_pretrained(model: AnyModel, path: str) -> None:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers``' ``from_pretrained`` loads exactly."""
    os.makedirs(path, exist_ok=True)
    state = nnx_to_hf_state(model)
    config = {**model.config.to_hf_dict(), "architectures": [model.config.architecture], "dtype": "float32"}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
