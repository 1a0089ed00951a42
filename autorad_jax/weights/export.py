"""Export of a trained AutoRad-Lung (or CoOp) model: JAX checkpoint -> `transformers` AIMv2 folder + PyTorch model.

`export(workdir, out_dir, step=None)` restores the best (or the named) checkpoint of a workdir and writes the export
folder that `autorad_jax.weights.torch_model.AutoRadLungTorch.from_export` loads (layout in that module):
the AIMv2 towers through the AIMv2 port's own name map (`hf_aimv2.save_pretrained`), the prompt learner through
`prompt_learner_map` below (used in both directions: `load_export` reads an export folder back into the JAX model),
and a JSON config with class names, tokenised prompts, radiomics names and statistics, preprocessing and the
training config. Weights are safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from autorad_jax import models
from autorad_jax.data import pipeline
from autorad_jax.data.tokenizer import load_tokenizer
from autorad_jax.models.aimv2 import interpolate_position_embedding
from autorad_jax.models.autorad_lung import AutoRadLung
from autorad_jax.models.prompt_learner import PromptLearner
from autorad_jax.train import checkpointing, trainer
from autorad_jax.weights import hf_aimv2
from autorad_jax.weights.hf_aimv2 import COPY, LINEAR, Transform
from autorad_jax.weights.torch_model import (EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, EXPORT_TOWERS,
                                             EXPORT_VISION, EXPORT_WEIGHTS, ExportFolderError, read_export_config)

EXPORTABLE = ("autorad_lung", "coop")
_POSITION_KEY = "vision_model.embeddings.position_embedding.weight"


# ------------------------------------------------------------------------------------------------------------------
# The prompt learner's name map (PyTorch `PromptLearner` key -> JAX path and layout), used in both directions.
# ------------------------------------------------------------------------------------------------------------------

def prompt_learner_map(prompt_learner: PromptLearner) -> dict[str, tuple[tuple, Transform]]:
    """torch key -> (nnx path inside the prompt learner, transform); strict: covers every variable of the module."""
    entries = {"ctx": (("ctx",), COPY), "tokenized_prompts": (("tokenized_prompts",), COPY),
               "token_prefix": (("token_prefix",), COPY), "token_suffix": (("token_suffix",), COPY)}
    if prompt_learner.meta_net is not None:
        for layer in ("linear1", "linear2"):
            entries[f"meta_net.{layer}.weight"] = (("meta_net", layer, "kernel"), LINEAR)
            entries[f"meta_net.{layer}.bias"] = (("meta_net", layer, "bias"), COPY)
    variables = dict(nnx.to_flat_state(nnx.state(prompt_learner, nnx.Variable)))
    mapped = {path for path, _ in entries.values()}
    if mapped != set(variables):
        raise ValueError(f"prompt learner map and module disagree: unmapped {sorted(map(str, set(variables) - mapped))}"
                         f", absent {sorted(map(str, mapped - set(variables)))}")
    return entries


def prompt_learner_state(prompt_learner: PromptLearner) -> dict[str, np.ndarray]:
    """The PyTorch state dict of the prompt learner (float32 parameters, int32 token ids)."""
    variables = dict(nnx.to_flat_state(nnx.state(prompt_learner, nnx.Variable)))
    return {key: np.array(t.to_hf(np.asarray(jax.device_get(variables[path][...]))), order="C")
            for key, (path, t) in prompt_learner_map(prompt_learner).items()}


def load_prompt_learner_state(prompt_learner: PromptLearner, state: dict[str, np.ndarray]) -> None:
    """Writes a PyTorch prompt-learner state dict into the JAX module; fails naming any key or shape that differs."""
    mapping = prompt_learner_map(prompt_learner)
    if set(state) != set(mapping):
        raise ExportFolderError(f"prompt learner weights do not match the model: missing "
                                f"{sorted(set(mapping) - set(state))}, unexpected {sorted(set(state) - set(mapping))}")
    variables = dict(nnx.to_flat_state(nnx.state(prompt_learner, nnx.Variable)))
    for key, (path, t) in mapping.items():
        var, value = variables[path], t.to_nnx(np.asarray(state[key]))
        if value.shape != tuple(var.shape):
            raise ExportFolderError(f"prompt learner {key}: shape {value.shape}, the model expects {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, dtype=var[...].dtype))


# ------------------------------------------------------------------------------------------------------------------
# Writing and reading export folders.
# ------------------------------------------------------------------------------------------------------------------

def builder_config(name: str):
    """The lidc_idri builder config called `name` (crop size, spacing, consensus level, radiomics parameters)."""
    import tfds_lidc
    configs = {c.name: c for c in tfds_lidc.Builder.BUILDER_CONFIGS}
    if name not in configs:
        raise ValueError(f"config.data.builder_config={name!r} is not one of {sorted(configs)}")
    return configs[name]


def radiomics_feature_names(config: ml_collections.ConfigDict) -> list[str]:
    """Ordered radiomics names of the config's dataset (its metadata when built, else its builder config's params)."""
    import tensorflow_datasets as tfds
    from tfds_lidc import radiomics_features
    try:
        info = tfds.builder(pipeline.dataset_name(config.data), data_dir=str(config.data.data_dir)).info
        names = info.metadata["radiomics_feature_names"]
        if info.splits:
            return list(names)
    except Exception:  # the dataset is not on this machine: its builder config says how features were computed
        pass
    return list(radiomics_features.feature_names(builder_config(config.data.builder_config).radiomics_params))


def preprocessing(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What turns a CT and a nodule mask into the model's inputs (builder config, view, window, size, normalisation)."""
    builder = builder_config(config.data.builder_config)
    return {"builder_config": builder.name, "crop_size": builder.crop_size, "spacing_mm": builder.spacing_mm,
            "consensus_level": builder.consensus_level, "view": config.data.view,
            "window_hu": [float(v) for v in config.data.window_hu], "image_size": int(config.data.image_size),
            "image_mean": pipeline.AIMV2_MEAN.tolist(), "image_std": pipeline.AIMV2_STD.tolist(),
            "pixel_layout": "NCHW (PyTorch) / NHWC (JAX)", "channels": "view slices, windowed to [0, 1], normalised"}


def _resize_position_embedding(towers: str, image_size: int) -> None:
    """Rewrites a saved vision tower for `image_size` inputs with the position table the JAX model interpolates to
    (transformers' AIMv2 does not interpolate)."""
    with open(os.path.join(towers, hf_aimv2.CONFIG_NAME)) as f:
        hf_config = json.load(f)
    joint = "vision_config" in hf_config
    vision = hf_config["vision_config"] if joint else hf_config
    key = _POSITION_KEY if joint else _POSITION_KEY.removeprefix("vision_model.")
    old, new = vision["image_size"] // vision["patch_size"], image_size // vision["patch_size"]
    if old == new:
        return
    weights_file = os.path.join(towers, hf_aimv2.WEIGHTS_NAME)
    with safe_open(weights_file, framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(weights_file)
    tensors[key] = np.asarray(interpolate_position_embedding(jnp.asarray(tensors[key]), (old, old), (new, new)),
                              np.float32)
    save_file(tensors, weights_file, metadata=metadata)
    vision["image_size"] = image_size
    with open(os.path.join(towers, hf_aimv2.CONFIG_NAME), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


def check_exportable(model: nnx.Module, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless `model` is an AutoRad-Lung / CoOp model (the baselines have no PyTorch export)."""
    if config.model.name not in EXPORTABLE or not isinstance(model, AutoRadLung):
        raise ValueError(f"export writes AutoRad-Lung models ({', '.join(EXPORTABLE)}); this checkpoint holds a "
                         f"{config.model.name!r} model ({type(model).__name__}), which has no PyTorch export: use it "
                         f"with `python run.py predict --workdir`.")


def export_model(model: AutoRadLung, config: ml_collections.ConfigDict, stats: pipeline.RadiomicsStats,
                 out_dir: str, *, feature_names: list[str], checkpoint: Optional[dict] = None) -> str:
    """Writes the export folder of an AutoRad-Lung / CoOp model trained with `config`; returns its path."""
    check_exportable(model, config)
    name = config.model.name
    if len(feature_names) != stats.mean.shape[0]:
        raise ValueError(f"{len(feature_names)} radiomics feature names but the checkpoint's statistics have "
                         f"{stats.mean.shape[0]} features: the dataset of {config.data.data_dir} is not the one the "
                         f"model was trained on.")
    os.makedirs(out_dir, exist_ok=True)
    towers, vision = os.path.join(out_dir, EXPORT_TOWERS), os.path.join(out_dir, EXPORT_VISION)
    for folder, module in ((towers, model.aimv2), (vision, model.aimv2.vision_model)):
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        hf_aimv2.save_pretrained(module, folder)
        _resize_position_embedding(folder, int(config.data.image_size))
    load_tokenizer(config.model.aimv2_dir or None).save_pretrained(towers)
    prompt_learner = model.prompt_learner
    save_file(prompt_learner_state(prompt_learner), os.path.join(out_dir, EXPORT_WEIGHTS), metadata={"format": "pt"})
    meta_net = prompt_learner.meta_net
    export_config = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
        "model": {"name": name, "pooling": model.pooling, "n_ctx": int(prompt_learner.n_ctx),
                  "conditioning": prompt_learner.conditioning,
                  "meta_hidden_dim": None if meta_net is None else int(meta_net.linear1.out_features)},
        "class_names": list(pipeline.class_names(config)),
        "labels": list(pipeline.label_names(config.data.label_scheme)),
        "tokenized_prompts": np.asarray(prompt_learner.tokenized_prompts[...]).tolist(),
        "radiomics": {"feature_names": list(feature_names), **stats.to_json()},
        "preprocessing": preprocessing(config),
        "checkpoint": checkpoint or {},
        "config": config.to_dict(),
    }
    with open(os.path.join(out_dir, EXPORT_CONFIG), "w") as f:
        json.dump(export_config, f, indent=2)
    return out_dir


def export(workdir: str, out_dir: str, step: Optional[int] = None) -> str:
    """Exports the best (or step `step`) checkpoint of `workdir` to `out_dir`; returns `out_dir`."""
    restored = trainer.load_model(workdir, step)
    check_exportable(restored.model, restored.config)
    return export_model(restored.model, restored.config, restored.stats, out_dir,
                        feature_names=radiomics_feature_names(restored.config),
                        checkpoint={"workdir": os.path.abspath(workdir), "step": restored.step})


def load_export(export_dir: str) -> tuple[AutoRadLung, dict[str, Any]]:
    """The JAX model of an export folder (the inverse of `export_model`) and the folder's JSON config."""
    export_config = read_export_config(export_dir)
    config = checkpointing.saved_config(export_config["config"])
    config.model.aimv2_dir = os.path.join(export_dir, EXPORT_TOWERS)
    names = export_config["radiomics"]["feature_names"]
    try:
        model = models.Model(config.model, class_names=tuple(export_config["class_names"]),
                             num_radiomics=len(names), rngs=nnx.Rngs(0))
    except ValueError as e:
        raise ExportFolderError(f"{export_dir}: the AIMv2 folder does not fit the exported model: {e}") from e
    load_prompt_learner_state(model.prompt_learner, load_file(os.path.join(export_dir, EXPORT_WEIGHTS)))
    if np.asarray(model.prompt_learner.tokenized_prompts[...]).tolist() != export_config["tokenized_prompts"]:
        raise ExportFolderError(f"{export_dir}: the tokenised prompts of {EXPORT_WEIGHTS} and {EXPORT_CONFIG} differ.")
    return model, export_config
