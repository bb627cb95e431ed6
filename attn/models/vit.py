"""Vision Transformer (Dosovitskiy et al. 2021) and attention rollout.

:class:`ViT`: images ``[B, H, W, C]`` -> patches (a strided convolution) ->
class token + positions -> :class:`~attn.models.transformer.TransformerEncoder`
-> logits. :func:`attention_rollout` (Abnar & Zuidema 2020) turns the sown
per-layer weights into a saliency map over patches.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import einsum, rearrange

from attn import positional as pe
from attn.models.transformer import TransformerConfig, TransformerEncoder, pool
from attn.modules.embeddings import normal_init

Array = jax.Array

VIT_POOLINGS = ("cls", "mean")


class ViT(nn.Module):
  """Vision Transformer classifier.

  Attributes:
    config: the encoder (:class:`~attn.models.transformer.TransformerConfig`;
      ``vocab_size``/``max_len`` unused). ``config.positional``:
      ``"learned"`` (a table per patch), ``"sinusoidal"`` (2-D: half the
      channels encode the row, half the column), ``"none"``, or a
      rotary/bias kind (``"rope"``, ``"alibi"``, ``"t5"``) applied over the
      flattened patch order. The class token has no position.
    num_classes: output classes.
    patch_size: side of the square patches; image sides must be multiples.
    pooling: ``"cls"`` (class token) or ``"mean"`` (over patches).
  """
  config: TransformerConfig
  num_classes: int
  patch_size: int = 4
  pooling: str = "cls"

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    """``images[B, H, W, C]`` -> float32 logits ``[B, num_classes]``.

    With ``mutable=["intermediates"]`` every layer sows its attention
    weights ``[B, N, 1 + h*w, 1 + h*w]`` (token 0 is the class token).
    """
    if self.pooling not in VIT_POOLINGS:
      raise ValueError(f"unknown pooling {self.pooling!r}; choose from "
                       f"{VIT_POOLINGS}")
    cfg = self.config
    B, H, W, _ = images.shape
    p = self.patch_size
    if H % p or W % p:
      raise ValueError(f"image size {H}x{W} is not a multiple of "
                       f"patch_size={p}")
    x = nn.Conv(cfg.emb_dim, (p, p), strides=(p, p), padding="VALID",
                dtype=cfg.dtype, name="patch_embedding")(images)
    h, w = x.shape[1], x.shape[2]
    x = rearrange(x, "b h w d -> b (h w) d")
    kind = pe.positional_kind(cfg.positional)
    if cfg.positional == "learned":
      x = x + self.param("pos_embedding", normal_init(0.02),
                         (h * w, cfg.emb_dim)).astype(x.dtype)
    elif kind == "absolute":
      x = x + pe.sinusoidal_2d(h, w, cfg.emb_dim).astype(x.dtype)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.emb_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, cfg.emb_dim))
                         .astype(x.dtype), x], axis=1)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    encoder_config = cfg.replace(
        positional=cfg.positional if kind in ("rotary", "bias") else "none")
    x = TransformerEncoder(encoder_config, name="encoder")(
        x, deterministic=not train)
    if self.pooling == "cls":
      pooled = x[:, 0]
    else:
      pooled = pool(x[:, 1:], jnp.ones((B, h * w), bool), "mean")
    logits = nn.Dense(self.num_classes, dtype=cfg.dtype, name="head")(pooled)
    return logits.astype(jnp.float32)


def attention_rollout(weights: Sequence[Array], *,
                      head_fusion: str = "mean",
                      residual: bool = True) -> Array:
  """Attention rollout (Abnar & Zuidema 2020): attention flow through layers.

  Each layer's heads are fused into ``A_l[B, T, T]``; with ``residual`` the
  skip connection is modelled as ``0.5 A_l + 0.5 I``, rows renormalised to
  sum to one; the rollout is ``Ã_L ··· Ã_2 Ã_1``.

  Args:
    weights: per-layer weights ``[B, N, T, T]``, first layer first (e.g.
      ``[w for _, w in attention_weights(intermediates)]``).
    head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
    residual: add the identity for the residual connection.

  Returns:
    float32 ``[B, T, T]``: row ``t`` says how much each input token flows
    into output token ``t``.
  """
  fusions = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}
  if head_fusion not in fusions:
    raise ValueError(f"unknown head_fusion {head_fusion!r}; choose from "
                     f"{sorted(fusions)}")
  if not weights:
    raise ValueError("attention_rollout needs at least one layer of weights")
  rollout = None
  for w_BNTT in weights:
    a_BTT = fusions[head_fusion](jnp.asarray(w_BNTT, jnp.float32), axis=1)
    if residual:
      a_BTT = 0.5 * a_BTT + 0.5 * jnp.eye(a_BTT.shape[-1])
    rows = jnp.sum(a_BTT, axis=-1, keepdims=True)
    a_BTT = a_BTT / jnp.where(rows == 0, 1.0, rows)
    rollout = a_BTT if rollout is None else einsum(
        a_BTT, rollout, "b t s, b s u -> b t u")
  return rollout


def cls_saliency(rollout: Array, grid: tuple[int, int]) -> Array:
  """Class-token row of a rollout as a patch map.

  ``rollout[B, 1 + h*w, 1 + h*w]`` -> ``[B, h, w]`` (how much each patch
  flows into the class token).
  """
  h, w = grid
  if rollout.shape[-1] != 1 + h * w:
    raise ValueError(f"rollout over {rollout.shape[-1]} tokens does not "
                     f"match 1 class token + {h}x{w} patches")
  return rearrange(rollout[:, 0, 1:], "b (h w) -> b h w", h=h, w=w)
