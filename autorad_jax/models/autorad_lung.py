"""AutoRad-Lung: an image feature matched by cosine against radiomics-conditioned class prompts.

    image  -> vision tower -> pooled (the tower's pooler: AIMv2's attention-pool head, CLIP's class token, SigLIP's
              attention-pool head; or the mean of tokens) -> the family's image projection, if any -> f_img [B, P]
    radiomics -> PromptLearner -> prompts [B, C, L, D] -> frozen text tower (pooled at EOS, or at the last position
              for SigLIP) -> its projection or head -> f_txt [B, C, P]
    logits[b, c] = logit_scale * cos(f_img[b], f_txt[b, c]) (+ logit_bias for SigLIP)

The towers are those of one family (AIMv2, CLIP, SigLIP; see `autorad_jax.models.families`), held under the family's
name (`model.aimv2`, `model.clip`, `model.siglip`) and reached as `model.towers`. The logits keep the family's learned
scale (and SigLIP's bias) and go into a softmax cross-entropy over the classes: SigLIP's towers were trained with a
per-pair sigmoid, but scaled cosines are what the softmax reads in CLIP's and AIMv2-LiT's losses too, and the bias,
one constant over the classes, leaves the softmax unchanged.

Memory of the text path: every sample has its own C class prompts, so the text tower encodes N = B x C sequences
(N = C for CoOp, whose prompts do not depend on the sample) of L tokens (the prompt up to its EOS, ~15) at width D; each
of its layers holds activations of N x L x D (x intermediate_size / D in the MLP, plus N x heads x L x L attention
weights), and training keeps them for every layer for the backward pass. `prompt_chunk_size = k > 0` bounds this: the
tower runs over ceil(N / k) chunks of k sequences one after another (`jax.lax.map`), each chunk rematerialised in the
backward pass (`jax.checkpoint`), so only one chunk's activations (k x L x D per layer) are live at once, on top of the
N x L x D prompt embeddings themselves. Chunking changes memory and speed, never the result.

CoCoOp (`condition_on='image'`) feeds the prompt learner the L2-normalised f_img in place of the radiomics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from autorad_jax.errors import ConfigError
from autorad_jax.models import families
from autorad_jax.models.prompt_learner import PromptLearner

Array = jax.Array
POOLINGS = ("head", "mean")
CONDITION_INPUTS = ("radiomics", "image")  # what the prompt learner's meta-network reads


def l2_normalize(x: Array) -> Array:
    """x / ||x|| along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def vision_scan_split(model_config, num_layers: int) -> int:
    """First vision block that trains with config.model.trainable='last_k' (its scanned stack splits there), else 0."""
    return num_layers - model_config.trainable_last_k if model_config.trainable == "last_k" else 0


def tower_options(model_config) -> dict[str, Any]:
    """Constructor options of the towers from config.model: compute dtype, attention kernel, rematerialisation,
    unrolled or scanned blocks."""
    if model_config.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.model.remat must be one of {tuple(REMAT_POLICIES)}, got {model_config.remat!r}")
    return dict(dtype=jnp.dtype(model_config.dtype), attention_implementation=model_config.attention_implementation or None,
                remat=model_config.remat != "none", remat_policy=REMAT_POLICIES[model_config.remat],
                scan_layers=bool(model_config.scan_layers))


def build_towers(model_config, towers, *, rngs: nnx.Rngs) -> nnx.Module:
    """The joint image-text model of `towers` (a family's joint config), random-init, with config.model's compute
    options."""
    split = vision_scan_split(model_config, towers.vision_config.num_hidden_layers)
    return families.of_config(towers).joint_model(towers, rngs=rngs, scan_split=split, **tower_options(model_config))


def pooled_image_features(vision_model, images: Array, pooling: str, image_size: int | None = None) -> Array:
    """Vision tower output pooled by the attention-pool head ('head', when the tower has one) or token mean ('mean');
    `images` (normalised by the pipeline) normalised as the tower's family was trained and resized to `image_size`
    first when given."""
    out = vision_model(families.to_family_normalisation(images, vision_model.config), image_size)
    return out.pooler_output if pooling == "head" else jnp.mean(out.last_hidden_state, axis=1)


class AutoRadLung(nnx.Module):
    """A family's joint towers + prompt learner. `__call__(images [B,H,W,3], radiomics [B,F]) -> (logits [B, C], aux)`; with
    `image_size`, the images are resized to it first (in the vision tower's patch convolution where it can).

    `aux`: `image_features` [B, P] and `text_features` [B, C, P] (both L2-normalised), `logit_scale` (scalar).
    A prompt learner without a meta-network gives CoOp; `condition_on='image'` gives CoCoOp.
    """

    def __init__(self, towers: nnx.Module, prompt_learner: PromptLearner, *, pooling: str = "head",
                 prompt_chunk_size: int = 0, condition_on: str = "radiomics"):
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if condition_on not in CONDITION_INPUTS:
            raise ConfigError(f"condition_on must be one of {CONDITION_INPUTS}, got {condition_on!r}")
        self.condition_on = condition_on
        self.family = families.of_config(towers.config).name
        setattr(self, self.family, towers)  # the name in the state and checkpoints: aimv2, clip or siglip
        self.prompt_learner = prompt_learner
        self.pooling = pooling
        self.prompt_chunk_size = int(prompt_chunk_size)

    @property
    def towers(self) -> nnx.Module:
        """The joint image-text model of the family."""
        return getattr(self, self.family)

    def image_features(self, images: Array, image_size: int | None = None) -> Array:
        """Projected (not normalised) image features [B, P]."""
        return self.towers.project_image(
            pooled_image_features(self.towers.vision_model, images, self.pooling, image_size))

    def text_features(self, prompts: Array) -> Array:
        """Projected (not normalised) class features [B, C, P] of prompt embeddings [B, C, L, D]."""
        b, c, length, d = prompts.shape
        ids = jnp.broadcast_to(self.prompt_learner.tokenized_prompts[...][None], (b, c, length))
        feats = self._encode_text(prompts.reshape(b * c, length, d), ids.reshape(b * c, length))
        return feats.reshape(b, c, -1)

    def _encode_text(self, embeds: Array, ids: Array) -> Array:
        n, length, d = embeds.shape
        k = self.prompt_chunk_size
        if k <= 0 or n <= k:
            return self.towers.get_text_features(ids, inputs_embeds=embeds)
        graphdef, state = nnx.split(self.towers)

        def encode(chunk: tuple[Array, Array]) -> Array:
            chunk_embeds, chunk_ids = chunk
            return nnx.merge(graphdef, state).get_text_features(chunk_ids, inputs_embeds=chunk_embeds)

        pad = -n % k  # padded rows are encoded and dropped
        embeds = jnp.pad(embeds, ((0, pad), (0, 0), (0, 0))).reshape(-1, k, length, d)
        ids = jnp.pad(ids, ((0, pad), (0, 0)), mode="edge").reshape(-1, k, length)
        feats = jax.lax.map(jax.checkpoint(encode), (embeds, ids))
        return feats.reshape(n + pad, -1)[:n]

    def __call__(self, images: Array, radiomics: Array, *, train: bool = False,
                 image_size: int | None = None) -> tuple[Array, dict[str, Any]]:
        del train  # no dropout or batch statistics
        image = l2_normalize(self.image_features(images, image_size))
        cond = image if self.condition_on == "image" else radiomics
        text = l2_normalize(self.text_features(self.prompt_learner(cond)))
        text = jnp.broadcast_to(text, (image.shape[0], *text.shape[1:]))  # CoOp: one set of class features
        scale = self.towers.logit_scale_value()
        logits = scale * jnp.einsum("bp,bcp->bc", image, text) + self.towers.logit_bias_value()
        return logits, {"image_features": image, "text_features": text, "logit_scale": scale}
