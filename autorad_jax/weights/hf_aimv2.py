"""AIMv2 weights: transformers ``save_pretrained`` folders <-> ``autorad_jax.models.aimv2`` modules.

One name map (``name_map``) serves both directions: each entry pairs a transformers state-dict key with an NNX
parameter path (and, for scanned layers, a row of the stacked parameter) and a layout transform, on the strict engine of ``autorad_jax.weights.name_map`` (every source key used
exactly once, every parameter written, every shape checked; ``WeightsMismatchError`` otherwise). Weights are read and
written as safetensors only.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from autorad_jax.models.aimv2 import (
    Aimv2Config,
    Aimv2Model,
    Aimv2TextConfig,
    Aimv2TextModel,
    Aimv2VisionConfig,
    Aimv2VisionModel,
)
from autorad_jax.errors import AutoradError
from autorad_jax.weights.name_map import CONV, COPY, LINEAR, NameMap, Path, Target, Transform, dump, load, variables

AnyModel = Union[Aimv2VisionModel, Aimv2TextModel, Aimv2Model]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_MODELS = {
    Aimv2VisionConfig.model_type: (Aimv2VisionConfig, Aimv2VisionModel),
    Aimv2TextConfig.model_type: (Aimv2TextConfig, Aimv2TextModel),
    Aimv2Config.model_type: (Aimv2Config, Aimv2Model),
}


class PretrainedFolderError(AutoradError, ValueError):
    """A pretrained AIMv2 folder is missing, incomplete, corrupt or of another architecture."""


# ----------------------------------------------------------------------------------------------------------------------
# The name map
# ----------------------------------------------------------------------------------------------------------------------


GroupStarts = Optional[tuple[int, ...]]  # an encoder's layout: None unrolled, else its scanned groups' first blocks
Entry = tuple[str, Path, Transform, Optional[int]]  # (transformers key, NNX path, transform, row of a stacked param)


def _linear(hf: str, path: Path, bias: bool, row: Optional[int] = None) -> list[Entry]:
    entries = [(f"{hf}.weight", path + ("kernel",), LINEAR, row)]
    if bias:
        entries.append((f"{hf}.bias", path + ("bias",), COPY, row))
    return entries


def _block(starts: GroupStarts, i: int) -> tuple[Path, Optional[int]]:
    """NNX path and row of transformers' block i: ``layers/i`` unrolled, ``layers/<group start>`` row i - start scanned."""
    if starts is None:
        return ("encoder", "layers", i), None
    start = max(s for s in starts if s <= i)
    return ("encoder", "layers", str(start)), i - start


def _encoder(config: Union[Aimv2VisionConfig, Aimv2TextConfig], starts: GroupStarts) -> list[Entry]:
    entries = []
    for i in range(config.num_hidden_layers):
        hf, (path, row) = f"encoder.layers.{i}", _block(starts, i)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            entries += _linear(f"{hf}.attention.{proj}", path + ("attention", proj), config.qkv_bias, row)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries += _linear(f"{hf}.ffn.{proj}", path + ("ffn", proj), config.mlp_bias, row)
        for norm in ("rms_norm1", "rms_norm2"):
            entries.append((f"{hf}.{norm}.weight", path + (norm, "weight"), COPY, row))
    entries.append(("rms_norm.weight", ("rms_norm", "weight"), COPY, None))
    return entries


def _vision(config: Aimv2VisionConfig, starts: GroupStarts) -> list[Entry]:
    entries = [
        ("embeddings.patch_embed.weight", ("embeddings", "patch_embed", "kernel"), CONV, None),
        ("embeddings.patch_embed.bias", ("embeddings", "patch_embed", "bias"), COPY, None),
        ("embeddings.rms_norm.weight", ("embeddings", "rms_norm", "weight"), COPY, None),
        ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY, None),
    ] + _encoder(config, starts)
    if config.use_head:
        entries += [("head.cls_token", ("head", "cls_token"), COPY, None)]
        entries += _linear("head.k_proj", ("head", "k_proj"), config.qkv_bias)
        entries += _linear("head.v_proj", ("head", "v_proj"), config.qkv_bias)
        entries += _linear("head.output_proj", ("head", "output_proj"), True)
    return entries


def _text(config: Aimv2TextConfig, starts: GroupStarts) -> list[Entry]:
    return [
        ("embeddings.token_embedding.weight", ("embeddings", "token_embedding", "embedding"), COPY, None),
        ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY, None),
    ] + _encoder(config, starts)


def _prefixed(prefix: str, entries: list[Entry]) -> list[Entry]:
    return [(f"{prefix}.{hf}", (prefix,) + path, t, row) for hf, path, t, row in entries]


def _target(path: Path, transform: Transform, row: Optional[int]) -> Target:
    return (path, transform) if row is None else (path, transform, row)


def name_map(config: Union[Aimv2VisionConfig, Aimv2TextConfig, Aimv2Config], vision_starts: GroupStarts = None,
             text_starts: GroupStarts = None) -> NameMap:
    """transformers key -> (NNX parameter path, transform[, row]) for the model that ``config`` describes, with its
    encoders unrolled (``None``) or scanned in groups starting at ``vision_starts``/``text_starts`` (see
    ``Aimv2Encoder.group_starts``; a lone tower's layout is ``vision_starts`` for vision, ``text_starts`` for text)."""
    if isinstance(config, Aimv2VisionConfig):
        entries = _vision(config, vision_starts)
    elif isinstance(config, Aimv2TextConfig):
        entries = _text(config, text_starts)
    elif isinstance(config, Aimv2Config):
        entries = (_prefixed("vision_model", _vision(config.vision_config, vision_starts))
                   + _prefixed("text_model", _text(config.text_config, text_starts))
                   + [("visual_projection.weight", ("visual_projection", "kernel"), LINEAR, None),
                      ("text_projection.weight", ("text_projection", "kernel"), LINEAR, None),
                      ("logit_scale", ("logit_scale",), COPY, None)])
    else:
        raise TypeError(f"not an AIMv2 config: {type(config).__name__}")
    return {hf: _target(path, t, row) for hf, path, t, row in entries}


def model_name_map(model: AnyModel) -> NameMap:
    """``name_map`` for ``model``'s config and its encoders' layout (unrolled or scanned)."""
    if isinstance(model, Aimv2Model):
        return name_map(model.config, model.vision_model.encoder.group_starts, model.text_model.encoder.group_starts)
    starts = model.encoder.group_starts
    return name_map(model.config, vision_starts=starts, text_starts=starts)


# ----------------------------------------------------------------------------------------------------------------------
# State conversion
# ----------------------------------------------------------------------------------------------------------------------


def hf_state_to_nnx(model: AnyModel, state_dict: dict[str, np.ndarray], source: str = "state dict") -> AnyModel:
    """Writes a transformers state dict into ``model`` (in place; abstract models from ``nnx.eval_shape`` too).

    Parameters keep their float32 dtype. Raises ``WeightsMismatchError`` naming any missing, unexpected or misshapen
    key.
    """
    load(variables(model), model_name_map(model), state_dict, source)
    return model


def nnx_to_hf_state(model: AnyModel) -> dict[str, np.ndarray]:
    """The transformers state dict of ``model`` (contiguous numpy arrays in the parameters' dtype)."""
    return dump(variables(model), model_name_map(model), type(model).__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------------


def read_json(file: str) -> dict:
    """A JSON object from `file`; PretrainedFolderError naming the file when it is missing, truncated or not JSON."""
    if not os.path.isfile(file):
        raise PretrainedFolderError(f"{file} does not exist.")
    try:
        with open(file) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedFolderError(f"{file} is not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(d, dict):
        raise PretrainedFolderError(f"{file} holds a JSON {type(d).__name__}, not an object.")
    return d


def read_config(path: str) -> Union[Aimv2VisionConfig, Aimv2TextConfig, Aimv2Config]:
    """The config dataclass for ``path/config.json``, chosen by its ``model_type``."""
    file = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(path):
        raise PretrainedFolderError(f"AIMv2 folder {path} is a file: give the folder that holds it, {CONFIG_NAME} "
                                    f"and the weights ({os.path.dirname(os.path.abspath(path))}?).")
    if not os.path.isdir(path):
        raise PretrainedFolderError(f"AIMv2 folder {path} does not exist.")
    snapshots = os.path.join(path, "snapshots")
    if not os.path.isfile(file) and os.path.isdir(snapshots):  # huggingface_hub's cache: blobs/, refs/, snapshots/
        found = ", ".join(os.path.join(snapshots, name) for name in sorted(os.listdir(snapshots))) or "none yet"
        raise PretrainedFolderError(f"{path} is a Hugging Face cache folder, not a model folder: give one of its "
                                    f"snapshots ({found}).")
    d = read_json(file)
    model_type = d.get("model_type")
    if model_type not in _MODELS:
        raise PretrainedFolderError(f"{file}: model_type {model_type!r} is not one of {sorted(_MODELS)}")
    try:
        return _MODELS[model_type][0].from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise PretrainedFolderError(f"{file}: {e}") from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of ``path/model.safetensors`` (or of the shards listed in ``model.safetensors.index.json``);
    PretrainedFolderError naming a missing, truncated or corrupt file."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise PretrainedFolderError(f"{index} has no weight_map.")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    else:
        raise PretrainedFolderError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {path}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors_file(file, frozenset(tensors)))
    return tensors


def read_safetensors_file(file: str, seen: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file (bfloat16 as float32); PretrainedFolderError naming a missing, truncated or
    corrupt file, or a key already in `seen` (another shard)."""
    if not os.path.isfile(file):
        raise PretrainedFolderError(f"{file} does not exist.")
    tensors = {}
    try:
        with safe_open(file, framework="numpy") as f, safe_open(file, framework="flax") as f_jax:
            for key in f.keys():
                if key in seen:
                    raise PretrainedFolderError(f"{file}: key {key} appears in more than one shard")
                # numpy has no bfloat16; the flax backend reads it.
                bf16 = f.get_slice(key).get_dtype() == "BF16"
                tensors[key] = np.asarray(f_jax.get_tensor(key), np.float32) if bf16 else f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise PretrainedFolderError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return tensors


def load_pretrained(path: str, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None, **module_kwargs) -> AnyModel:
    """The vision, text or joint model of a transformers AIMv2 folder (``config.json`` + safetensors).

    ``dtype`` is the compute dtype (parameters are float32). ``module_kwargs`` go to the module constructor
    (``attention_implementation``, ``remat``, ``remat_policy``, ``scan_layers``; the folder's per-layer weights are
    stacked for scanned layers). The model is built abstractly (no random init) unless
    ``rngs`` is given.
    """
    config = read_config(path)
    cls = _MODELS[config.model_type][1]
    state_dict = read_safetensors(path)
    if rngs is None:
        model = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), **module_kwargs))
    else:
        model = cls(config, dtype=dtype, rngs=rngs, **module_kwargs)
    return hf_state_to_nnx(model, state_dict, path)


def save_pretrained(model: AnyModel, path: str) -> None:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers``' ``from_pretrained`` loads exactly."""
    os.makedirs(path, exist_ok=True)
    state = nnx_to_hf_state(model)
    config = {**model.config.to_hf_dict(), "architectures": [model.config.architecture], "dtype": "float32"}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
