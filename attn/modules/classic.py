"""Single-head attention with the classic score functions.

These modules own the parameters of the scores in :mod:`attn.scores` and
call :func:`attn.scores.score_attention` for one head:

* :class:`AdditiveAttention` — Bahdanau et al. 2015, ``vᵀ tanh(W_q q + W_k k)``.
* :class:`LuongAttention` — Luong et al. 2015: ``dot``, ``general``,
  ``concat`` (= additive) or ``location`` scores; ``global`` or ``local_p``
  (predicted centre ``p_t``, Gaussian window) alignment.
* :class:`GlimpseAttention` — a learned query per context id attends over a
  sequence; the weighted sum (the glimpse) goes through a ``Dense`` layer.

Shapes: queries ``[B, T, Dq]``, keys ``[B, S, Dk]``, values ``[B, S, Dv]``,
masks boolean (True = may attend) broadcastable to ``[B, T, S]``. Each
returns ``(context[B, T, Dv], weights[B, T, S])`` and sows the weights as
``intermediates/attention_weights``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import scores as scores_lib
from attn.masks import masked_softmax
from attn.kernels.local_p import predicted_centres
from attn.modules.embeddings import Embed, normal_init

Array = jax.Array

# Luong's names for the scores he compares; "concat" is Bahdanau's additive;
# "uniform" (no attention: the mean of the source states) is the baseline.
LUONG_SCORES = {"dot": "dot", "general": "general", "concat": "additive",
                "location": "location", "uniform": "uniform"}
LUONG_MODES = ("global", "local_p")


def score_params(module: nn.Module, score: str, q_dim: int, k_dim: int, *,
                 attention_dim: Optional[int] = None,
                 max_length: Optional[int] = None) -> dict:
  """Creates the parameters of ``score`` on ``module``; returns its kwargs.

  Args:
    module: the (compact) module that owns the parameters.
    score: a name in :data:`attn.scores.SCORES`.
    q_dim / k_dim: query and key feature widths.
    attention_dim: hidden width of the additive score (default ``k_dim``).
    max_length: maximum number of keys (``location`` score only).

  Raises:
    ValueError: unknown score, dot score with ``q_dim != k_dim``, or a
      location score without ``max_length``.
  """
  scores_lib.get_score(score)
  init = nn.initializers.lecun_normal()
  if score in ("dot", "scaled_dot") and q_dim != k_dim:
    raise ValueError(f"{score!r} score needs query and key widths to match, "
                     f"got {q_dim} and {k_dim}; use 'general' or 'additive'")
  if score == "general":
    # std 1/√(q_dim·k_dim): with unit-variance queries and keys the logits
    # q W kᵀ start with unit variance, as the scaled dot product's do
    # (LeCun's 1/√q_dim would start them √k_dim times sharper).
    w_init = normal_init(1.0 / np.sqrt(q_dim * k_dim))
    return {"w_HK": module.param("w", w_init, (q_dim, k_dim))}
  if score == "additive":
    a = attention_dim or k_dim
    return {"w_q_HA": module.param("w_q", init, (q_dim, a)),
            "w_k_KA": module.param("w_k", init, (k_dim, a)),
            "v_A": module.param("v", normal_init(1.0 / np.sqrt(a)),
                                (a,))}
  if score == "location":
    if max_length is None:
      raise ValueError("the 'location' score needs max_length (the longest "
                       "key sequence)")
    return {"w_HL": module.param("w", init, (q_dim, max_length))}
  if score == "cosine":
    # The sharpness is learned as log β from β = 1: the softmax starts flat
    # (a sharp start locks glimpses onto wrong tokens) and log β lets Adam
    # change the sharpness by factors once the directions are right.
    log_beta = module.param("log_beta", nn.initializers.zeros, ())
    return {"beta": jnp.exp(log_beta)}
  return {}


def one_head_attention(score: str, query: Array, keys: Array, values: Array,
                       mask: Optional[Array], **params):
  """``score_attention`` for 3-D inputs: ``(context[B,T,Dv], w[B,T,S])``."""
  B, T, S = query.shape[0], query.shape[1], keys.shape[1]
  mask4 = None
  if mask is not None:
    mask4 = jnp.broadcast_to(mask, (B, T, S))[:, None]
  out, weights = scores_lib.score_attention(
      score, query[:, :, None], keys[:, :, None], values[:, :, None], mask4,
      **params)
  return out[:, :, 0], weights[:, 0]


class AdditiveAttention(nn.Module):
  """Bahdanau (additive) attention, ``softmax(vᵀ tanh(W_q q + W_k k)) v``.

  Attributes:
    attention_dim: width ``A`` of the hidden layer (default: key width).
  """
  attention_dim: Optional[int] = None

  @nn.compact
  def __call__(self, query: Array, keys: Array,
               values: Optional[Array] = None,
               mask: Optional[Array] = None):
    """``query[B,T,Dq]``, ``keys[B,S,Dk]``, ``values[B,S,Dv]`` (default keys).

    Returns ``(context[B, T, Dv], weights[B, T, S])``.
    """
    values = keys if values is None else values
    params = score_params(self, "additive", query.shape[-1], keys.shape[-1],
                          attention_dim=self.attention_dim)
    context, weights = one_head_attention("additive", query, keys, values,
                                          mask, **params)
    self.sow("intermediates", "attention_weights", weights)
    return context, weights


class LuongAttention(nn.Module):
  """Luong attention: global or local-predictive, four score functions.

  Attributes:
    score: ``"dot"``, ``"general"``, ``"concat"`` or ``"location"``.
    mode: ``"global"`` (all source positions) or ``"local_p"``: a centre
      ``p_t = L_t · sigmoid(v_pᵀ tanh(W_pᵀ h_t))`` is predicted from the
      query (``L_t`` = number of attendable keys, so key padding must be a
      suffix), the softmax runs over ``|s - p_t| <= window`` and the weights
      are multiplied by ``exp(-(s - p_t)² / (2 σ²))``, ``σ = window / 2``
      (they then sum to less than one, as in the paper).
    window: half-width ``D`` of the local window.
    attention_dim: hidden width of the ``concat`` score and of the ``p_t``
      predictor (default: key width).
    max_length: longest source (``location`` score only).
  """
  score: str = "general"
  mode: str = "global"
  window: int = 4
  attention_dim: Optional[int] = None
  max_length: Optional[int] = None

  @nn.compact
  def __call__(self, query: Array, keys: Array,
               values: Optional[Array] = None,
               mask: Optional[Array] = None):
    """``query[B,T,Dq]``, ``keys[B,S,Dk]``, ``values[B,S,Dv]`` (default keys).

    Returns ``(context[B, T, Dv], weights[B, T, S])``.
    """
    if self.score not in LUONG_SCORES:
      raise ValueError(f"unknown Luong score {self.score!r}; choose from "
                       f"{sorted(LUONG_SCORES)}")
    if self.mode not in LUONG_MODES:
      raise ValueError(f"unknown Luong mode {self.mode!r}; choose from "
                       f"{LUONG_MODES}")
    values = keys if values is None else values
    B, T, S = query.shape[0], query.shape[1], keys.shape[1]
    score = LUONG_SCORES[self.score]
    params = score_params(self, score, query.shape[-1], keys.shape[-1],
                          attention_dim=self.attention_dim,
                          max_length=self.max_length)
    if self.mode == "global":
      context, weights = one_head_attention(score, query, keys, values, mask,
                                            **params)
    else:
      valid_BTS = (jnp.ones((B, T, S), bool) if mask is None
                   else jnp.broadcast_to(mask, (B, T, S)))
      centre_BT = self._predict_centre(query, valid_BTS)
      dist_BTS = jnp.arange(S, dtype=jnp.float32) - centre_BT[..., None]
      in_window = valid_BTS & (jnp.abs(dist_BTS) <= self.window)
      score_fn = functools.partial(scores_lib.get_score(score), **params)
      align = masked_softmax(jax.vmap(score_fn)(query, keys), in_window)
      sigma = self.window / 2.0
      weights = align * jnp.exp(-jnp.square(dist_BTS) / (2.0 * sigma ** 2))
      context = jnp.einsum("bts,bsd->btd", weights,
                           values.astype(jnp.float32)).astype(values.dtype)
    self.sow("intermediates", "attention_weights", weights)
    return context, weights

  def _predict_centre(self, query: Array, valid_BTS: Array) -> Array:
    """``p_t`` in ``[0, L_t]``, float32 ``[B, T]`` (same formula and
    parameters as the ``local_p`` kernel)."""
    a = self.attention_dim or query.shape[-1]
    w_p = self.param("w_p", nn.initializers.lecun_normal(),
                     (query.shape[-1], a))
    v_p = self.param("v_p", normal_init(a ** -0.5), (a,))
    length_BT = jnp.sum(valid_BTS, axis=-1).astype(jnp.float32)
    return jax.vmap(predicted_centres, in_axes=(0, None, None, 0))(
        query, w_p, v_p, length_BT)


class GlimpseAttention(nn.Module):
  """A learned query per context id takes a glimpse of a sequence.

  ``q = Embed(context_id)``; ``w = softmax(score(q, inputs))``;
  ``glimpse = Σ_s w_s inputs_s``; ``output = Dense(glimpse)``.

  Attributes:
    num_contexts: number of context ids (size of the query table).
    features: output width.
    score: any name in :data:`attn.scores.SCORES`.
    attention_dim: hidden width of the additive score.
    max_length: longest input (``location`` score only).
  """
  num_contexts: int
  features: int
  score: str = "scaled_dot"
  attention_dim: Optional[int] = None
  max_length: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, context_ids: Array,
               mask: Optional[Array] = None):
    """``inputs[B, S, D]``, ``context_ids`` int ``[B]``, ``mask`` ``[B, S]``.

    Returns ``(output[B, features], weights[B, S])``.
    """
    D = inputs.shape[-1]
    query_B1D = Embed(self.num_contexts, D, name="query")(context_ids)[:, None]
    params = score_params(self, self.score, D, D,
                          attention_dim=self.attention_dim,
                          max_length=self.max_length)
    key_mask = None if mask is None else mask[:, None, :]
    glimpse, weights = one_head_attention(self.score, query_B1D, inputs,
                                          inputs, key_mask, **params)
    self.sow("intermediates", "attention_weights", weights)
    out = nn.Dense(self.features, dtype=self.dtype, name="out")(glimpse[:, 0])
    return out, weights[:, 0]
