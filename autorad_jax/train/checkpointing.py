"""Orbax checkpoints in `workdir/checkpoints`: model and optimiser state, the data iterator, radiomics statistics and
the config, one step per folder. Keeps the latest `train.keep_checkpoints` and the best by validation macro AUC.

Items of a step: 'state' (nnx state of (model, optimizer), restored against an abstract sharded target, so a
checkpoint moves between meshes and hosts), 'data_iter' (grain iterator state, one file per process),
'radiomics_stats' (JSON: training-split mean and std), 'config' (JSON of the config that wrote it), 'model_spec'
(JSON: tower configs, prompt token ids, class and radiomics names; with the config, all that rebuilds the model).

Every command checks the steps it may read before orbax reads them (`damage`): a step with a file that is missing,
truncated or unreadable (a full disk, a partial copy) is named in one line and never read. Eval, predict and export
pass over it to the best intact step; a training run moves it to workdir/damaged_checkpoints/ and resumes from the
newest intact step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Iterator

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from orbax.checkpoint import checkpoint_managers

from autorad_jax.errors import AutoradError
from autorad_jax.models.spec import ModelSpec
from configs import autorad_lung as default_config

BEST_METRIC = "auc_macro"
DAMAGED_DIR = "damaged_checkpoints"  # where a training run moves the damaged steps of its workdir
# The JSON files orbax writes in a step (its own metadata, the JSON items, the metrics, grain's iterator state); the
# arrays are in OCDBT databases (an item's manifest.ocdbt and the data files under d/ that its B-tree refers to).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata", "metrics")
ITEMS = ("state", "config", "radiomics_stats", "model_spec")  # what every complete step holds (and 'data_iter')
# Config keys that change the shapes or meaning of what a checkpoint holds; everything else may change on resume,
# and so may these compute-only model settings. The pretrained folder is read on a fresh start only.
_FREE_KEYS = ("model.pretrained_dir", "model.aimv2_dir", "model.init", "model.dtype", "model.attention_implementation",
              "model.remat", "model.prompt_chunk_size")
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


class DamagedCheckpointError(AutoradError, RuntimeError):
    """A checkpoint step with a file that is missing, truncated or unreadable, or a workdir with no intact step."""


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


def _json_damage(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        return f"{path} is not valid JSON ({'empty' if os.path.getsize(path) == 0 else e})"
    return None


def _file_damage(path: str, end: int) -> str | None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{path} is missing"
    if size < end:
        return f"{path} is truncated ({size} bytes; the checkpoint's index refers to bytes up to {end})"
    return None


def _ocdbt_damage(item_dir: str) -> str | None:
    """The first file of the OCDBT database in `item_dir` (its manifest, B-tree nodes and data files) that cannot be
    read, is missing or is shorter than the B-tree says; reads the index alone, not the arrays."""
    base = ts.KvStore.open({"driver": "file", "path": item_dir + os.sep}).result()

    def reason(e: ValueError) -> str:
        return str(e).split(": ", 1)[-1]  # without tensorstore's status code

    try:
        versions = ts.ocdbt.dump(base).result()["versions"]
    except ValueError as e:
        return f"{os.path.join(item_dir, 'manifest.ocdbt')} cannot be read ({reason(e)})"
    ends: dict[str, int] = {}  # data file -> the end of the last byte range the B-tree refers to in it
    pending = [v["root"]["location"] for v in versions[-1:] if "location" in v["root"]]
    while pending:  # locations are "kind:prefix:file:offset:length", relative to item_dir
        location = pending.pop()
        _, prefix, name, offset, length = location.split(":")
        path = os.path.join(item_dir, prefix, name)
        ends[path] = max(ends.get(path, 0), int(offset) + int(length))
        if location.startswith("btreenode:"):
            try:
                entries = ts.ocdbt.dump(base, location).result()["entries"]
            except ValueError as e:
                return _file_damage(path, ends[path]) or f"{path} cannot be read ({reason(e)})"
            pending += [e.get("location") or e["indirect_value"] for e in entries if "inline_value" not in e]
    return next(filter(None, (_file_damage(path, end) for path, end in sorted(ends.items()))), None)


def damage(step_dir: str) -> str | None:
    """What is wrong with the checkpoint step in `step_dir`, as '<file> is truncated (...)' for the first damaged file
    found, or None when it is whole: orbax's JSON files parse, and each file that an item's OCDBT index refers to
    exists and is as long as the index says. Array chunks are not decompressed (a flipped bit inside one is not seen).
    """
    for folder, _, files in sorted(os.walk(step_dir)):
        for name in sorted(files):
            if name in _JSON_FILES or name.endswith(".json"):
                if problem := _json_damage(os.path.join(folder, name)):
                    return problem
    for item in sorted(os.listdir(step_dir)):
        if os.path.isfile(os.path.join(step_dir, item, "manifest.ocdbt")):
            if problem := _ocdbt_damage(os.path.join(step_dir, item)):
                return problem
    return None


def damaged_steps(workdir: str) -> dict[int, str]:
    """{step: what is wrong} of every damaged step of `workdir` (see `damage`)."""
    found = ocp.step.standard_name_format().find_all(checkpoint_dir(workdir))
    return {m.step: problem for m in sorted(found, key=lambda m: m.step) if (problem := damage(os.fspath(m.path)))}


@dataclasses.dataclass(frozen=True)
class _StepsExcept:
    """orbax's standard step names, the `hidden` steps left out of every listing: a CheckpointManager then never reads
    their files (it reads every step's metrics when it opens)."""
    hidden: frozenset[int]
    standard: ocp.step.NameFormat = ocp.step.standard_name_format()

    def build_name(self, step: int) -> str:
        return self.standard.build_name(step)

    def find_all(self, base_path):
        return (m for m in self.standard.find_all(base_path) if m.step not in self.hidden)

    def find_step(self, base_path, step: int):
        if step in self.hidden:
            raise ValueError(f"Checkpoint step {step} under {base_path} is damaged.")
        return self.standard.find_step(base_path, step)


def make_manager(workdir: str, keep: int, *, read_only: bool = False,
                 hidden: frozenset[int] = frozenset()) -> ocp.CheckpointManager:
    """Async CheckpointManager keeping the latest `keep` steps and the best one by validation macro AUC; the `hidden`
    steps (damaged) are not listed, read or written over."""
    _register_array_handler()
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(  # best_fn: orbax writes a step's metrics only when it is set
        preservation_policy=policy, best_fn=_best_metric, best_mode="max", enable_async_checkpointing=True,
        read_only=read_only, create=not read_only, step_name_format=_StepsExcept(hidden) if hidden else None)
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options,
        item_handlers={"state": _state_handler(), "data_iter": grain.PyGrainCheckpointHandler(),
                       "radiomics_stats": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "model_spec": ocp.JsonCheckpointHandler()})


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The (model, optimiser) state's handler, writing arrays without zstd: float32 weights shrink by about 6% with
    it, and decompressing them took over half of a large model's restore (3.7 s with, 1.7 s without, for 1.7 GB;
    checkpoints written compressed still restore)."""
    return ocp.PyTreeCheckpointHandler(use_compression=False)


def require_checkpoint_dir(workdir: str) -> None:
    """MissingCheckpointError unless `workdir` has a checkpoint folder."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise MissingCheckpointError(f"No checkpoint folder {checkpoint_dir(workdir)}: train first (autorad train "
                                     f"--workdir {workdir}).")


def _no_intact_step(workdir: str, damaged: dict[int, str]) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"No intact checkpoint in {checkpoint_dir(workdir)}: "
                                  + "; ".join(f"step {s}: {problem}" for s, problem in damaged.items())
                                  + f". Train afresh in another --workdir (or move {checkpoint_dir(workdir)} away).")


def _set_damaged_aside(workdir: str) -> None:
    """Moves the damaged steps of `workdir` to workdir/damaged_checkpoints/, each with a warning (process 0; every
    process has looked before and waits after), so that a training run resumes from the newest intact step and never
    writes over a damaged one. DamagedCheckpointError, moving nothing, when no step is intact."""
    damaged = damaged_steps(workdir)
    if not damaged:
        return
    intact = [m.step for m in ocp.step.standard_name_format().find_all(checkpoint_dir(workdir))
              if m.step not in damaged]
    if not intact:
        raise _no_intact_step(workdir, damaged)
    ocp.multihost.sync_global_processes("autorad_damaged_checkpoints_found")
    if jax.process_index() == 0:
        for step, problem in damaged.items():
            target, copies = os.path.join(workdir, DAMAGED_DIR, str(step)), 1
            while os.path.exists(target):  # the same step damaged, and moved, in an earlier run
                copies += 1
                target = os.path.join(workdir, DAMAGED_DIR, f"{step}.{copies}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), target)
            logging.warning("Checkpoint step %d is damaged: %s; moved to %s, training resumes from step %d, the "
                            "newest intact one.", step, problem, target, max(intact))
    ocp.multihost.sync_global_processes("autorad_damaged_checkpoints_moved")


@contextlib.contextmanager
def open_manager(workdir: str, *, read_only: bool = True, keep: int = 1) -> Iterator[ocp.CheckpointManager]:
    """`make_manager` that is closed on every path (its async machinery must stop before the process ends). Damaged
    steps are hidden from a read-only manager and moved aside (`_set_damaged_aside`) before a writable one opens."""
    if read_only:
        require_checkpoint_dir(workdir)
        hidden = frozenset(damaged_steps(workdir))
    else:
        _set_damaged_aside(workdir)
        hidden = frozenset()
    manager = make_manager(workdir, keep, read_only=read_only, hidden=hidden)
    try:
        yield manager
    finally:
        manager.close()


def pick_step(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
    """`step` when the workdir holds it intact; by default the best intact step, with a warning naming each damaged
    step passed over. MissingCheckpointError naming the steps it holds, DamagedCheckpointError naming the damaged
    file of `step` (or of every step, when none is intact)."""
    steps = manager.all_steps()  # the intact ones: open_manager hides the others
    damaged = damaged_steps(workdir)
    if step is not None and int(step) in damaged:
        raise DamagedCheckpointError(
            f"Checkpoint step {step} is damaged: {damaged[int(step)]}. Choose another --checkpoint"
            + (f" (intact steps: {', '.join(map(str, sorted(steps)))})" if steps else "")
            + " or leave --checkpoint out for the best intact one.")
    if not steps and damaged:
        raise _no_intact_step(workdir, damaged)
    if not steps:
        raise MissingCheckpointError(f"No checkpoint in {checkpoint_dir(workdir)}: train first (autorad train "
                                     f"--workdir {workdir}).")
    if step is None:
        chosen = best_step(manager)
        for damaged_step, problem in damaged.items():
            logging.warning("Checkpoint step %d is damaged: %s; using step %d, the best intact one.", damaged_step,
                            problem, chosen)
        return chosen
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
        state=ocp.args.PyTreeSave(state), data_iter=grain.PyGrainCheckpointSave(data_iter),
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
    args = {"state": ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
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
