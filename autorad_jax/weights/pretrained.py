"""transformers ``save_pretrained`` folders (``config.json`` + safetensors) <-> the tower families' NNX modules.

``load_pretrained`` reads ``config.json``'s ``model_type`` and builds the matching joint, vision or text model of its
family (the ``FAMILIES`` registry: one place, one entry per family), then writes the weights through the family's
name map on the strict engine of ``autorad_jax.weights.name_map`` (every source key used exactly once, every
parameter written, every shape checked; ``WeightsMismatchError`` otherwise). ``save_pretrained`` writes the inverse.
Weights are read and written as safetensors only; a missing, truncated or foreign file is a ``PretrainedFolderError``
naming it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from autorad_jax.errors import AutoradError
from autorad_jax.models.towers import JointConfig
from autorad_jax.weights import hf_aimv2, hf_clip, hf_siglip
from autorad_jax.weights.hf_towers import Family
from autorad_jax.weights.name_map import NameMap, dump, load, variables

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

FAMILIES: tuple[Family, ...] = (hf_aimv2.FAMILY, hf_clip.FAMILY, hf_siglip.FAMILY)
_BY_MODEL_TYPE = {config_class.model_type: (family, config_class, model_class)
                  for family in FAMILIES for config_class, model_class in family.models}
_BY_CONFIG_CLASS = {config_class: family for family in FAMILIES for config_class, _ in family.models}


class PretrainedFolderError(AutoradError, ValueError):
    """A pretrained folder is missing, incomplete, corrupt or of an architecture no tower family reads."""


# ----------------------------------------------------------------------------------------------------------------------
# State conversion
# ----------------------------------------------------------------------------------------------------------------------


def family_of(config) -> Family:
    """The tower family of a (joint, vision or text) config dataclass."""
    try:
        return _BY_CONFIG_CLASS[type(config)]
    except KeyError:
        raise TypeError(f"no tower family has the config class {type(config).__name__}") from None


def model_name_map(model: nnx.Module) -> NameMap:
    """The family's name map for ``model``'s config and its encoders' layout (unrolled or scanned)."""
    if isinstance(model.config, JointConfig):
        starts = (model.vision_model.encoder.group_starts, model.text_model.encoder.group_starts)
    else:
        starts = (model.encoder.group_starts,) * 2
    return family_of(model.config).name_map(model.config, *starts)


def hf_state_to_nnx(model: nnx.Module, state_dict: dict[str, np.ndarray], source: str = "state dict") -> nnx.Module:
    """Writes a transformers state dict into ``model`` (in place; abstract models from ``nnx.eval_shape`` too).

    Parameters keep their float32 dtype. Raises ``WeightsMismatchError`` naming any missing, unexpected or misshapen
    key.
    """
    load(variables(model), model_name_map(model), state_dict, source)
    return model


def nnx_to_hf_state(model: nnx.Module) -> dict[str, np.ndarray]:
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


def read_config(path: str) -> Any:
    """The config dataclass for ``path/config.json``, chosen by its ``model_type`` among the families' models."""
    file = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(path):
        raise PretrainedFolderError(f"Pretrained folder {path} is a file: give the folder that holds it, {CONFIG_NAME} "
                                    f"and the weights ({os.path.dirname(os.path.abspath(path))}?).")
    if not os.path.isdir(path):
        raise PretrainedFolderError(f"Pretrained folder {path} does not exist.")
    snapshots = os.path.join(path, "snapshots")
    if not os.path.isfile(file) and os.path.isdir(snapshots):  # huggingface_hub's cache: blobs/, refs/, snapshots/
        found = ", ".join(os.path.join(snapshots, name) for name in sorted(os.listdir(snapshots))) or "none yet"
        raise PretrainedFolderError(f"{path} is a Hugging Face cache folder, not a model folder: give one of its "
                                    f"snapshots ({found}).")
    d = read_json(file)
    model_type = d.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise PretrainedFolderError(f"{file}: model_type {model_type!r} is not one of {sorted(_BY_MODEL_TYPE)}")
    try:
        return _BY_MODEL_TYPE[model_type][1].from_hf_dict(d)
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


def build_model(config, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None, **module_kwargs) -> nnx.Module:
    """The module of ``config``'s family and kind (joint, vision or text), random with ``rngs``, else abstract
    (``nnx.eval_shape``: no random init). ``module_kwargs``: see ``load_pretrained``."""
    model_class = _BY_MODEL_TYPE[config.model_type][2]
    if rngs is None:
        return nnx.eval_shape(lambda: model_class(config, dtype=dtype, rngs=nnx.Rngs(0), **module_kwargs))
    return model_class(config, dtype=dtype, rngs=rngs, **module_kwargs)


def _without_legacy_prefix(config, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A lone tower's state dict without the ``vision_model.``/``text_model.`` prefix that transformers 4 wrote for
    ``CLIPVisionModel``, ``SiglipTextModel`` and the like (transformers 5, and ``save_pretrained`` here, write none)."""
    if isinstance(config, JointConfig):
        return state
    prefix = "vision_model." if isinstance(config, family_of(config).vision[0]) else "text_model."
    if state and all(key.startswith(prefix) for key in state):
        return {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def load_pretrained(path: str, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None, **module_kwargs) -> nnx.Module:
    """The joint, vision or text model of a transformers folder (``config.json`` + safetensors) of any tower family.

    ``dtype`` is the compute dtype (parameters are float32). ``module_kwargs`` go to the module constructor
    (``attention_implementation``, ``remat``, ``remat_policy``, ``scan_layers``, and ``scan_split`` for joint and vision
    models; the folder's per-layer weights are stacked for scanned layers). The model is built abstractly (no random
    init) unless ``rngs`` is given.
    """
    config = read_config(path)
    state_dict = _without_legacy_prefix(config, read_safetensors(path))
    return hf_state_to_nnx(build_model(config, dtype=dtype, rngs=rngs, **module_kwargs), state_dict, path)


def save_pretrained(model: nnx.Module, path: str) -> None:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers``' ``from_pretrained`` loads exactly."""
    os.makedirs(path, exist_ok=True)
    state = nnx_to_hf_state(model)
    config = {**model.config.to_hf_dict(), "architectures": [model.config.architecture], "dtype": "float32"}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
