"""Transformers whose attention and positional encoding are chosen by name.

Blocks (:class:`TransformerBlock`, :class:`DecoderBlock`) and stacks
(:class:`TransformerEncoder`, :class:`TransformerDecoder`) take embedded
inputs ``[B, T, D]``; the models take int token ids ``[B, T]``:

* :class:`TransformerLM` — decoder-only language model with
  :meth:`TransformerLM.generate` (KV cache; greedy or temperature/top-k).
* :class:`EncoderClassifier` — encoder + pooling + linear head (ListOps-like
  tasks, padding masks).
* :class:`Seq2SeqTransformer` — encoder–decoder: encoder self-attention,
  causal decoder self-attention and cross-attention.

Every model has ``attention`` (registry spec, used for every attention
layer) and ``positional`` (one of ``attn.positional.POSITIONAL_ENCODINGS``)
fields, ``train: bool`` on ``__call__`` (dropout needs the ``"dropout"`` rng;
random-feature kernels draw from the ``"attention"`` rng when given) and
sows every layer's attention weights when called with
``mutable=["intermediates"]`` (see :func:`attention_weights`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.modules import MultiHeadAttention, PositionalEmbedding

Array = jax.Array
AttentionSpec = Union[str, Callable[..., Array]]


def attention_weights(intermediates) -> list[tuple[str, Array]]:
  """Every sown ``attention_weights`` as ``[(path, weights[B, N, T, S])]``.

  ``intermediates`` is the ``'intermediates'`` collection returned by
  ``model.apply(..., mutable=["intermediates"])`` (or the whole variables
  dict). Layers appear in the order they ran.
  """
  found = []

  def walk(tree, path):
    for name, sub in tree.items():
      if name == "attention_weights":
        found.extend((path, w) for w in sub)
      elif isinstance(sub, Mapping):
        walk(sub, f"{path}/{name}" if path else name)

  walk(intermediates.get("intermediates", intermediates), "")
  return found


class Mlp(nn.Module):
  """Position-wise ``Dense(mlp_dim) -> GELU -> dropout -> Dense(D)``."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    """``[B, T, D] -> [B, T, D]``."""
    h = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


def residual(x: Array, sublayer: Callable[[Array], Array], norm: nn.Module,
             pre_ln: bool, dropout: nn.Module, deterministic: bool) -> Array:
  """``x + dropout(f(norm(x)))`` (pre-LN) or ``norm(x + dropout(f(x)))``."""
  if pre_ln:
    return x + dropout(sublayer(norm(x)), deterministic=deterministic)
  return norm(x + dropout(sublayer(x), deterministic=deterministic))


class TransformerBlock(nn.Module):
  """Self-attention + MLP, each in a residual branch.

  Attributes:
    num_heads / num_kv_heads: query heads and key/value heads (GQA/MQA).
    mlp_dim: hidden width of the MLP.
    attention: registry spec or ``attention_fn``.
    positional: positional-encoding name (rotary/bias kinds act here).
    causal: decoder-style (autoregressive) self-attention.
    pre_ln: LayerNorm before each sublayer (True) or after the residual sum.
    dropout_rate: on sublayer outputs and in the MLP.
    attention_dropout_rate: on the attention weights.
    decode: KV-cache decoding (needs ``causal``).
  """
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None
  attention: AttentionSpec = "softmax"
  positional: str = "none"
  causal: bool = False
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]``, ``mask`` broadcastable to ``[B, N, T, T]`` -> ``[B, T, D]``."""
    attention = MultiHeadAttention(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        attention=self.attention, positional=self.positional,
        causal=self.causal, dropout_rate=self.attention_dropout_rate,
        decode=self.decode, dtype=self.dtype, name="attention")
    mlp = Mlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    dropout = nn.Dropout(self.dropout_rate)
    x = residual(x, lambda h: attention(h, mask=mask,
                                        deterministic=deterministic),
                 norm(name="attention_norm"), self.pre_ln, dropout,
                 deterministic)
    return residual(x, lambda h: mlp(h, deterministic=deterministic),
                    norm(name="mlp_norm"), self.pre_ln, dropout, deterministic)


class DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention to the encoder, then MLP.

  Attributes are those of :class:`TransformerBlock` (always causal), plus
  ``cross_attention``: spec for the cross-attention (default ``attention``).
  Rotary/bias positional encodings act in self-attention only.
  """
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None
  attention: AttentionSpec = "softmax"
  cross_attention: Optional[AttentionSpec] = None
  positional: str = "none"
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, encoded: Array, *,
               cross_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]``, ``encoded[B, S, D]`` -> ``[B, T, D]``.

    ``cross_mask`` broadcastable to ``[B, N, T, S]`` (encoder padding).
    """
    mha = functools.partial(
        MultiHeadAttention, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads,
        dropout_rate=self.attention_dropout_rate, dtype=self.dtype)
    self_attention = mha(attention=self.attention, positional=self.positional,
                         causal=True, name="self_attention")
    cross_attention = mha(attention=self.cross_attention or self.attention,
                          name="cross_attention")
    mlp = Mlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    dropout = nn.Dropout(self.dropout_rate)
    x = residual(x, lambda h: self_attention(h, deterministic=deterministic),
                 norm(name="self_attention_norm"), self.pre_ln, dropout,
                 deterministic)
    x = residual(x, lambda h: cross_attention(h, encoded, mask=cross_mask,
                                              deterministic=deterministic),
                 norm(name="cross_attention_norm"), self.pre_ln, dropout,
                 deterministic)
    return residual(x, lambda h: mlp(h, deterministic=deterministic),
                    norm(name="mlp_norm"), self.pre_ln, dropout, deterministic)


class TransformerEncoder(nn.Module):
  """``num_layers`` :class:`TransformerBlock` s (+ final LayerNorm if pre-LN).

  Attributes: ``num_layers`` and those of :class:`TransformerBlock`.
  Without positional information (``positional="none"``, non-causal) the
  encoder is permutation-equivariant.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None
  attention: AttentionSpec = "softmax"
  positional: str = "none"
  causal: bool = False
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]`` -> ``[B, T, D]``; ``mask`` broadcastable to ``[B,N,T,T]``."""
    for i in range(self.num_layers):
      x = TransformerBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim,
          num_kv_heads=self.num_kv_heads, attention=self.attention,
          positional=self.positional, causal=self.causal, pre_ln=self.pre_ln,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          decode=self.decode, dtype=self.dtype, name=f"layer_{i}")(
              x, mask=mask, deterministic=deterministic)
    if self.pre_ln:
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="final_norm")(x)
    return x


class TransformerDecoder(nn.Module):
  """``num_layers`` :class:`DecoderBlock` s (+ final LayerNorm if pre-LN)."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None
  attention: AttentionSpec = "softmax"
  cross_attention: Optional[AttentionSpec] = None
  positional: str = "none"
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, encoded: Array, *,
               cross_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]``, ``encoded[B, S, D]`` -> ``[B, T, D]``."""
    for i in range(self.num_layers):
      x = DecoderBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim,
          num_kv_heads=self.num_kv_heads, attention=self.attention,
          cross_attention=self.cross_attention, positional=self.positional,
          pre_ln=self.pre_ln, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          dtype=self.dtype, name=f"layer_{i}")(
              x, encoded, cross_mask=cross_mask, deterministic=deterministic)
    if self.pre_ln:
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="final_norm")(x)
    return x


class TokenEmbedding(nn.Module):
  """Token ids ``[B, T]`` -> embeddings ``[B, T, D]`` + absolute positions."""
  vocab_size: int
  emb_dim: int
  positional: str
  max_len: int
  dropout_rate: float = 0.0
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, *, deterministic: bool = True) -> Array:
    """int ``tokens[B, T]`` -> ``[B, T, emb_dim]`` (dropout unless
    ``deterministic``)."""
    x = nn.Embed(self.vocab_size, self.emb_dim, dtype=self.dtype,
                 name="embed")(tokens)
    x = PositionalEmbedding(self.positional, self.max_len, decode=self.decode,
                            dtype=self.dtype, name="positional")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


def key_padding_mask(padding_mask: Optional[Array]) -> Optional[Array]:
  """``[B, S]`` bool (True = real token) -> attention mask ``[B, 1, 1, S]``."""
  if padding_mask is None:
    return None
  return jnp.asarray(padding_mask, bool)[:, None, None, :]


class TransformerLM(nn.Module):
  """Decoder-only (causal) Transformer language model.

  Attributes:
    vocab_size: number of token ids.
    emb_dim / num_heads / num_kv_heads / num_layers / mlp_dim: sizes
      (``mlp_dim`` defaults to ``4 * emb_dim``).
    max_len: longest sequence (learned positions, generation length).
    attention: registry spec; must support causal masking (``ValueError``
      otherwise) and, for :meth:`generate`, be exact.
    positional: ``"none"``, ``"sinusoidal"``, ``"learned"``, ``"rope"``,
      ``"alibi"`` or ``"t5"``.
    pre_ln, dropout_rate, attention_dropout_rate, dtype: see
      :class:`TransformerBlock`.
    decode: KV-cache mode (set by :meth:`generate`).
  """
  vocab_size: int
  emb_dim: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  max_len: int = 256
  attention: AttentionSpec = "softmax"
  positional: str = "sinusoidal"
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, *, train: bool = False) -> Array:
    """Next-token logits.

    Args:
      tokens: int ``[B, T]``; logits at ``t`` depend on ``tokens[:, :t+1]``.
        In decode mode: the next ``T >= 1`` tokens after the cached ones.
      train: enables dropout (rng ``"dropout"``).

    Returns:
      float32 logits ``[B, T, vocab_size]``.
    """
    deterministic = not train
    x = TokenEmbedding(self.vocab_size, self.emb_dim, self.positional,
                       self.max_len, self.dropout_rate, decode=self.decode,
                       dtype=self.dtype, name="embedding")(
                           tokens, deterministic=deterministic)
    x = TransformerEncoder(
        num_layers=self.num_layers, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim or 4 * self.emb_dim,
        num_kv_heads=self.num_kv_heads, attention=self.attention,
        positional=self.positional, causal=True, pre_ln=self.pre_ln,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        decode=self.decode, dtype=self.dtype, name="decoder")(
            x, deterministic=deterministic)
    logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="logits")(x)
    return logits.astype(jnp.float32)

  @nn.nowrap
  def generate(self, params, prompt: Array, max_new_tokens: int, rng: Array,
               temperature: float = 1.0, top_k: Optional[int] = None
               ) -> Array:
    """Samples a continuation with the KV cache; see :func:`generate`."""
    return generate(self, params, prompt, max_new_tokens, rng,
                    temperature=temperature, top_k=top_k)


def sample_logits(logits: Array, rng: Array, temperature,
                  top_k: Optional[int]) -> Array:
  """``logits[B, V]`` -> int32 ``[B]``: argmax if ``temperature == 0``, else
  a sample from ``softmax(logits / temperature)`` over the ``top_k`` best.

  ``temperature`` may be a traced scalar (one compilation for all values).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1)
  if top_k is not None:
    kth_best = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_best, -jnp.inf, logits)
  temperature = jnp.asarray(temperature, jnp.float32)
  sampled = jax.random.categorical(
      rng, logits / jnp.where(temperature > 0, temperature, 1.0), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(model: TransformerLM, params, prompt: Array, max_new_tokens: int,
             rng: Array, *, temperature: float = 1.0,
             top_k: Optional[int] = None) -> Array:
  """Autoregressive generation with a KV cache (jit-compiled).

  The prompt is consumed in one cached forward pass; then one token per
  step, inside ``lax.scan``.

  Args:
    model: a :class:`TransformerLM` (its ``decode`` field is ignored).
    params: the model's ``params`` tree or ``{"params": ...}``.
    prompt: int ``[B, P]`` with ``P >= 1`` (no padding).
    max_new_tokens: how many tokens to append (``P + max_new_tokens <=
      max_len``).
    rng: PRNG key for sampling (unused when ``temperature == 0``).
    temperature: ``0`` = greedy, else sampling temperature.
    top_k: sample among the ``top_k`` most likely tokens (``None`` = all).

  Returns:
    int32 ``[B, P + max_new_tokens]``: the prompt followed by new tokens.

  Raises:
    ValueError: bad lengths/temperature/top_k, or an attention variant that
      cannot decode with a cache.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be int [B, P] with P >= 1, got shape "
                     f"{prompt.shape}")
  total = prompt.shape[1] + max_new_tokens
  if max_new_tokens < 1 or total > model.max_len:
    raise ValueError(f"need 1 <= max_new_tokens and prompt length + "
                     f"max_new_tokens <= max_len={model.max_len}; got "
                     f"{prompt.shape[1]} + {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size={model.vocab_size}], "
                     f"got {top_k}")
  variables = params if "params" in params else {"params": params}
  return _generate(model.clone(decode=True, parent=None), variables, prompt,
                   rng, jnp.float32(temperature), max_new_tokens, top_k)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate(decoder: TransformerLM, variables, prompt, rng, temperature,
              max_new_tokens, top_k):
  B, P = prompt.shape
  cache_shapes = jax.eval_shape(
      decoder.init, jax.random.key(0),
      jnp.zeros((B, P + max_new_tokens), jnp.int32))["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
  params = variables["params"]

  def step(cache, tokens):
    logits, updated = decoder.apply({"params": params, "cache": cache},
                                    tokens, mutable=["cache"])
    return updated["cache"], logits[:, -1]

  cache, last_logits = step(cache, prompt)
  first = sample_logits(last_logits, jax.random.fold_in(rng, 0), temperature,
                        top_k)

  def body(carry, i):
    cache, token = carry
    cache, logits = step(cache, token[:, None])
    token = sample_logits(logits, jax.random.fold_in(rng, i), temperature,
                          top_k)
    return (cache, token), token

  _, rest = jax.lax.scan(body, (cache, first),
                         jnp.arange(1, max_new_tokens))
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


POOLINGS = ("mean", "max", "cls")


class EncoderClassifier(nn.Module):
  """Transformer encoder + pooling + linear classifier.

  Attributes:
    vocab_size / num_classes: input ids and output classes.
    emb_dim, num_heads, num_kv_heads, num_layers, mlp_dim, max_len,
    attention, positional, pre_ln, dropout_rate, attention_dropout_rate,
    dtype: as in :class:`TransformerLM` (non-causal).
    pooling: ``"mean"`` (over real tokens), ``"max"`` or ``"cls"`` (a learned
      token prepended to the sequence).
  """
  vocab_size: int
  num_classes: int
  emb_dim: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  max_len: int = 512
  attention: AttentionSpec = "softmax"
  positional: str = "sinusoidal"
  pooling: str = "mean"
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, *, padding_mask: Optional[Array] = None,
               train: bool = False) -> Array:
    """Class logits.

    Args:
      tokens: int ``[B, T]``.
      padding_mask: bool ``[B, T]``, True = real token; padded positions
        are neither attended to nor pooled.
      train: enables dropout (rng ``"dropout"``).

    Returns:
      float32 logits ``[B, num_classes]``.
    """
    if self.pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {self.pooling!r}; choose from "
                       f"{POOLINGS}")
    deterministic = not train
    B, T = tokens.shape
    valid = (jnp.ones((B, T), bool) if padding_mask is None
             else jnp.asarray(padding_mask, bool))
    x = TokenEmbedding(self.vocab_size, self.emb_dim, self.positional,
                       self.max_len, self.dropout_rate, dtype=self.dtype,
                       name="embedding")(tokens, deterministic=deterministic)
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.emb_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, self.emb_dim))
                           .astype(x.dtype), x], axis=1)
      valid = jnp.concatenate([jnp.ones((B, 1), bool), valid], axis=1)
    x = TransformerEncoder(
        num_layers=self.num_layers, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim or 4 * self.emb_dim,
        num_kv_heads=self.num_kv_heads, attention=self.attention,
        positional=self.positional, pre_ln=self.pre_ln,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        name="encoder")(
            x, mask=None if padding_mask is None else key_padding_mask(valid),
            deterministic=deterministic)
    pooled = pool(x, valid, self.pooling)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled)
    return logits.astype(jnp.float32)


def pool(x: Array, valid: Array, pooling: str) -> Array:
  """``x[B, T, D]``, ``valid[B, T]`` -> ``[B, D]`` ("cls" takes position 0)."""
  if pooling == "cls":
    return x[:, 0]
  if pooling == "max":
    return jnp.max(jnp.where(valid[..., None], x, -jnp.inf), axis=1)
  count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
  return jnp.sum(jnp.where(valid[..., None], x, 0), axis=1) / count


class Seq2SeqTransformer(nn.Module):
  """Encoder–decoder Transformer (Vaswani et al. 2017).

  Attention appears in three places: encoder self-attention (``attention``),
  causal decoder self-attention (``attention``) and decoder-to-encoder
  cross-attention (``cross_attention``, default ``attention``).

  Attributes:
    vocab_size: input ids; ``output_vocab_size`` (default ``vocab_size``).
    emb_dim, num_heads, num_kv_heads, num_layers (each side), mlp_dim,
    max_len, positional, pre_ln, dropout_rate, attention_dropout_rate,
    dtype: as in :class:`TransformerLM`.
  """
  vocab_size: int
  output_vocab_size: Optional[int] = None
  emb_dim: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  max_len: int = 256
  attention: AttentionSpec = "softmax"
  cross_attention: Optional[AttentionSpec] = None
  positional: str = "sinusoidal"
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    mlp_dim = self.mlp_dim or 4 * self.emb_dim
    common = dict(num_layers=self.num_layers, num_heads=self.num_heads,
                  mlp_dim=mlp_dim, num_kv_heads=self.num_kv_heads,
                  attention=self.attention, positional=self.positional,
                  pre_ln=self.pre_ln, dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  dtype=self.dtype)
    embed = functools.partial(TokenEmbedding, emb_dim=self.emb_dim,
                              positional=self.positional,
                              max_len=self.max_len,
                              dropout_rate=self.dropout_rate,
                              dtype=self.dtype)
    self.source_embedding = embed(self.vocab_size)
    self.target_embedding = embed(self.output_vocab_size or self.vocab_size)
    self.encoder = TransformerEncoder(**common)
    self.decoder = TransformerDecoder(cross_attention=self.cross_attention,
                                      **common)
    self.logits = nn.Dense(self.output_vocab_size or self.vocab_size,
                           dtype=self.dtype)

  def encode(self, inputs: Array, *, padding_mask: Optional[Array] = None,
             train: bool = False) -> Array:
    """int ``inputs[B, S]`` (``padding_mask[B, S]``) -> ``[B, S, emb_dim]``."""
    x = self.source_embedding(inputs, deterministic=not train)
    return self.encoder(x, mask=key_padding_mask(padding_mask),
                        deterministic=not train)

  def decode(self, encoded: Array, decoder_inputs: Array, *,
             padding_mask: Optional[Array] = None,
             train: bool = False) -> Array:
    """float32 logits ``[B, T, V]`` for int ``decoder_inputs[B, T]``.

    ``padding_mask[B, S]`` marks real encoder positions.
    """
    y = self.target_embedding(decoder_inputs, deterministic=not train)
    y = self.decoder(y, encoded, cross_mask=key_padding_mask(padding_mask),
                     deterministic=not train)
    return self.logits(y).astype(jnp.float32)

  def __call__(self, inputs: Array, decoder_inputs: Array, *,
               padding_mask: Optional[Array] = None,
               train: bool = False) -> Array:
    """Teacher-forced logits.

    Args:
      inputs: int source ids ``[B, S]``.
      decoder_inputs: int ``[B, T]``, the targets shifted right (a start
        token first); logits at ``t`` predict ``targets[t]``.
      padding_mask: bool ``[B, S]``, True = real source token.
      train: enables dropout (rng ``"dropout"``).

    Returns:
      float32 logits ``[B, T, output_vocab_size]``.
    """
    encoded = self.encode(inputs, padding_mask=padding_mask, train=train)
    return self.decode(encoded, decoder_inputs, padding_mask=padding_mask,
                       train=train)


__all__ = ["DecoderBlock", "EncoderClassifier", "Mlp", "Seq2SeqTransformer",
           "TokenEmbedding", "TransformerBlock", "TransformerDecoder",
           "TransformerEncoder", "TransformerLM", "attention_weights",
           "generate", "key_padding_mask", "pool", "residual", "sample_logits"]
