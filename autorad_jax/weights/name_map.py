"""The one strict engine behind every name map: a map pairs each external (PyTorch state-dict) key with an NNX variable
path and a layout transform, and serves both directions.

Strict: the map covers every variable of the module and nothing else; reading, every source key is used exactly once
and every shape is checked; anything else raises `WeightsMismatchError` naming the keys.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autorad_jax.errors import AutoradError

Path = tuple[Union[str, int], ...]


class WeightsMismatchError(AutoradError, ValueError):
    """Weights and model disagree: missing, unexpected or misshapen keys (the message names them)."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change between the external tensor and the NNX variable, in both directions."""

    name: str
    to_nnx: Callable[[np.ndarray], np.ndarray]
    to_external: Callable[[np.ndarray], np.ndarray]


COPY = Transform("copy", lambda w: w, lambda w: w)
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T)  # torch (out, in) <-> flax (in, out)
CONV = Transform("conv", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))  # OIHW <-> HWIO

NameMap = dict[str, tuple[Path, Transform]]


def variables(module: nnx.Module, kind: type = nnx.Param) -> dict[Path, nnx.Variable]:
    """The module's variables of `kind` by path."""
    return dict(nnx.to_flat_state(nnx.state(module, kind)))


def _check_covers(mapping: NameMap, targets: dict[Path, nnx.Variable], what: str) -> None:
    mapped = {path for path, _ in mapping.values()}
    unmapped = sorted(map(str, set(targets) - mapped))
    absent = sorted(map(str, mapped - set(targets)))
    if unmapped or absent:
        raise WeightsMismatchError(f"{what}: name map and model disagree: model variables not mapped {unmapped}, "
                                   f"mapped paths absent {absent}")


def load(targets: dict[Path, nnx.Variable], mapping: NameMap, state: dict[str, np.ndarray], source: str) -> None:
    """Writes `state` (external key -> array) into `targets` in place, strictly; `source` names it in errors.

    Values keep each variable's dtype (parameters stay float32).
    """
    _check_covers(mapping, targets, source)
    missing, unexpected = sorted(set(mapping) - set(state)), sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise WeightsMismatchError(f"{source}: weights do not match the model: missing {missing}, unexpected "
                                   f"{unexpected}")
    for key, (path, transform) in mapping.items():
        var = targets[path]
        value = transform.to_nnx(np.asarray(state[key]))
        if value.shape != tuple(var.shape):
            raise WeightsMismatchError(
                f"{source}: {key} has shape {np.shape(state[key])} ({value.shape} after '{transform.name}'), the model "
                f"variable {'/'.join(map(str, path))} expects {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))


def dump(targets: dict[Path, nnx.Variable], mapping: NameMap, what: str) -> dict[str, np.ndarray]:
    """The external state dict of `targets` (contiguous numpy arrays in the variables' dtype)."""
    _check_covers(mapping, targets, what)
    return {key: np.array(transform.to_external(np.asarray(jax.device_get(targets[path][...]))), order="C")
            for key, (path, transform) in mapping.items()}
