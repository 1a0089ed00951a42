"""Export of a trained AutoRad-Lung (or CoOp) model: workdir -> `transformers` folder of its tower family (AIMv2,
CLIP, SigLIP) + PyTorch model folder.

`export(workdir, out_dir)` writes the folder that `autorad_jax.weights.torch_model.AutoRadLungTorch.from_export`
loads (layout in that module): the towers through their family's name map (`save_pretrained`), the prompt
learner through its name map, and a JSON config with class names, tokenised prompts, radiomics names and statistics,
the preprocessing and the training config, and a model card (README.md, autorad_jax/model_card.py). `load_export`
reads such a folder back into the JAX model. Weights are safetensors only.

An export never destroys what it did not write: a non-empty `out_dir` is refused unless it holds an earlier export
(its files alone) and `overwrite` is given; the new export is written beside it and swapped in whole, so a failed
export leaves the old one as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from autorad_jax import model_card, models
from autorad_jax.data import pipeline, preprocess
from autorad_jax.errors import STALE_PROMPT_EMBEDDINGS, AutoradError
from autorad_jax.modeling import TOKENIZER_DIR, copy_tokenizer
from autorad_jax.models import families
from autorad_jax.models.towers import interpolate_position_embedding
from autorad_jax.models.autorad_lung import AutoRadLung
from autorad_jax.models.spec import ModelSpec, PromptTokens
from autorad_jax.train import checkpointing, experiment
from autorad_jax.weights import pretrained
from autorad_jax.weights.prompt_learner import load_prompt_learner_state, prompt_learner_state
from autorad_jax.weights.export_format import (DEFAULT_FAMILY, EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_FORMAT_VERSION,
                                               EXPORT_WEIGHTS, ExportFolderError, export_towers, read_export_config)

_POSITION_KEY = "vision_model.embeddings.position_embedding.weight"
EXPORT_MODELS = ("autorad_lung", "coop", "cocoop")  # models with a learned context, read by AutoRadLungTorch
# what it writes
EXPORT_ENTRIES = (*(d for f in families.FAMILIES for d in export_towers(f)), EXPORT_WEIGHTS, EXPORT_CONFIG,
                  model_card.CARD_NAME)


class ExportTargetError(AutoradError, FileExistsError):
    """The export's output folder cannot be written as asked (not a folder, or not empty without --overwrite)."""


def _resize_position_embedding(towers: str, image_size: int) -> None:
    """Rewrites a saved vision tower for `image_size` inputs with the position table the JAX model interpolates to
    (transformers' AIMv2 does not interpolate; CLIP and SigLIP would, only when asked). The rows before the patch grid
    (CLIP's class token) stay as they are."""
    hf_config = pretrained.read_json(os.path.join(towers, pretrained.CONFIG_NAME))
    joint = "vision_config" in hf_config
    vision = hf_config["vision_config"] if joint else hf_config
    key = _POSITION_KEY if joint else _POSITION_KEY.removeprefix("vision_model.")
    old, new = vision["image_size"] // vision["patch_size"], image_size // vision["patch_size"]
    if old == new:
        return
    weights_file = os.path.join(towers, pretrained.WEIGHTS_NAME)
    tensors = pretrained.read_safetensors_file(weights_file)
    table = tensors[key]
    extra = table.shape[0] - old * old
    grid = interpolate_position_embedding(jnp.asarray(table[extra:]), (old, old), (new, new))
    tensors[key] = np.concatenate([table[:extra], np.asarray(grid, np.float32)])
    save_file(tensors, weights_file, metadata={"format": "pt"})
    vision["image_size"] = image_size
    with open(os.path.join(towers, pretrained.CONFIG_NAME), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


def check_exportable(model: nnx.Module, config: ml_collections.ConfigDict) -> None:
    """ValueError unless `model` is an AutoRad-Lung / CoOp / CoCoOp model (the baselines and zero-shot have no PyTorch
    export)."""
    if config.model.name not in EXPORT_MODELS or not isinstance(model, AutoRadLung):
        raise ExportFolderError(
            f"export writes AutoRad-Lung models ({', '.join(EXPORT_MODELS)}); this checkpoint holds a "
            f"{config.model.name!r} model ({type(model).__name__}), which has no PyTorch export: use it with "
            f"`autorad predict --workdir`.")


def export_model(model: AutoRadLung, config: ml_collections.ConfigDict, spec: ModelSpec,
                 stats: pipeline.RadiomicsStats, out_dir: str, *, tokenizer_dir: Optional[str] = None,
                 checkpoint: Optional[dict] = None) -> str:
    """Writes the export folder of an AutoRad-Lung / CoOp model into the new or empty folder `out_dir`.

    `tokenizer_dir`: the run's saved tokenizer (default: CLIP's BPE vocabulary), copied beside the towers.
    """
    check_exportable(model, config)
    os.makedirs(out_dir, exist_ok=True)
    towers, vision = (os.path.join(out_dir, name) for name in export_towers(model.family))
    for folder, module in ((towers, model.towers), (vision, model.towers.vision_model)):
        pretrained.save_pretrained(module, folder)
        _resize_position_embedding(folder, int(config.data.image_size))
    copy_tokenizer(tokenizer_dir, towers)
    prompt_learner = model.prompt_learner
    save_file(prompt_learner_state(prompt_learner), os.path.join(out_dir, EXPORT_WEIGHTS), metadata={"format": "pt"})
    meta_net = prompt_learner.meta_net
    export_config = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
        "model": {"name": config.model.name, "family": model.family, "pooling": model.pooling,
                  "condition_on": model.condition_on, "n_ctx": int(prompt_learner.n_ctx),
                  "ctx_start": int(prompt_learner.ctx_start),
                  "ctx_from_tokens": bool(spec.prompts.ctx_from_tokens), "conditioning": prompt_learner.conditioning,
                  "meta_hidden_dim": None if meta_net is None else int(meta_net.linear1.out_features)},
        "class_names": list(spec.class_names),
        "labels": list(pipeline.label_names(config.data.label_scheme)),
        "tokenized_prompts": np.asarray(prompt_learner.tokenized_prompts[...]).tolist(),
        "radiomics": {"feature_names": list(spec.radiomics_names), **stats.to_json()},
        "preprocessing": preprocess.description(config.data),
        "checkpoint": checkpoint or {},
        "config": config.to_dict(),
    }
    with open(os.path.join(out_dir, EXPORT_CONFIG), "w") as f:
        json.dump(export_config, f, indent=2)
    model_card.write_model_card(out_dir, config, export_config, workdir=(checkpoint or {}).get("workdir"))
    return out_dir


def _check_target(out_dir: str, overwrite: bool) -> None:
    """ExportTargetError unless `out_dir` is new, empty, or (with `overwrite`) an earlier export and nothing else."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportTargetError(f"--out {out_dir} is a file, not a folder: give a new or empty folder.")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return
    foreign = [name for name in entries if name not in EXPORT_ENTRIES]
    if foreign or EXPORT_CONFIG not in entries:
        shown = foreign or entries
        listing = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        raise ExportTargetError(f"--out {out_dir} holds what an export does not write ({listing}): give a new or "
                                f"empty folder (--overwrite replaces only an earlier export).")
    if not overwrite:
        raise ExportTargetError(f"--out {out_dir} holds an earlier export: add --overwrite to replace it, or give a "
                                f"new or empty folder.")


def export(workdir: str, out_dir: str, step: Optional[int] = None, *, overwrite: bool = False) -> str:
    """Exports the best (or step `step`) checkpoint of `workdir` to `out_dir`; returns `out_dir`.

    The export is written into a new folder beside `out_dir` and moved into place when complete; with `overwrite`, an
    earlier export in `out_dir` is replaced only then. A folder holding anything else is refused.
    """
    out_dir = os.path.abspath(out_dir)
    _check_target(out_dir, overwrite)
    restored = experiment.load_model(workdir, step)
    check_exportable(restored.model, restored.config)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=parent)
    try:
        export_model(restored.model, restored.config, restored.spec, restored.stats, staging,
                     tokenizer_dir=os.path.join(workdir, TOKENIZER_DIR),
                     checkpoint={"workdir": os.path.abspath(workdir), "step": restored.step})
        _swap_in(staging, out_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return out_dir


def _swap_in(staging: str, out_dir: str) -> None:
    """Moves the complete export `staging` to `out_dir`, replacing the (empty, or overwritten) folder there."""
    if not os.path.isdir(out_dir):
        os.rename(staging, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(old, "previous"))
    os.rename(staging, out_dir)
    shutil.rmtree(old)


def load_export(export_dir: str) -> tuple[AutoRadLung, dict[str, Any]]:
    """The JAX model of an export folder (the inverse of `export_model`) and the folder's JSON config."""
    export_config = read_export_config(export_dir)
    config = checkpointing.saved_config(export_config["config"])
    m = export_config["model"]
    towers_dir = os.path.join(export_dir, export_towers(m.get("family", DEFAULT_FAMILY))[0])
    spec = ModelSpec(
        towers=pretrained.read_config(towers_dir),
        prompts=PromptTokens(np.asarray(export_config["tokenized_prompts"], np.int32), int(m["n_ctx"]),
                             bool(m.get("ctx_from_tokens", False)), int(m.get("ctx_start", 1))),
        class_names=tuple(export_config["class_names"]),
        radiomics_names=tuple(export_config["radiomics"]["feature_names"]))
    try:
        model = nnx.eval_shape(lambda: models.Model(config.model, spec, rngs=nnx.Rngs(0)))
    except ValueError as e:
        raise ExportFolderError(f"{export_dir}: the towers' folder does not fit the exported model: {e}") from e
    pretrained.hf_state_to_nnx(model.towers, pretrained.read_safetensors(towers_dir), towers_dir)
    weights = os.path.join(export_dir, EXPORT_WEIGHTS)
    load_prompt_learner_state(model.prompt_learner, pretrained.read_safetensors_file(weights), weights)
    if not np.array_equal(model.prompt_learner.tokenized_prompts[...], spec.prompts.ids):
        raise ExportFolderError(f"{export_dir}: the tokenised prompts of {EXPORT_WEIGHTS} and {EXPORT_CONFIG} differ.")
    if not model.prompt_learner.embeds_with(models.token_embedding(model.towers).get_value()):
        raise ExportFolderError(f"{export_dir}: {STALE_PROMPT_EMBEDDINGS}")
    return model, export_config
