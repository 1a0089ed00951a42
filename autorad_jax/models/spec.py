"""What a model is built from besides config.model: tower configs, prompt token ids, classes and radiomics names.

A `ModelSpec` is resolved once, on a fresh start, from the config and the files it names (a pretrained AIMv2 folder,
the tokenizer, the dataset's metadata) by `autorad_jax.modeling`; it is then saved with every checkpoint and export,
so that a model is rebuilt from the workdir alone. It holds data only: building from it reads no file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import numpy as np

from autorad_jax.models.aimv2 import Aimv2Config, Aimv2VisionConfig

Towers = Union[Aimv2Config, Aimv2VisionConfig]


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """The class prompts `[SOS][ctx_1..n_ctx][class words][.][EOS]` as token ids.

    `ids` [C, L] int32 are cut after the last EOS (the text tower is causal and pools at EOS, so later positions
    cannot change a class feature); positions 1..n_ctx are the context. With `ctx_from_tokens` the learnable context
    starts as the token embeddings of ids[0, 1:1 + n_ctx] (a phrase such as "a CT scan of a"), else random.
    """
    ids: np.ndarray
    n_ctx: int
    ctx_from_tokens: bool

    def to_json(self) -> dict[str, Any]:
        return {"ids": np.asarray(self.ids).tolist(), "n_ctx": int(self.n_ctx),
                "ctx_from_tokens": bool(self.ctx_from_tokens)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PromptTokens:
        return cls(np.asarray(d["ids"], np.int32), int(d["n_ctx"]), bool(d["ctx_from_tokens"]))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything besides config.model that fixes a model's parameters and their shapes.

    towers: the AIMv2 config (joint for the prompt models, vision-only allowed for the linear probe); None for the
        radiomics-only baselines.
    prompts: the class prompts' token ids (prompt models only).
    class_names: one per output, in logit order.
    radiomics_names: the pyradiomics feature names, in input order.
    """
    towers: Optional[Towers]
    prompts: Optional[PromptTokens]
    class_names: tuple[str, ...]
    radiomics_names: tuple[str, ...]

    @property
    def num_radiomics(self) -> int:
        return len(self.radiomics_names)

    @property
    def vision_config(self) -> Optional[Aimv2VisionConfig]:
        """The vision tower's config (None without towers)."""
        return self.towers.vision_config if isinstance(self.towers, Aimv2Config) else self.towers

    def to_json(self) -> dict[str, Any]:
        return {"towers": None if self.towers is None else self.towers.to_hf_dict(),
                "prompts": None if self.prompts is None else self.prompts.to_json(),
                "class_names": list(self.class_names), "radiomics_names": list(self.radiomics_names)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSpec:
        towers = d["towers"]
        if towers is not None:
            towers = (Aimv2Config if towers["model_type"] == Aimv2Config.model_type else Aimv2VisionConfig
                      ).from_hf_dict(towers)
        prompts = None if d["prompts"] is None else PromptTokens.from_json(d["prompts"])
        return cls(towers, prompts, tuple(d["class_names"]), tuple(d["radiomics_names"]))
