"""What every tower family's name map is made of: entries pairing a transformers state-dict key with an NNX parameter
path (and, for scanned blocks, a row of the stacked parameter) and a layout transform, and the ``Family`` record that
assembles a family's vision, text and joint maps for the strict engine of ``autorad_jax.weights.name_map``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from autorad_jax.weights.name_map import COPY, LINEAR, NameMap, Path, Transform

GroupStarts = Optional[tuple[int, ...]]  # an encoder's layout: None unrolled, else its scanned groups' first blocks
Entry = tuple[str, Path, Transform, Optional[int]]  # (transformers key, NNX path, transform, row of a stacked param)


def linear(hf: str, path: Path, bias: bool, row: Optional[int] = None) -> list[Entry]:
    """A torch ``nn.Linear`` ``hf`` <-> an ``nnx.Linear`` at ``path``."""
    entries = [(f"{hf}.weight", path + ("kernel",), LINEAR, row)]
    if bias:
        entries.append((f"{hf}.bias", path + ("bias",), COPY, row))
    return entries


def layer_norm(hf: str, path: Path, row: Optional[int] = None) -> list[Entry]:
    """A torch ``nn.LayerNorm`` ``hf`` <-> an ``nnx.LayerNorm`` at ``path``."""
    return [(f"{hf}.weight", path + ("scale",), COPY, row), (f"{hf}.bias", path + ("bias",), COPY, row)]


def text_embeddings() -> list[Entry]:
    """The token and position tables of a text tower (the same keys in every family)."""
    return [
        ("embeddings.token_embedding.weight", ("embeddings", "token_embedding", "embedding"), COPY, None),
        ("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding"), COPY, None),
    ]


def projections(config) -> list[Entry]:
    """The bias-free projections and the logit scale of a ``towers.ProjectedImageTextModel`` (AIMv2, CLIP)."""
    del config  # the same keys for every size
    return [("visual_projection.weight", ("visual_projection", "kernel"), LINEAR, None),
            ("text_projection.weight", ("text_projection", "kernel"), LINEAR, None),
            ("logit_scale", ("logit_scale",), COPY, None)]


def _block(starts: GroupStarts, i: int) -> tuple[Path, Optional[int]]:
    """NNX path and row of transformers' block i: ``layers/i`` unrolled, ``layers/<start>`` row i - start scanned."""
    if starts is None:
        return ("encoder", "layers", i), None
    start = max(s for s in starts if s <= i)
    return ("encoder", "layers", str(start)), i - start


def blocks(num_layers: int, starts: GroupStarts, block: Callable[[str, Path, Optional[int]], list[Entry]]
           ) -> list[Entry]:
    """The entries of transformers' ``encoder.layers.{i}`` for every block, ``block(hf prefix, NNX path, row)`` giving
    one block's, laid out unrolled or scanned as ``starts`` says (see ``towers.Encoder``)."""
    entries = []
    for i in range(num_layers):
        path, row = _block(starts, i)
        entries += block(f"encoder.layers.{i}", path, row)
    return entries


def _prefixed(prefix: str, entries: list[Entry]) -> list[Entry]:
    return [(f"{prefix}.{hf}", (prefix,) + path, t, row) for hf, path, t, row in entries]


@dataclasses.dataclass(frozen=True)
class Family:
    """A tower family: its config and module classes by kind (``joint``, ``vision``, ``text``: ``(config class, module
    class)``), and its name map as the entries of a lone vision tower, a lone text tower (each for its encoder's
    layout) and the joint model's own parameters (projections, logit scale), which the joint map adds to the towers'
    entries under ``vision_model.`` and ``text_model.``."""

    name: str
    joint: tuple[type, type]
    vision: tuple[type, type]
    text: tuple[type, type]
    vision_entries: Callable[..., list[Entry]]  # (vision config, GroupStarts) -> entries
    text_entries: Callable[..., list[Entry]]  # (text config, GroupStarts) -> entries
    joint_entries: Callable[..., list[Entry]]  # (joint config) -> entries

    @property
    def models(self) -> tuple[tuple[type, type], ...]:
        return (self.joint, self.vision, self.text)

    def name_map(self, config, vision_starts: GroupStarts = None, text_starts: GroupStarts = None) -> NameMap:
        """transformers key -> (NNX parameter path, transform[, row]) for the model that ``config`` describes, with its
        encoders unrolled (``None``) or scanned in groups starting at ``vision_starts``/``text_starts`` (see
        ``towers.Encoder.group_starts``; a lone tower's layout is ``vision_starts`` for vision, ``text_starts`` for
        text)."""
        if isinstance(config, self.joint[0]):
            entries = (_prefixed("vision_model", self.vision_entries(config.vision_config, vision_starts))
                       + _prefixed("text_model", self.text_entries(config.text_config, text_starts))
                       + self.joint_entries(config))
        elif isinstance(config, self.vision[0]):
            entries = self.vision_entries(config, vision_starts)
        elif isinstance(config, self.text[0]):
            entries = self.text_entries(config, text_starts)
        else:
            raise TypeError(f"not a {self.name} config: {type(config).__name__}")
        return {hf: (path, t) if row is None else (path, t, row) for hf, path, t, row in entries}
