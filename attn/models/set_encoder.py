"""Set encoder: per-element scores from a Transformer encoder.

:class:`SetEncoder` maps a set of feature vectors ``[B, M, F]`` to one score
per element ``[B, M]`` (e.g. "which element is the odd one out"). With
``config.positional="none"`` it is permutation-equivariant: permuting the set
permutes the scores. Any other positional encoding makes the element order
matter.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.models.transformer import TransformerConfig, TransformerEncoder
from attn.modules import PositionalEmbedding

Array = jax.Array


class SetEncoder(nn.Module):
  """``Dense(emb_dim)`` -> positions -> Transformer encoder -> ``Dense(1)``.

  ``config`` is a :class:`~attn.models.transformer.TransformerConfig`
  (``vocab_size``/``max_len`` unused: positions cover the set size).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BMF: Array, train: bool = False) -> Array:
    """``x[B, M, F]`` -> float32 scores ``[B, M]``."""
    cfg = self.config
    x = nn.Dense(cfg.emb_dim, dtype=cfg.dtype)(x_BMF)
    x = PositionalEmbedding(cfg.positional, x_BMF.shape[1], dtype=cfg.dtype,
                            name="positional")(x)
    x = TransformerEncoder(cfg)(x, deterministic=not train)
    return nn.Dense(1, dtype=cfg.dtype)(x)[..., 0].astype(jnp.float32)
