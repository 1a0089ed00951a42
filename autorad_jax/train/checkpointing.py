"""Orbax checkpoints in `workdir/checkpoints`: model and optimiser state, the data iterator, radiomics statistics and
the config, one step per folder. Keeps the latest `train.keep_checkpoints` and the best by validation macro AUC.

Items of a step: 'state' (nnx state of (model, optimizer), restored against an abstract sharded target, so a
checkpoint moves between meshes and hosts), 'data_iter' (grain iterator state, one file per process),
'radiomics_stats' (JSON: training-split mean and std), 'config' (JSON of the config that wrote it), 'model_spec'
(JSON: tower configs, prompt token ids, class and radiomics names; with the config, all that rebuilds the model).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from autorad_jax.errors import AutoradError
from autorad_jax.models.spec import ModelSpec
from configs import autorad_lung as default_config

BEST_METRIC = "auc_macro"
ITEMS = ("state", "config", "radiomics_stats", "model_spec")  # what every complete step holds (and 'data_iter')
# Config keys that change the shapes or meaning of what a checkpoint holds; everything else may change on resume,
# and so may these compute-only model settings. The pretrained folder is read on a fresh start only.
_FREE_KEYS = ("model.aimv2_dir", "model.dtype", "model.attention_implementation", "model.remat",
              "model.prompt_chunk_size")
_STRUCTURAL_PREFIXES = ("model.", "data.builder_config", "data.view", "data.image_size", "data.window_hu",
                        "data.label_scheme", "data.label_rule", "data.min_readers", "data.min_diameter_mm",
                        "data.include_incomplete",
                        "data.cv_fold", "data.cv_repeat", "data.radiomics_transform", "data.radiomics_clip",
                        "data.shuffle_", "data.balanced_sampling", "optim.name", "optim.grad_accum_steps")
# Orbax splits the writing of a replicated array among its replicas, each part cut by an eager jax slice (a dispatch,
# and a compilation per new shape); for parts smaller than this the slicing costs more than the write it spreads.
MIN_REPLICA_SLICE_BYTES = 1 << 20


class IncompatibleCheckpointError(AutoradError, RuntimeError):
    """The workdir holds a checkpoint written by a config that does not fit this one."""


class MissingCheckpointError(AutoradError, FileNotFoundError):
    """The workdir holds no checkpoint, or not the step asked for."""


def checkpoint_dir(workdir: str) -> str:
    """The absolute checkpoint folder of `workdir`."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _best_metric(metrics: dict) -> float:
    value = metrics.get(BEST_METRIC, float("nan"))
    return -math.inf if value is None or math.isnan(value) else float(value)


@functools.cache
def _register_array_handler() -> None:
    """jax.Array checkpointing with `MIN_REPLICA_SLICE_BYTES`, once per process (orbax's registry is global; its
    warning about replacing its default handler is expected here and kept off the console)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
            override=True)
    finally:
        logging.set_verbosity(verbosity)


def make_manager(workdir: str, keep: int, *, read_only: bool = False) -> ocp.CheckpointManager:
    """Async CheckpointManager keeping the latest `keep` steps and the best one by validation macro AUC."""
    _register_array_handler()
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(  # best_fn: orbax writes a step's metrics only when it is set
        preservation_policy=policy, best_fn=_best_metric, best_mode="max", enable_async_checkpointing=True,
        read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data_iter": grain.PyGrainCheckpointHandler(),
                       "radiomics_stats": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "model_spec": ocp.JsonCheckpointHandler()})


def require_checkpoint_dir(workdir: str) -> None:
    """MissingCheckpointError unless `workdir` has a checkpoint folder."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise MissingCheckpointError(f"No checkpoint folder {checkpoint_dir(workdir)}: train first (python run.py "
                                     f"train --workdir {workdir}).")


@contextlib.contextmanager
def open_manager(workdir: str, *, read_only: bool = True, keep: int = 1) -> Iterator[ocp.CheckpointManager]:
    """`make_manager` that is closed on every path (its async machinery must stop before the process ends)."""
    if read_only:
        require_checkpoint_dir(workdir)
    manager = make_manager(workdir, keep, read_only=read_only)
    try:
        yield manager
    finally:
        manager.close()


def pick_step(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
    """`step` when the workdir holds it; by default the best step. MissingCheckpointError naming what it holds."""
    steps = manager.all_steps()
    if not steps:
        raise MissingCheckpointError(f"No checkpoint in {checkpoint_dir(workdir)}: train first (python run.py train "
                                     f"--workdir {workdir}).")
    if step is None:
        return best_step(manager)
    if int(step) not in steps:
        raise MissingCheckpointError(f"No checkpoint of step {step} in {checkpoint_dir(workdir)}; it holds steps "
                                     f"{sorted(steps)}.")
    return int(step)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, stats_json: dict,
         config: ml_collections.ConfigDict, spec: ModelSpec, metrics: dict | None = None) -> None:
    """Starts an async save of one step (`metrics`: validation metrics, when evaluated at this step). A local
    data_dir is saved as an absolute path, so that `eval` and `export` find the dataset from any directory."""
    saved = config.to_dict()
    if "://" not in saved["data"]["data_dir"]:
        saved["data"]["data_dir"] = os.path.abspath(saved["data"]["data_dir"])
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=grain.PyGrainCheckpointSave(data_iter),
        radiomics_stats=ocp.args.JsonSave(stats_json), config=ocp.args.JsonSave(saved),
        model_spec=ocp.args.JsonSave(spec.to_json())),
        metrics=metrics, force=True)


def restore_meta(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict, ModelSpec]:
    """(config dict, radiomics statistics JSON, model spec) saved at `step`."""
    step_dir = os.path.join(str(manager.directory), str(step))
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(step_dir, item))]
    if missing:
        raise IncompatibleCheckpointError(
            f"Checkpoint {step_dir} lacks {', '.join(missing)}: it is incomplete or was written by an older version "
            f"of autorad-jax. Use another --workdir (or --checkpoint of another step).")
    out = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), radiomics_stats=ocp.args.JsonRestore(), model_spec=ocp.args.JsonRestore()))
    return out["config"], out["radiomics_stats"], ModelSpec.from_json(out["model_spec"])


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
    """Restores 'state' onto the shardings of `abstract_state` (and the data iterator in place, when given)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args["data_iter"] = grain.PyGrainCheckpointRestore(data_iter)
    return manager.restore(step, args=ocp.args.Composite(**args))["state"]


def restore_model_state(step_dir: str, abstract_model_state):
    """Restores only the model's part of a step's 'state' item (item 0 of the (model, optimiser) pair) onto the
    shardings of `abstract_model_state`: what prediction and export need, without reading the optimiser's moments
    (twice the trainable parameters)."""
    item = {0: abstract_model_state}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    return restored[0]


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The kept step with the highest validation macro AUC (the latest step when none was evaluated)."""
    steps = manager.all_steps()
    if not steps:
        return None
    scored = [(s, m) for s in steps if (m := manager.metrics(s)) is not None]
    if not scored:
        return max(steps)
    return max(scored, key=lambda sm: (_best_metric(sm[1]), sm[0]))[0]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple]:
    """Raises IncompatibleCheckpointError naming every structural key whose value differs from the checkpoint's
    (keys only one of the two configs has, from another version of the config file, are not compared); returns the
    other changes, {key: (checkpoint's value, value now)}, which a resumed run takes."""
    old, new = _flatten(saved), _flatten(config.to_dict())
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    structural = [k for k in changed if k.startswith(_STRUCTURAL_PREFIXES) and k not in _FREE_KEYS]
    if structural:
        diffs = "; ".join(f"{k} is {old[k]!r} in the checkpoint but {new[k]!r} now" for k in structural)
        raise IncompatibleCheckpointError(
            f"{checkpoint_dir(workdir)} holds a checkpoint from an incompatible config: {diffs}. "
            f"Use another --workdir, or the config that wrote it.")
    return {k: (old[k], new[k]) for k in changed}


def saved_config(saved: dict) -> ml_collections.ConfigDict:
    """The config saved with a checkpoint or export, over the packaged configs/autorad_lung.py's defaults (so that
    keys added to the config since then keep their default values); reads no file."""
    config = default_config.get_config("tiny")
    config.unlock()
    config.update(saved)
    return config


def state_shapes(tree) -> dict[str, tuple]:
    """'model/path/to/param' -> shape of every array of an nnx state or of orbax metadata of one."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out["/".join(names[:-1] if names[-1] == "value" else names)] = tuple(leaf.shape)
    return out


def check_state_shapes(saved: dict[str, tuple], expected: dict[str, tuple], step_dir: str) -> None:
    """IncompatibleCheckpointError naming the arrays a checkpoint lacks, has in excess or holds in another shape."""
    problems = [f"{k} is missing" for k in sorted(set(expected) - set(saved))]
    problems += [f"{k} is not in the model" for k in sorted(set(saved) - set(expected))]
    problems += [f"{k} has shape {saved[k]}, the model {expected[k]}" for k in sorted(set(saved) & set(expected))
                 if saved[k] != expected[k]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IncompatibleCheckpointError(
            f"The state of checkpoint {step_dir} does not fit the model of the config saved with it: "
            f"{'; '.join(problems[:5])}{more}.")
