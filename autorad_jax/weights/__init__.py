"""Weights in and out: transformers folders of every tower family (``load_pretrained``, ``save_pretrained``), the name
maps behind them, and the PyTorch modules of the full model (``torch_model``, imported on its own: it needs torch)."""

from autorad_jax.weights.pretrained import (
    FAMILIES,
    PretrainedFolderError,
    build_model,
    family_of,
    hf_state_to_nnx,
    load_pretrained,
    nnx_to_hf_state,
    read_config,
    read_safetensors,
    read_safetensors_file,
    save_pretrained,
)

__all__ = ["FAMILIES", "PretrainedFolderError", "build_model", "family_of", "hf_state_to_nnx", "load_pretrained",
           "nnx_to_hf_state", "read_config", "read_safetensors", "read_safetensors_file", "save_pretrained"]
