"""What a model is built from besides config.model: tower configs, prompt token ids, classes and radiomics names.

A `ModelSpec` is resolved once, on a fresh start, from the config and the files it names (a pretrained folder of a
tower family, the tokenizer, the dataset's metadata) by `autorad_jax.modeling`; it is then saved with every checkpoint and export,
so that a model is rebuilt from the workdir alone. It holds data only: building from it reads no file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from autorad_jax.models import families

Towers = Any  # a tower family's joint or vision config (see autorad_jax.models.families)


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """The class prompts `[SOS][ctx_1..n_ctx][class words][.][EOS]` as token ids (SigLIP's have no SOS).

    `ids` [C, L] int32: for a text tower pooled at EOS (causal: later positions cannot change a class feature) cut
    after the last EOS; for one pooled at its last position, padded to its fixed length. Positions
    ctx_start..ctx_start + n_ctx - 1 are the context (ctx_start: 1 after an SOS token, else 0). With `ctx_from_tokens`
    the learnable context starts as the token embeddings of those positions of ids[0] (a phrase such as "a CT scan of
    a"), else random.
    """
    ids: np.ndarray
    n_ctx: int
    ctx_from_tokens: bool
    ctx_start: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"ids": np.asarray(self.ids).tolist(), "n_ctx": int(self.n_ctx),
                "ctx_from_tokens": bool(self.ctx_from_tokens), "ctx_start": int(self.ctx_start)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PromptTokens:
        return cls(np.asarray(d["ids"], np.int32), int(d["n_ctx"]), bool(d["ctx_from_tokens"]),
                   int(d.get("ctx_start", 1)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything besides config.model that fixes a model's parameters and their shapes.

    towers: the tower family's config (joint for the prompt models, vision-only allowed for the linear probe and late
        fusion); None for the radiomics-only baselines. Its config.json `model_type` names the family.
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
    def family(self) -> Optional[families.Family]:
        """The tower family (None without towers)."""
        return None if self.towers is None else families.of_config(self.towers)

    @property
    def vision_config(self):
        """The vision tower's config (None without towers)."""
        if self.towers is None or families.is_vision_only(self.towers):
            return self.towers
        return self.towers.vision_config

    def to_json(self) -> dict[str, Any]:
        return {"family": None if self.towers is None else self.family.name,
                "towers": None if self.towers is None else self.towers.to_hf_dict(),
                "prompts": None if self.prompts is None else self.prompts.to_json(),
                "class_names": list(self.class_names), "radiomics_names": list(self.radiomics_names)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSpec:
        towers = None if d["towers"] is None else families.config_from_hf_dict(d["towers"])
        prompts = None if d["prompts"] is None else PromptTokens.from_json(d["prompts"])
        return cls(towers, prompts, tuple(d["class_names"]), tuple(d["radiomics_names"]))
