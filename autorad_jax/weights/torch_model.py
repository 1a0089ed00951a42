"""AutoRad-Lung in PyTorch, on `transformers`' AIMv2, CLIP or SigLIP, for models exported from JAX
(`autorad_jax.export`).

An export folder holds (<family>: aimv2, clip or siglip, as autorad_lung.json's model.family says):
  <family>/                 the (fine-tuned) towers as a `transformers` folder (`AutoModel.from_pretrained`: Aimv2Model,
                            CLIPModel, SiglipModel), with the tokenizer files of the text tower
  <family>_vision/          the (fine-tuned) vision tower alone (`AutoModel.from_pretrained`)
  autorad_lung.json         class names, tokenised prompts, radiomics feature names and standardisation statistics,
                            the preprocessing the model expects, and the training config
  autorad_lung.safetensors  the prompt learner: ctx, meta_net (absent for CoOp), token_prefix, token_suffix,
                            tokenized_prompts

    from autorad_jax.weights.torch_model import AutoRadLungTorch
    model = AutoRadLungTorch.from_export("export/").eval()
    pixel_values = model.preprocess(views)  # [B,S,S,3] HU views -> [B,3,H,W] normalised images
    probabilities = model(pixel_values, radiomics).softmax(-1)  # raw radiomics [B,F]

This module needs only torch, safetensors and transformers (no JAX); nothing here loads pickle.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any, NamedTuple, Optional

import safetensors.torch
import torch
from torch import nn
from transformers import AutoModel

from autorad_jax.errors import STALE_PROMPT_EMBEDDINGS
from autorad_jax.weights.export_format import (CONDITION_INPUTS, CONDITIONINGS, EXPORT_CONFIG, EXPORT_WEIGHTS, POOLINGS,
                                               RADIOMICS_TRANSFORMS, DEFAULT_FAMILY, ExportFolderError, export_towers,
                                               read_export_config)

class TorchFamily(NamedTuple):
    """How a family's `transformers` towers run here: the text tower's final norm, whether it is causal and pooled at
    EOS (else bidirectional, pooled at the last position), its projection after pooling (a child of the joint model,
    or of the text tower), the image projection (None: the vision pooler's output is the feature), whether the logit
    scale is clamped (AIMv2) and a bias added (SigLIP), and the image normalisation the vision tower was trained with
    (None: the export's preprocessing one)."""
    final_norm: str
    causal_eos: bool
    projection: str
    projection_in_text_model: bool
    image_projection: Optional[str]
    clamp_scale: bool
    logit_bias: bool
    image_mean_std: Optional[tuple[float, float]]


TORCH_FAMILIES = {  # the PyTorch side of autorad_jax.models.families
    "aimv2": TorchFamily("rms_norm", True, "text_projection", False, "visual_projection", True, False, None),
    "clip": TorchFamily("final_layer_norm", True, "text_projection", False, "visual_projection", False, False, None),
    "siglip": TorchFamily("final_layer_norm", False, "head", True, None, False, True, (0.5, 0.5)),
}


class PromptLearner(nn.Module):
    """CoCoOp-style prompts `[SOS][ctx + shift(cond)][class words . EOS]` as text-tower input embeddings.

    `meta_net` (linear1 -> ReLU -> linear2) maps the conditioning vector (standardised radiomics, or the normalised
    image feature for CoCoOp) of width `cond_dim` to one context shift shared by all context tokens ('shared') or one
    per token ('per_token'); without it (`conditioning=None`, CoOp) the context is the same for every sample.
    Parameter and buffer names are those of the JAX `PromptLearner`.
    """

    def __init__(self, *, n_ctx: int, width: int, num_classes: int, length: int, cond_dim: int,
                 meta_hidden_dim: Optional[int], conditioning: Optional[str], ctx_start: int = 1):
        super().__init__()
        if conditioning is not None and conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS} or None, got {conditioning!r}")
        self.conditioning = conditioning
        self.ctx = nn.Parameter(torch.zeros(n_ctx, width))
        self.meta_net = None
        if conditioning is not None:
            out_dim = width if conditioning == "shared" else n_ctx * width
            self.meta_net = nn.Sequential(collections.OrderedDict(
                linear1=nn.Linear(cond_dim, meta_hidden_dim), relu=nn.ReLU(),
                linear2=nn.Linear(meta_hidden_dim, out_dim)))
        self.register_buffer("tokenized_prompts", torch.zeros(num_classes, length, dtype=torch.int32))
        # SOS (none for SigLIP's prompts)
        self.register_buffer("token_prefix", torch.zeros(num_classes, ctx_start, width) if ctx_start else None)
        self.register_buffer("token_suffix", torch.zeros(num_classes, length - ctx_start - n_ctx, width))  # words . EOS

    def context(self, cond: torch.Tensor) -> torch.Tensor:
        """Context per sample [B, n_ctx, width] (CoOp: [1, n_ctx, width], shared by all samples)."""
        ctx = self.ctx[None]
        if self.meta_net is None:
            return ctx
        shift = self.meta_net(cond)
        return ctx + shift.reshape(shift.shape[0], -1, ctx.shape[-1])

    def construct_prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """`[prefix | ctx | suffix]` for every sample and class: ctx [B, n_ctx, D] -> prompts [B, C, L, D]."""
        b, c = ctx.shape[0], self.token_suffix.shape[0]
        expand = lambda buffer: buffer[None].expand(b, *buffer.shape)
        prefix = [] if self.token_prefix is None else [expand(self.token_prefix)]
        return torch.cat([*prefix, ctx[:, None].expand(b, c, *ctx.shape[1:]), expand(self.token_suffix)], dim=2)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [B, C, L, D] ([1, C, L, D] without a meta-network)."""
        return self.construct_prompts(self.context(cond))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for each feature: x [B, F], xp and fp [Q, F] (xp non-decreasing) -> [B, F]."""
    q = xp.shape[0]
    hi = torch.searchsorted(xp.T.contiguous(), x.T.contiguous(), right=True).clamp(1, q - 1).T
    x0, x1 = xp.gather(0, hi - 1), xp.gather(0, hi)
    f0, f1 = fp.gather(0, hi - 1), fp.gather(0, hi)
    w = torch.where(x1 > x0, (x - x0) / torch.where(x1 > x0, x1 - x0, 1.0), 1.0).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


def quantile_normal_scores(x: torch.Tensor, quantiles: torch.Tensor, bound: float = 1e-7) -> torch.Tensor:
    """[B, F] values -> normal scores through each feature's quantile table [Q, F], as
    `autorad_jax.data.pipeline.quantile_normal_scores` (ties averaged, ends mapped to the extreme scores)."""
    x, quantiles = x.double(), quantiles.double()
    refs = torch.linspace(0.0, 1.0, quantiles.shape[0], dtype=torch.float64)[:, None].expand_as(quantiles)
    u = 0.5 * (_interp(x, quantiles, refs) - _interp(-x, -quantiles.flip(0), -refs.flip(0)))
    u = torch.where(x <= quantiles[0], 0.0, torch.where(x >= quantiles[-1], 1.0, u))
    return torch.special.ndtri(u.clamp(bound, 1.0 - bound))


class RadiomicsStandardizer(nn.Module):
    """Raw radiomics [B, F] -> model inputs, as the training pipeline (`autorad_jax.data.pipeline.RadiomicsStats`):
    the transform ('none' | 'signed_log' | 'quantile'), (x - mean) / std with non-finite results set to 0, then
    clipping to [-clip, clip] when clip > 0."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, transform: str = "none",
                 quantiles: Optional[torch.Tensor] = None, clip: float = 0.0):
        super().__init__()
        if transform not in RADIOMICS_TRANSFORMS:
            raise ValueError(f"radiomics transform must be one of {RADIOMICS_TRANSFORMS}, got {transform!r}")
        self.transform, self.clip = transform, float(clip)
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.register_buffer("quantiles", None if quantiles is None else quantiles.double())

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RadiomicsStandardizer":
        """From the export's `radiomics` entry (`RadiomicsStats.to_json`; older exports: mean and std only)."""
        quantiles = torch.tensor(d["quantiles"], dtype=torch.float64) if "quantiles" in d else None
        return cls(torch.tensor(d["mean"]), torch.tensor(d["std"]), d.get("transform", "none"), quantiles,
                   d.get("clip", 0.0))

    def forward(self, radiomics: torch.Tensor) -> torch.Tensor:
        x = radiomics
        if self.transform == "signed_log":
            x = x.double().sign() * x.double().abs().log1p()
        elif self.transform == "quantile":
            x = quantile_normal_scores(x, self.quantiles)
        z = torch.nan_to_num((x.float() - self.mean) / self.std, nan=0.0, posinf=0.0, neginf=0.0)
        return z.clamp(-self.clip, self.clip) if self.clip > 0 else z


class AutoRadLungTorch(nn.Module):
    """`forward(pixel_values [B,3,H,W] normalised, radiomics [B,F] raw) -> logits [B, C]`.

    logits[b, c] = logit_scale * cos(image feature of b, text feature of the class-c prompt built for b) (+ SigLIP's
    logit_bias). Radiomics are transformed and standardised with the training split's statistics (`standardize`, a
    `RadiomicsStandardizer`). The prompt learner reads them, or, with `condition_on='image'` (CoCoOp), the normalised
    image feature. `towers` is the family's `transformers` joint model (Aimv2Model, CLIPModel or SiglipModel).
    """

    def __init__(self, towers: nn.Module, prompt_learner: PromptLearner, *, pooling: str,
                 radiomics: RadiomicsStandardizer, config: Optional[dict[str, Any]] = None,
                 condition_on: str = "radiomics", family: str = DEFAULT_FAMILY):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if condition_on not in CONDITION_INPUTS:
            raise ValueError(f"condition_on must be one of {CONDITION_INPUTS}, got {condition_on!r}")
        if family not in TORCH_FAMILIES:
            raise ValueError(f"family must be one of {tuple(TORCH_FAMILIES)}, got {family!r}")
        self.towers, self.prompt_learner, self.pooling = towers, prompt_learner, pooling
        self.family, self.path = family, TORCH_FAMILIES[family]
        self.condition_on = condition_on
        self.config = config or {}
        self.standardize = radiomics

    @property
    def class_names(self) -> list[str]:
        """The class names of the export, in logit order (empty without an export config)."""
        return list(self.config.get("class_names", []))

    @classmethod
    def from_export(cls, path: str) -> "AutoRadLungTorch":
        """Loads an export folder written by `autorad_jax.export` (safetensors and JSON only)."""
        config = read_export_config(path)
        m = config["model"]
        family = m.get("family", DEFAULT_FAMILY)
        towers_dir = os.path.join(path, export_towers(family)[0])
        _check_safetensors(os.path.join(towers_dir, "model.safetensors"))
        towers, info = AutoModel.from_pretrained(towers_dir, output_loading_info=True, dtype=torch.float32)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise ExportFolderError(f"{towers_dir}: the {family} weights do not match their config.json: {bad}")
        tokens = config["tokenized_prompts"]
        condition_on = m.get("condition_on", "radiomics")
        image_width = (towers.config.projection_dim if TORCH_FAMILIES[family].image_projection
                       else towers.config.vision_config.hidden_size)
        ctx_start = m.get("ctx_start", 1)
        prompt_learner = PromptLearner(
            n_ctx=m["n_ctx"], width=towers.config.text_config.hidden_size, num_classes=len(tokens),
            length=len(tokens[0]), cond_dim=image_width if condition_on == "image"
            else len(config["radiomics"]["feature_names"]),
            meta_hidden_dim=m["meta_hidden_dim"], conditioning=m["conditioning"], ctx_start=ctx_start)
        weights = safetensors.torch.load_file(_check_safetensors(os.path.join(path, EXPORT_WEIGHTS)))
        try:
            prompt_learner.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ExportFolderError(f"{path}/{EXPORT_WEIGHTS} does not fit {EXPORT_CONFIG}: {e}") from e
        if prompt_learner.tokenized_prompts.tolist() != tokens:
            raise ExportFolderError(f"{path}: the tokenised prompts of {EXPORT_WEIGHTS} and {EXPORT_CONFIG} differ.")
        rows = towers.text_model.embeddings.token_embedding.weight[prompt_learner.tokenized_prompts.long()]
        prefix = prompt_learner.token_prefix
        if not ((prefix is None or torch.equal(rows[:, :ctx_start], prefix))
                and torch.equal(rows[:, ctx_start + m["n_ctx"]:], prompt_learner.token_suffix)):
            raise ExportFolderError(f"{path}: {STALE_PROMPT_EMBEDDINGS}")
        return cls(towers, prompt_learner, pooling=m["pooling"],
                   radiomics=RadiomicsStandardizer.from_json(config["radiomics"]), config=config,
                   condition_on=condition_on, family=family)

    def preprocess(self, views: torch.Tensor) -> torch.Tensor:
        """[B, S, S, 3] HU views -> [B, 3, H, W] normalised images: the steps of the export's
        `preprocessing["steps"]` (lung window, bilinear resize without antialiasing, AIMv2 normalisation)."""
        p = self.config["preprocessing"]
        lo, hi = p["window_hu"]
        x = ((views.float() - lo) / (hi - lo)).clamp(0.0, 1.0).permute(0, 3, 1, 2)
        size = int(p["image_size"])
        if tuple(x.shape[-2:]) != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        mean, std = (torch.tensor(p[k], dtype=x.dtype).view(1, -1, 1, 1) for k in ("image_mean", "image_std"))
        return (x - mean) / std

    def to_family_normalisation(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images normalised with the export's preprocessing mean and std, normalised as the family was trained."""
        if self.path.image_mean_std is None:
            return pixel_values
        p = self.config["preprocessing"]
        mean, std = (torch.tensor(p[k], dtype=pixel_values.dtype).view(1, -1, 1, 1) for k in ("image_mean", "image_std"))
        family_mean, family_std = self.path.image_mean_std
        return (pixel_values * std + mean - family_mean) / family_std

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) image features [B, P]: the tower's pooler (attention-pool head, class token) or
        the mean of tokens, then the family's image projection if it has one."""
        out = self.towers.vision_model(pixel_values=self.to_family_normalisation(pixel_values))
        pooled = out.pooler_output if self.pooling == "head" else out.last_hidden_state.mean(1)
        projection = self.path.image_projection
        return getattr(self.towers, projection)(pooled) if projection else pooled

    def text_features(self, prompts: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) class features [B, C, P] of prompt embeddings [B, C, L, D].

        AIMv2's and CLIP's text towers are causal and pool at the (first) EOS token of each class prompt; SigLIP's is
        bidirectional and pools at the last position of its fixed-length prompts.
        """
        b, c, length, d = prompts.shape
        text, path = self.towers.text_model, self.path
        hidden = text.embeddings(inputs_embeds=prompts.reshape(b * c, length, d))
        mask = None
        if path.causal_eos:
            mask = torch.full((length, length), -math.inf, dtype=hidden.dtype, device=hidden.device).triu(1)[None, None]
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        hidden = getattr(text, path.final_norm)(hidden).reshape(b, c, length, d)
        if path.causal_eos:
            eos = (self.prompt_learner.tokenized_prompts == text.config.eos_token_id).int().argmax(-1)  # [C]
        else:
            eos = torch.full((c,), length - 1, dtype=torch.long, device=hidden.device)
        pooled = hidden[:, torch.arange(c, device=hidden.device), eos]  # [B, C, D]
        return getattr(text if path.projection_in_text_model else self.towers, path.projection)(pooled)

    def forward(self, pixel_values: torch.Tensor, radiomics: torch.Tensor) -> torch.Tensor:
        image = nn.functional.normalize(self.image_features(pixel_values), dim=-1, eps=0.0)
        cond = image if self.condition_on == "image" else self.standardize(radiomics)
        text = self.text_features(self.prompt_learner(cond))
        text = nn.functional.normalize(text, dim=-1, eps=0.0).expand(image.shape[0], *text.shape[1:])
        log_scale = self.towers.logit_scale
        if self.path.clamp_scale:
            log_scale = log_scale.clamp(0.0, self.towers.max_log_logit_scale)
        logits = log_scale.exp() * torch.einsum("bp,bcp->bc", image, text)
        return logits + self.towers.logit_bias if self.path.logit_bias else logits


def _check_safetensors(file: str) -> str:
    """`file`, once its header and size check out; ExportFolderError naming a truncated or corrupt file."""
    try:
        with safetensors.safe_open(file, framework="pt"):
            pass
    except (OSError, safetensors.SafetensorError) as e:
        raise ExportFolderError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return file
