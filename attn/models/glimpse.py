"""Glimpse classifier: embed tokens, take one glimpse, classify.

:class:`GlimpseNet` embeds a token sequence, lets a learned query per
context id take one single-head glimpse of it
(:class:`~attn.modules.GlimpseAttention`, any score in
:data:`attn.scores.SCORES`) and classifies the glimpse. It returns the
glimpse weights too, so a caller can measure where it looked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.modules import GlimpseAttention
from attn.modules.embeddings import Embed

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GlimpseConfig:
  """Everything :class:`GlimpseNet` needs.

  Attributes:
    vocab_size: input token ids (0 = padding, never attended to).
    num_contexts: context ids, one learned query each.
    num_classes: output classes.
    emb_dim: token embedding width.
    score: score function name (:data:`attn.scores.SCORES`).
    max_len: longest input (the ``location`` score).
    dtype: activation dtype of the output layer.
  """
  vocab_size: int
  num_contexts: int
  num_classes: int
  emb_dim: int = 32
  score: str = "additive"
  max_len: int = 256
  dtype: Any = jnp.float32

  def replace(self, **changes) -> "GlimpseConfig":
    """A copy with ``changes`` (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)


class GlimpseNet(nn.Module):
  """Embed tokens, take one glimpse with a context-id query, classify."""
  config: GlimpseConfig

  @nn.compact
  def __call__(self, tokens: Array, context: Array) -> tuple[Array, Array]:
    """int ``tokens[B, S]``, int ``context[B]`` -> ``(logits[B, C],
    weights[B, S])``."""
    cfg = self.config
    x = Embed(cfg.vocab_size, cfg.emb_dim)(tokens)
    return GlimpseAttention(cfg.num_contexts, cfg.num_classes,
                            score=cfg.score, max_length=cfg.max_len,
                            dtype=cfg.dtype)(x, context, mask=tokens != 0)
