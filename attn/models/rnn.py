"""RNN encoder–decoder with attention (Bahdanau et al. 2015; Luong et al. 2015).

A bidirectional GRU reads the source; its states, projected to
``hidden_dim``, are the memory the decoder attends to. The decoder is a GRU:

* ``style="bahdanau"``: at step ``i`` the previous state ``s_{i-1}`` queries
  the memory; the context ``c_i`` is fed into the GRU with the previous
  target token, and ``[s_i; c_i; y_{i-1}]`` predicts the next token
  (a ``nn.scan`` over target positions).
* ``style="luong"``: the GRU runs over the targets first; each state ``h_t``
  queries the memory and ``tanh(W_c [c_t; h_t])`` predicts the next token
  (global/local-p attention without input feeding, so attention over all
  steps is one batched call).

``attention`` picks the mechanism: ``"additive"`` (Bahdanau),
``"dot"``/``"general"``/``"concat"``/``"location"`` (Luong scores, global or
``luong_mode="local_p"``), or any registry spec (``"softmax"``,
``"performer(num_features=16)"``...) used as single-head cross-attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import positional as pe
from attn import registry
from attn.modules import (AdditiveAttention, LuongAttention,
                          MultiHeadAttention, PositionalEmbedding)
from attn.modules.classic import LUONG_SCORES
from attn.modules.embeddings import Embed

Array = jax.Array

RNN_STYLES = ("bahdanau", "luong")


@dataclasses.dataclass(frozen=True)
class RNNConfig:
  """Everything :class:`RNNSeq2Seq` and its parts need.

  Attributes:
    vocab_size / output_vocab_size (default ``vocab_size``): token ids.
    emb_dim / hidden_dim: embedding and GRU widths.
    style: ``"bahdanau"`` or ``"luong"`` (see the module docstring).
    attention: ``"additive"``, ``"dot"``, ``"general"``, ``"concat"``,
      ``"location"`` or a registry spec (single-head cross-attention).
    luong_mode / window: global or local-p Luong alignment (half-width).
    positional: ``"none"`` (the RNN knows the order), ``"sinusoidal"`` or
      ``"learned"`` (added to both embeddings). Rotary/bias kinds raise.
    max_len: longest sequence (learned positions, ``location`` score).
    dropout_rate: on embeddings and on the pre-output layer.
    dtype: activation dtype.
  """
  vocab_size: int
  output_vocab_size: Optional[int] = None
  emb_dim: int = 32
  hidden_dim: int = 32
  style: str = "bahdanau"
  attention: str = "additive"
  luong_mode: str = "global"
  window: int = 4
  positional: str = "none"
  max_len: int = 256
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.attention == "additive" or self.attention in LUONG_SCORES:
      return
    try:
      registry.get_attention(self.attention)
    except ValueError as e:
      raise ValueError(
          f"RNN attention {self.attention!r} is neither 'additive', a Luong "
          f"score ({', '.join(LUONG_SCORES)}) nor an attention spec: {e}"
      ) from None

  def replace(self, **changes) -> "RNNConfig":
    """A copy with ``changes`` (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)


class SourceAttention(nn.Module):
  """Decoder-to-memory attention: ``query[B, T, H]``, ``memory[B, S, H]``.

  Reads ``attention``, ``luong_mode``, ``window`` and (for the Luong
  ``location`` score) ``max_len`` from ``config``.
  """
  config: RNNConfig

  @nn.compact
  def __call__(self, query: Array, memory: Array,
               padding_mask: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """Context ``[B, T, H]``; ``padding_mask[B, S]`` True = real source."""
    cfg = self.config
    if cfg.attention == "additive":
      return AdditiveAttention(name="additive")(
          query, memory, mask=None if padding_mask is None
          else padding_mask[:, None, :])[0]
    if cfg.attention in LUONG_SCORES:
      return LuongAttention(
          score=cfg.attention, mode=cfg.luong_mode, window=cfg.window,
          max_length=cfg.max_len if cfg.attention == "location" else None,
          name="luong")(
              query, memory, mask=None if padding_mask is None
              else padding_mask[:, None, :])[0]
    return MultiHeadAttention(num_heads=1, attention=cfg.attention,
                              name="attention")(
                                  query, memory, mask=None
                                  if padding_mask is None
                                  else padding_mask[:, None, None, :],
                                  deterministic=deterministic)


class _BahdanauStep(nn.Module):
  """One decoder step: attend with ``s_{i-1}``, then update the GRU."""
  config: RNNConfig
  deterministic: bool

  @nn.compact
  def __call__(self, state_BH, y_BE, memory, padding_mask):
    context_BH = SourceAttention(self.config, name="source_attention")(
        state_BH[:, None], memory, padding_mask,
        deterministic=self.deterministic)[:, 0]
    state_BH, _ = nn.GRUCell(self.config.hidden_dim, name="gru")(
        state_BH, jnp.concatenate([y_BE, context_BH], axis=-1))
    return state_BH, jnp.concatenate([state_BH, context_BH, y_BE], axis=-1)


class RNNSeq2Seq(nn.Module):
  """Bidirectional-GRU encoder, attentive GRU decoder, built from one
  :class:`RNNConfig`."""
  config: RNNConfig

  @nn.compact
  def __call__(self, inputs: Array, decoder_inputs: Array, *,
               padding_mask: Optional[Array] = None,
               train: bool = False) -> Array:
    """Teacher-forced logits.

    Args:
      inputs: int source ids ``[B, S]``.
      decoder_inputs: int ``[B, T]``, targets shifted right (start token
        first); logits at ``t`` depend on ``decoder_inputs[:, :t+1]`` only.
      padding_mask: bool ``[B, S]``, True = real token; padding must be a
        suffix (it sets the GRU sequence lengths).
      train: enables dropout (rng ``"dropout"``).

    Returns:
      float32 logits ``[B, T, output_vocab_size]``.
    """
    cfg = self.config
    if cfg.style not in RNN_STYLES:
      raise ValueError(f"unknown style {cfg.style!r}; choose from "
                       f"{RNN_STYLES}")
    if pe.positional_kind(cfg.positional) not in ("none", "absolute"):
      raise ValueError(f"RNNSeq2Seq takes an absolute positional encoding or "
                       f"'none', got {cfg.positional!r}")
    deterministic = not train
    H = cfg.hidden_dim
    vocab_out = cfg.output_vocab_size or cfg.vocab_size

    def embed(tokens, vocab, name):
      x = Embed(vocab, cfg.emb_dim, dtype=cfg.dtype, name=name)(tokens)
      x = PositionalEmbedding(cfg.positional, cfg.max_len, dtype=cfg.dtype,
                              name=f"{name}_positional")(x)
      return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

    lengths = (None if padding_mask is None
               else jnp.sum(padding_mask, axis=1).astype(jnp.int32))
    (_, backward_BH), states = nn.Bidirectional(
        nn.RNN(nn.GRUCell(H), name="forward"),
        nn.RNN(nn.GRUCell(H), name="backward"), return_carry=True,
        name="encoder")(embed(inputs, cfg.vocab_size, "source_embed"),
                        seq_lengths=lengths)
    memory = nn.Dense(H, dtype=cfg.dtype, name="memory")(states)
    # Bahdanau: s_0 = tanh(W_s h_1^backward).
    state0 = jnp.tanh(nn.Dense(H, dtype=cfg.dtype, name="init_state")(
        backward_BH))
    y = embed(decoder_inputs, vocab_out, "target_embed")
    if cfg.style == "bahdanau":
      scan = nn.scan(_BahdanauStep, variable_broadcast="params",
                     variable_axes={"intermediates": 1},
                     split_rngs={"params": False, "dropout": True,
                                 "attention": True},
                     in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1)
      _, features = scan(cfg, deterministic, name="decoder")(
          state0, y, memory, padding_mask)
    else:
      states_BTH = nn.RNN(nn.GRUCell(H), name="decoder")(
          y, initial_carry=state0)
      context = SourceAttention(cfg, name="source_attention")(
          states_BTH, memory, padding_mask, deterministic=deterministic)
      features = jnp.concatenate([context, states_BTH], axis=-1)
    hidden = jnp.tanh(nn.Dense(H, dtype=cfg.dtype, name="pre_output")(
        features))
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    logits = nn.Dense(vocab_out, dtype=cfg.dtype, name="logits")(hidden)
    return logits.astype(jnp.float32)
