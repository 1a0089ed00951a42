"""The one strict engine behind every name map: a map pairs each external (PyTorch state-dict) key with an NNX variable
path and a layout transform, and serves both directions.

Strict: the map covers every variable of the module and nothing else; reading, every source key is used exactly once
and every shape is checked; anything else raises `WeightsMismatchError` naming the keys.

A stacked variable (leading axis over layers, as scanned layers hold) takes one external key per row: its entries are
`(path, transform, row)`; together they must fill rows 0..n-1 exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

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

Target = Union[tuple[Path, Transform], tuple[Path, Transform, int]]  # (path, transform[, row of a stacked variable])
NameMap = dict[str, Target]


def _unpack(target: Target) -> tuple[Path, Transform, Optional[int]]:
    return (target[0], target[1], target[2] if len(target) == 3 else None)


def variables(module: nnx.Module, kind: type = nnx.Param) -> dict[Path, nnx.Variable]:
    """The module's variables of `kind` by path."""
    return dict(nnx.to_flat_state(nnx.state(module, kind)))


def _check_covers(mapping: NameMap, targets: dict[Path, nnx.Variable], what: str) -> None:
    rows: dict[Path, list[Optional[int]]] = {}
    for target in mapping.values():
        path, _, row = _unpack(target)
        rows.setdefault(path, []).append(row)
    unmapped = sorted(map(str, set(targets) - set(rows)))
    absent = sorted(map(str, set(rows) - set(targets)))
    if unmapped or absent:
        raise WeightsMismatchError(f"{what}: name map and model disagree: model variables not mapped {unmapped}, "
                                   f"mapped paths absent {absent}")
    for path, got in rows.items():
        want = [None] if got == [None] else list(range(targets[path].shape[0]))
        if sorted(got, key=lambda r: -1 if r is None else r) != want:
            raise WeightsMismatchError(f"{what}: name map fills {'/'.join(map(str, path))} with rows {got}, the model "
                                       f"variable has shape {tuple(targets[path].shape)}")


def load(targets: dict[Path, nnx.Variable], mapping: NameMap, state: dict[str, np.ndarray], source: str) -> None:
    """Writes `state` (external key -> array) into `targets` in place, strictly; `source` names it in errors.

    Values keep each variable's dtype (parameters stay float32); stacked variables are assembled from their rows.
    """
    _check_covers(mapping, targets, source)
    missing, unexpected = sorted(set(mapping) - set(state)), sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise WeightsMismatchError(f"{source}: weights do not match the model: missing {missing}, unexpected "
                                   f"{unexpected}")
    stacked: dict[Path, np.ndarray] = {}
    for key, target in mapping.items():
        path, transform, row = _unpack(target)
        var = targets[path]
        value = transform.to_nnx(np.asarray(state[key]))
        expected = tuple(var.shape) if row is None else tuple(var.shape[1:])
        if value.shape != expected:
            where = "" if row is None else f" (row {row})"
            raise WeightsMismatchError(
                f"{source}: {key} has shape {np.shape(state[key])} ({value.shape} after '{transform.name}'), the model "
                f"variable {'/'.join(map(str, path))}{where} expects {expected}")
        if row is None:
            var.set_value(jnp.asarray(value, dtype=var.dtype))
        else:
            stacked.setdefault(path, np.empty(var.shape, var.dtype))[row] = value
    for path, value in stacked.items():
        targets[path].set_value(jnp.asarray(value))


def dump(targets: dict[Path, nnx.Variable], mapping: NameMap, what: str) -> dict[str, np.ndarray]:
    """The external state dict of `targets` (contiguous numpy arrays in the variables' dtype)."""
    _check_covers(mapping, targets, what)
    host = {path: np.asarray(jax.device_get(var[...])) for path, var in targets.items()}
    out = {}
    for key, target in mapping.items():
        path, transform, row = _unpack(target)
        value = host[path] if row is None else host[path][row]
        out[key] = np.array(transform.to_external(value), order="C")
    return out
