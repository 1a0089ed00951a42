"""Conditioned prompt learner (CoCoOp's `PromptLearner`; AutoRad-Lung conditions it on radiomics, CoCoOp on images).

For each class the text tower reads `[SOS][ctx_1 .. ctx_n][class words][.][EOS]` (SigLIP's tokenizer adds no SOS: its
prompts start with the context and keep their padding). The context vectors `ctx` are
learned; the meta-network `meta_net` (linear1 -> ReLU -> linear2) maps a sample's conditioning vector (its standardised
radiomic features, or its L2-normalised image feature for CoCoOp) to a shift of the context: one shift for all context
tokens (`conditioning='shared'`, CoCoOp) or one per token (`'per_token'`). Without a meta-network
(`conditioning=None`) this is CoOp: one context for every sample; with a fixed context as well (`learn_ctx=False`) it
is the zero-shot prompt "a CT scan of a <class>.".

`token_prefix` (SOS; None where the prompts have none) and `token_suffix` (class words, '.', EOS, padding) are constant embeddings taken from the frozen token
table at construction, and again (`embed_tokens`) when pretrained towers are loaded into the built model. The
prompts' token ids (`PromptTokens`, cut after the last EOS: ~15 of the tower's 77 positions) are computed outside the
model, by `autorad_jax.modeling`, and saved with it (for SigLIP: its fixed length of 64).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autorad_jax.errors import ConfigError
from autorad_jax.models.spec import PromptTokens

Array = jax.Array
CONDITIONINGS = ("shared", "per_token")


class PromptBuffer(nnx.Variable):
    """A constant of the prompt (token ids, fixed token embeddings): saved with the model, never trained."""


def _partitioned(init, names: tuple):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class MetaNet(nnx.Module):
    """`linear2(relu(linear1(x)))`: conditioning vectors [B, in_dim] -> context shift [B, out_dim]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.linear1 = nnx.Linear(in_dim, hidden_dim, **kw,
                                  kernel_init=_partitioned(nnx.initializers.lecun_normal(), (None, None)),
                                  bias_init=_partitioned(nnx.initializers.zeros_init(), (None,)))
        self.linear2 = nnx.Linear(hidden_dim, out_dim, **kw,
                                  kernel_init=_partitioned(nnx.initializers.lecun_normal(), (None, "embed")),
                                  bias_init=_partitioned(nnx.initializers.zeros_init(), ("embed",)))

    def __call__(self, x: Array) -> Array:
        return self.linear2(jax.nn.relu(self.linear1(x)))


def token_embeddings(tokens: PromptTokens, token_embedding: Array) -> tuple[Array, Array, Array]:
    """The class prompts' rows of the token table [V, D], in float32: (the ctx_init phrase [n_ctx, D], the SOS
    [C, s, D] (s = ctx_start, 1 or 0), the class words, '.', EOS and padding [C, L - s - n_ctx, D])."""
    embedding = token_embedding[np.asarray(tokens.ids, np.int32)].astype(np.float32)  # [C, L, D]; numpy in, numpy out
    start, end = tokens.ctx_start, tokens.ctx_start + tokens.n_ctx
    return embedding[0, start:end], embedding[:, :start], embedding[:, end:]


class PromptLearner(nnx.Module):
    """Learnable context + meta-network; builds the per-sample class prompts as text-tower input embeddings.

    Args:
        tokens: the class prompts' token ids [C, L], the context length n_ctx and how the context starts.
        token_embedding: the frozen text tower's token table [vocab, width].
        cond_dim: width of the meta-network's input (radiomic feature count F, or the image feature width P).
        meta_hidden_dim: hidden width of the meta-network.
        conditioning: 'shared' | 'per_token' | None (CoOp: no meta-network).
        learn_ctx: False keeps the context fixed (a `PromptBuffer`, not a parameter): zero-shot prompts.
    """

    def __init__(self, *, tokens: PromptTokens, token_embedding: Array, cond_dim: int, meta_hidden_dim: int,
                 conditioning: Optional[str], learn_ctx: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        if conditioning is not None and conditioning not in CONDITIONINGS:
            raise ConfigError(f"conditioning must be one of {CONDITIONINGS} or None, got {conditioning!r}")
        n_ctx, width = tokens.n_ctx, token_embedding.shape[-1]
        phrase, prefix, suffix = token_embeddings(tokens, token_embedding)

        self.n_ctx = n_ctx
        self.ctx_start = tokens.ctx_start
        self.conditioning = conditioning
        self.dtype = dtype
        ctx = (phrase if tokens.ctx_from_tokens
               else nnx.initializers.normal(0.02)(rngs.params(), (n_ctx, width), jnp.float32))
        self.ctx = (nnx.Param if learn_ctx else PromptBuffer)(ctx, out_sharding=(None, "embed"), eager_sharding=False)
        out_dim = width if conditioning == "shared" else n_ctx * width
        self.meta_net = (MetaNet(cond_dim, meta_hidden_dim, out_dim, dtype=dtype, rngs=rngs)
                         if conditioning is not None else None)
        self.tokenized_prompts = PromptBuffer(jnp.asarray(tokens.ids, jnp.int32), out_sharding=(None, None),
                                              eager_sharding=False)
        # Checkpoints hold no empty arrays: prompts without SOS (SigLIP's) have no prefix at all.
        self.token_prefix = (PromptBuffer(prefix, out_sharding=(None, None, "embed"), eager_sharding=False)
                             if tokens.ctx_start else None)
        self.token_suffix = PromptBuffer(suffix, out_sharding=(None, None, "embed"), eager_sharding=False)

    def embed_tokens(self, tokens: PromptTokens, token_embedding: Array) -> None:
        """Takes the fixed embeddings, and the contexts of a ctx_init phrase, from the token table `token_embedding`
        [V, D] anew: a model built with random towers and then given pretrained ones reads its prompts through the
        pretrained table."""
        phrase, prefix, suffix = token_embeddings(tokens, token_embedding)
        if self.token_prefix is not None:
            self.token_prefix.set_value(prefix)
        self.token_suffix.set_value(suffix)
        if tokens.ctx_from_tokens:
            self.ctx.set_value(phrase)

    def embeds_with(self, token_embedding: Array) -> bool:
        """True when the fixed embeddings (SOS, class words, '.', EOS) are the rows of `token_embedding` [V, D] for
        the prompts' token ids, as they are for the frozen text tower's own table."""
        tokens = PromptTokens(ids=self.tokenized_prompts.get_value(), n_ctx=self.n_ctx, ctx_from_tokens=False,
                              ctx_start=self.ctx_start)
        _, prefix, suffix = token_embeddings(tokens, np.asarray(token_embedding))  # numpy: no op to compile
        own_prefix = prefix if self.token_prefix is None else self.token_prefix.get_value()
        return np.array_equal(prefix, own_prefix) and np.array_equal(suffix, self.token_suffix.get_value())

    @property
    def num_classes(self) -> int:
        """Number of class prompts C."""
        return self.tokenized_prompts.shape[0]

    def context(self, cond: Array) -> Array:
        """Context per sample [B, n_ctx, width] (CoOp: [1, n_ctx, width], shared by all samples)."""
        ctx = self.ctx[...].astype(self.dtype)[None]
        if self.meta_net is None:
            return ctx
        shift = self.meta_net(cond.astype(self.dtype))
        shift = shift.reshape(shift.shape[0], -1, ctx.shape[-1])  # [B, 1 or n_ctx, width]
        return ctx + shift

    def construct_prompts(self, ctx: Array) -> Array:
        """`[prefix | ctx | suffix]` for every sample and class: ctx [B, n_ctx, D] -> prompts [B, C, L, D]."""
        b, c = ctx.shape[0], self.num_classes
        fixed = lambda buffer: jnp.broadcast_to(buffer[...].astype(ctx.dtype)[None], (b, *buffer.shape))
        ctx = jnp.broadcast_to(ctx[:, None], (b, c, *ctx.shape[1:]))
        prefix = [] if self.token_prefix is None else [fixed(self.token_prefix)]
        return jnp.concatenate([*prefix, ctx, fixed(self.token_suffix)], axis=2)

    def __call__(self, cond: Array) -> Array:
        """Prompt embeddings [B, C, L, D] of conditioning vectors [B, cond_dim] ([1, C, L, D] without meta-network)."""
        return self.construct_prompts(self.context(cond))

