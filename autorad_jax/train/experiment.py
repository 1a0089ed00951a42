"""The experiment of a config: its mesh, the (model, optimizer) graph with its sharded abstract state and the jitted
train and eval steps; and a checkpoint's state or model rebuilt from what the checkpoint holds.

Prediction and export read models through `load_model` without the training loop's imports (scikit-learn, matplotlib,
TensorBoard).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from autorad_jax import modeling, models
from autorad_jax.data import pipeline
from autorad_jax.data.preprocess import Preprocessing
from autorad_jax.errors import STALE_PROMPT_EMBEDDINGS, ConfigError
from autorad_jax.models.spec import ModelSpec
from autorad_jax.train import checkpointing, sharding, steps


@dataclasses.dataclass
class Experiment:
    """What the train and eval steps need: the mesh, the (model, optimizer) graph and its abstract sharded state."""
    config: ml_collections.ConfigDict
    spec: ModelSpec
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    shardings: nnx.State  # NamedSharding per state leaf
    abstract_state: nnx.State  # ShapeDtypeStruct with sharding per state leaf (a restore target)
    batch_sharding: NamedSharding
    replicated: NamedSharding
    loss_options: steps.LossOptions = steps.LossOptions()  # class-imbalance constants of the training loss

    def init_state(self) -> nnx.State:
        """Fresh state, random-init directly in its shardings. With config.model.init 'pretrained' and a folder, the
        pretrained towers are read once on the host and placed into those shardings, and only the other leaves are drawn: the
        jitted init returns those alone, so XLA drops the towers' random draws (most of the init's compile and run
        time); the other leaves get the draws a full random init gives them (equal up to float32 rounding). A model
        without towers (the radiomics baselines, which `cv` and the demo run with the same config) has nothing to
        load."""
        def build() -> nnx.State:
            return nnx.split(steps.build(self.config, self.spec))[1]

        if not modeling.loads_pretrained(self.config.model) or self.spec.towers is None:
            return jax.jit(build, out_shardings=self.shardings)()
        model, optimizer = nnx.merge(self.graphdef, self.abstract_state)
        modeling.load_pretrained(model, self.config.model, self.spec)
        leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
        shardings = jax.tree.leaves(self.shardings)
        drawn = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.ShapeDtypeStruct)]

        def draw() -> list[jax.Array]:
            built = jax.tree.leaves(build())
            return [built[i] for i in drawn]

        values = jax.jit(draw, out_shardings=[shardings[i] for i in drawn])()
        for i, value in zip(drawn, values):
            leaves[i] = value
        return jax.device_put(jax.tree.unflatten(treedef, leaves), self.shardings)

    @functools.cached_property
    def train_step(self):
        """(state, batch) -> (state, metrics), jitted with explicit shardings; the state is donated."""
        prep = Preprocessing.from_config(self.config.data, train=True, seed=self.config.seed)
        trainable = models.trainable_filter(self.config.model, self.spec)
        return jax.jit(steps.make_train_step(self.graphdef, trainable, prep, self.loss_options),
                       in_shardings=(self.shardings, self.batch_sharding),
                       out_shardings=(self.shardings, self.replicated), donate_argnums=0)

    @functools.cached_property
    def eval_step(self):
        """(state, batch) -> (probabilities, record index), both replicated so every process can read them. Only the
        model's part of the state (item 0) is read: the optimiser's need not be there (`restore_checkpoint`)."""
        model_graphdef = nnx.split(nnx.merge(self.graphdef, self.abstract_state)[0])[0]
        step = jax.jit(steps.make_eval_step(model_graphdef, Preprocessing.from_config(self.config.data)),
                       in_shardings=(self.shardings[0], self.batch_sharding), out_shardings=self.replicated)
        return lambda state, batch: step(state[0], batch)


def make_experiment(config: ml_collections.ConfigDict, spec: ModelSpec,
                    loss_options: steps.LossOptions = steps.LossOptions()) -> Experiment:
    """Mesh from config.mesh; the (model, optimizer) state abstractly (nnx.eval_shape) with its logical shardings;
    `loss_options` go to the train step."""
    mesh = sharding.make_mesh(dict(config.mesh), devices=_mesh_devices(dict(config.mesh)))
    abstract = nnx.eval_shape(lambda: steps.build(config, spec))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.logical_shardings(abstract_state, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    batch_sharding = sharding.logical_sharding(("batch",), mesh)
    batch_devices = int(np.prod([mesh.shape[a] for a in _axes(batch_sharding.spec[0])]))
    for key in ("batch_size", "eval_batch_size"):
        if config.data[key] % batch_devices:
            raise ConfigError(f"config.data.{key}={config.data[key]} is not divisible by the {batch_devices} devices "
                             f"of the mesh's batch axes {batch_sharding.spec[0]}.")
    return Experiment(config, spec, mesh, graphdef, shardings, target, batch_sharding,
                      NamedSharding(mesh, PartitionSpec()), loss_options)


def _mesh_devices(mesh_shape: dict[str, int]) -> list[jax.Device]:
    """All devices; or, in a single process, the first ones when config.mesh asks for fewer (e.g. a 1-device run)."""
    devices = jax.devices()
    wanted = int(np.prod(list(mesh_shape.values())))
    if wanted > 0 and wanted < len(devices) and jax.process_count() == 1:
        logging.warning("config.mesh %s uses %d of the %d devices.", mesh_shape, wanted, len(devices))
        return devices[:wanted]
    return devices


def _axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


def restore(manager, step: int, exp: Experiment, workdir: str, data_iter=None, *,
            model_only: bool = False) -> nnx.State:
    """The checkpoint's (model, optimizer) state; with `model_only` the model's alone (the optimiser's not read)."""
    step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(step))
    checkpointing.check_state_shapes(checkpointing.state_shapes(manager.item_metadata(step)["state"]),
                                     checkpointing.state_shapes(exp.abstract_state), step_dir)
    try:
        if model_only:
            state = checkpointing.restore_model_state(step_dir, exp.abstract_state[0])
        else:
            state = checkpointing.restore_state(manager, step, exp.abstract_state, data_iter)
    except (ValueError, KeyError) as e:
        raise checkpointing.IncompatibleCheckpointError(
            f"The checkpoint {step_dir} does not fit the model rebuilt from its config ({type(e).__name__}: {e}). "
            f"Use another --workdir.") from e
    check_prompt_embeddings(_model(exp, state if model_only else state[0]), step_dir)
    return state


def _model(exp: Experiment, model_state: nnx.State) -> nnx.Module:
    model, _ = nnx.merge(exp.graphdef, exp.abstract_state)
    nnx.update(model, model_state)
    return model


def check_prompt_embeddings(model: nnx.Module, where: str) -> None:
    """Raises IncompatibleCheckpointError when a prompt model's fixed token embeddings are not the rows of its own
    (frozen) text tower's token table, as in runs started from a pretrained folder before the prompts were embedded
    with the folder's table."""
    learner = getattr(model, "prompt_learner", None)
    if learner is None or learner.embeds_with(models.token_embedding(model.towers).get_value()):
        return
    raise checkpointing.IncompatibleCheckpointError(f"{where}: {STALE_PROMPT_EMBEDDINGS}")


class Restored(NamedTuple):
    """A checkpoint's model, the config that trained it, its model spec, radiomics statistics and step."""
    model: nnx.Module
    config: ml_collections.ConfigDict
    spec: ModelSpec
    stats: pipeline.RadiomicsStats
    step: int


def restore_checkpoint(workdir: str, step: int | None, data: dict | None = None,
                       mesh: dict | None = None) -> tuple[Experiment, nnx.State, Restored]:
    """The experiment and model state of `workdir`'s checkpoint `step` (default: the best intact one by validation
    macro AUC), rebuilt from what the checkpoint holds alone; `data` and `mesh` override the saved config.data /
    config.mesh keys (where the dataset is now, batch sizes, devices). The state holds the model's part (item 0 of
    the (model, optimizer) state) alone: the optimiser's moments are not read."""
    with checkpointing.open_manager(workdir, read_only=True) as manager:
        step = checkpointing.pick_step(manager, workdir, step)
        saved, stats_json, spec = checkpointing.restore_meta(manager, step)
        config = checkpointing.saved_config(saved)
        config.data.update(data or {})
        config.mesh.update(mesh or {})
        exp = make_experiment(config, spec)
        model_state = restore(manager, step, exp, workdir, model_only=True)
    return exp, nnx.State({0: model_state}), Restored(_model(exp, model_state), config, spec,
                                                      pipeline.RadiomicsStats.from_json(stats_json), step)


def load_model(workdir: str, step: int | None = None) -> Restored:
    """The model of `workdir`'s best checkpoint by validation macro AUC (or of checkpoint `step`) on one device,
    rebuilt from what the checkpoint holds alone (no dataset, no pretrained folder).

    Raises MissingCheckpointError, DamagedCheckpointError or IncompatibleCheckpointError, naming what is wrong.
    """
    return restore_checkpoint(workdir, step, mesh=dict(data=1, fsdp=1, tensor=1))[2]
