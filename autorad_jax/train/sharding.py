"""Device mesh and logical-axis sharding.

Parameters carry logical axis names (``out_sharding`` metadata, e.g. ``('embed', 'mlp')``); a rule table maps each
logical name to a mesh axis of the ``('data', 'fsdp', 'tensor')`` mesh, as MaxText does. Data parallelism shards
the batch over ``data`` and ``fsdp``; FSDP shards parameters' ``embed`` axis over ``fsdp``; tensor parallelism shards
``mlp``/``heads``/``vocab`` over ``tensor``. Scanned blocks' stacked ``layers`` axis is not sharded.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from autorad_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned blocks: each device holds every layer of its shard
)


def make_mesh(mesh_shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh; axes absent from ``mesh_shape`` have size 1, one axis may be -1 (rest).

    Example: ``make_mesh({'data': -1, 'fsdp': 2, 'tensor': 2})`` on 8 devices -> data=2, fsdp=2, tensor=2.
    """
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {dict(mesh_shape)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ConfigError(f"{len(devices)} devices do not divide into mesh {dict(mesh_shape)}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(names: Sequence[Optional[str]], mesh: Mesh,
                     rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> NamedSharding:
    """The ``NamedSharding`` of one array whose axes have logical ``names`` (e.g. ``('batch', None, None, None)``)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), rules))


def logical_shardings(abstract_state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for every variable of an (abstract) ``nnx.State``, from its ``out_sharding`` logical names.

    Variables without names are replicated. The result has the structure of ``abstract_state`` and can be given to
    ``jax.device_put`` or as ``jax.jit`` ``in_shardings``/``out_shardings``.
    """
    return nn.logical_to_mesh_sharding(nnx.get_partition_spec(abstract_state), mesh, rules)


def shard_module(module: nnx.Module, mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> nnx.Module:
    """Places every variable of ``module`` on ``mesh`` per its logical names (in place) and returns the module."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, logical_shardings(state, mesh, rules)))
    return module


__all__ = [
    "DEFAULT_LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "logical_sharding",
    "logical_shardings",
    "make_mesh",
    "shard_module",
]
