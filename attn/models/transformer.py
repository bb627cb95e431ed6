"""Transformers whose attention and positional encoding are chosen by name.

Every model here is built from one :class:`TransformerConfig` (as Flax's
lm1b ``TransformerConfig``, to avoid keyword plumbing): the model passes it to
each stack, each stack to its blocks, and each block reads the fields its
attention module and MLP need. A new option is one config field.

Blocks (:class:`TransformerBlock`, :class:`DecoderBlock`) and stacks
(:class:`TransformerEncoder`, :class:`TransformerDecoder`) take embedded
inputs ``[B, T, D]``; the models take int token ids ``[B, T]``:

* :class:`TransformerLM` — decoder-only language model with
  :meth:`TransformerLM.generate` (KV cache; greedy or temperature/top-k).
* :class:`EncoderClassifier` — encoder + pooling + linear head (ListOps-like
  tasks, padding masks).
* :class:`Seq2SeqTransformer` — encoder–decoder: encoder self-attention,
  causal decoder self-attention and cross-attention.

``config.attention`` (registry spec) is used for every attention layer and
``config.positional`` is one of ``attn.positional.POSITIONAL_ENCODINGS``.
Models take ``train: bool`` on ``__call__`` (dropout needs the ``"dropout"``
rng; random-feature kernels draw from the ``"attention"`` rng when given) and
sow every layer's attention weights when called with
``mutable=["intermediates"]`` (see :func:`attention_weights`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.modules import MultiHeadAttention, PositionalEmbedding
from attn.modules.attention import check_support, resolve_attention
from attn.modules.embeddings import Embed

Array = jax.Array
AttentionSpec = Union[str, Callable[..., Array]]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Everything a Transformer model, stack and block needs.

  Attributes:
    vocab_size: input token ids (token models; unused by ViT/set encoders).
    output_vocab_size: target ids of :class:`Seq2SeqTransformer`
      (default ``vocab_size``).
    emb_dim: model width ``D``.
    num_heads / num_kv_heads: query heads and key/value heads (GQA/MQA;
      ``None`` = ``num_heads``).
    num_layers: blocks per stack (encoder and decoder each).
    mlp_dim: hidden width of the MLP (default ``4 * emb_dim``).
    max_len: longest sequence (learned positions, generation length).
    attention: registry spec or ``attention_fn``, used by every layer.
    cross_attention: spec for decoder-to-encoder attention (default
      ``attention``).
    positional: ``"none"``, ``"sinusoidal"``, ``"learned"``, ``"rope"``,
      ``"alibi"`` or ``"t5"`` (rotary/bias kinds act in self-attention).
    pre_ln: LayerNorm before each sublayer (True) or after the residual sum.
    dropout_rate: on embeddings, sublayer outputs and in the MLP.
    attention_dropout_rate: on the attention weights.
    decode: KV-cache decoding (causal self-attention; set by
      :func:`generate`).
    dtype: activation dtype (softmax and logits stay float32).
    logits_soft_cap: ``None`` or ``c > 0``: every attention layer caps its
      scores to ``c·tanh(scores / c)`` (Gemma 2).
  """
  vocab_size: Optional[int] = None
  output_vocab_size: Optional[int] = None
  emb_dim: int = 64
  num_heads: int = 4
  num_kv_heads: Optional[int] = None
  num_layers: int = 2
  mlp_dim: Optional[int] = None
  max_len: int = 256
  attention: AttentionSpec = "softmax"
  cross_attention: Optional[AttentionSpec] = None
  positional: str = "sinusoidal"
  pre_ln: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  decode: bool = False
  dtype: Any = jnp.float32
  logits_soft_cap: Optional[float] = None

  def replace(self, **changes) -> "TransformerConfig":
    """A copy with ``changes`` (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)

  @property
  def mlp_width(self) -> int:
    """``mlp_dim``, or ``4 * emb_dim`` when unset."""
    return self.mlp_dim or 4 * self.emb_dim

  def need_vocab(self, model: str) -> int:
    """``vocab_size``, or a ValueError naming ``model`` when unset."""
    if not self.vocab_size:
      raise ValueError(f"{model} needs TransformerConfig.vocab_size")
    return self.vocab_size


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


def _attention(config: TransformerConfig, **fields) -> MultiHeadAttention:
  """The block's :class:`MultiHeadAttention` from ``config`` (+ ``fields``)."""
  return MultiHeadAttention(
      num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
      dropout_rate=config.attention_dropout_rate, dtype=config.dtype,
      logits_soft_cap=config.logits_soft_cap, **fields)


def _mlp(config: TransformerConfig) -> Mlp:
  return Mlp(config.mlp_width, config.dropout_rate, config.dtype, name="mlp")


def _norm(config: TransformerConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=config.dtype, name=name)


class TransformerBlock(nn.Module):
  """Self-attention + MLP, each in a residual branch.

  Attributes:
    config: sizes, attention, positional encoding, dropout, dtype.
    causal: decoder-style (autoregressive) self-attention; with
      ``config.decode`` it decodes with a KV cache.
  """
  config: TransformerConfig
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]``, ``mask`` broadcastable to ``[B, N, T, T]`` -> ``[B, T, D]``."""
    cfg = self.config
    attention = _attention(cfg, attention=cfg.attention,
                           positional=cfg.positional, causal=self.causal,
                           decode=cfg.decode, name="attention")
    mlp = _mlp(cfg)
    dropout = nn.Dropout(cfg.dropout_rate)
    x = residual(x, lambda h: attention(h, mask=mask,
                                        deterministic=deterministic),
                 _norm(cfg, "attention_norm"), cfg.pre_ln, dropout,
                 deterministic)
    return residual(x, lambda h: mlp(h, deterministic=deterministic),
                    _norm(cfg, "mlp_norm"), cfg.pre_ln, dropout,
                    deterministic)


class DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention to the encoder, then MLP.

  ``config.cross_attention`` (default ``config.attention``) is the
  cross-attention spec; rotary/bias positional encodings act in
  self-attention only.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, encoded: Array, *,
               cross_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]``, ``encoded[B, S, D]`` -> ``[B, T, D]``.

    ``cross_mask`` broadcastable to ``[B, N, T, S]`` (encoder padding).
    """
    cfg = self.config
    self_attention = _attention(cfg, attention=cfg.attention,
                                positional=cfg.positional, causal=True,
                                name="self_attention")
    cross_attention = _attention(
        cfg, attention=cfg.cross_attention or cfg.attention,
        name="cross_attention")
    mlp = _mlp(cfg)
    dropout = nn.Dropout(cfg.dropout_rate)
    x = residual(x, lambda h: self_attention(h, deterministic=deterministic),
                 _norm(cfg, "self_attention_norm"), cfg.pre_ln, dropout,
                 deterministic)
    x = residual(x, lambda h: cross_attention(h, encoded, mask=cross_mask,
                                              deterministic=deterministic),
                 _norm(cfg, "cross_attention_norm"), cfg.pre_ln, dropout,
                 deterministic)
    return residual(x, lambda h: mlp(h, deterministic=deterministic),
                    _norm(cfg, "mlp_norm"), cfg.pre_ln, dropout,
                    deterministic)


class TransformerEncoder(nn.Module):
  """``config.num_layers`` :class:`TransformerBlock` s (+ final LayerNorm if
  pre-LN).

  Without positional information (``positional="none"``, non-causal) the
  encoder is permutation-equivariant.
  """
  config: TransformerConfig
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]`` -> ``[B, T, D]``; ``mask`` broadcastable to ``[B,N,T,T]``."""
    cfg = self.config
    for i in range(cfg.num_layers):
      x = TransformerBlock(cfg, causal=self.causal, name=f"layer_{i}")(
          x, mask=mask, deterministic=deterministic)
    if cfg.pre_ln:
      x = _norm(cfg, "final_norm")(x)
    return x


class TransformerDecoder(nn.Module):
  """``config.num_layers`` :class:`DecoderBlock` s (+ final LayerNorm if
  pre-LN)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, encoded: Array, *,
               cross_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """``x[B, T, D]``, ``encoded[B, S, D]`` -> ``[B, T, D]``."""
    cfg = self.config
    for i in range(cfg.num_layers):
      x = DecoderBlock(cfg, name=f"layer_{i}")(
          x, encoded, cross_mask=cross_mask, deterministic=deterministic)
    if cfg.pre_ln:
      x = _norm(cfg, "final_norm")(x)
    return x


class TokenEmbedding(nn.Module):
  """Token ids ``[B, T]`` -> embeddings ``[B, T, D]`` + absolute positions.

  ``vocab_size`` overrides ``config.vocab_size`` (the target side of a
  seq2seq model).
  """
  config: TransformerConfig
  vocab_size: Optional[int] = None

  @nn.compact
  def __call__(self, tokens: Array, *, deterministic: bool = True) -> Array:
    """int ``tokens[B, T]`` -> ``[B, T, emb_dim]`` (dropout unless
    ``deterministic``)."""
    cfg = self.config
    x = Embed(self.vocab_size or cfg.need_vocab("TokenEmbedding"),
                 cfg.emb_dim, dtype=cfg.dtype, name="embed")(tokens)
    x = PositionalEmbedding(cfg.positional, cfg.max_len, decode=cfg.decode,
                            dtype=cfg.dtype, name="positional")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


def key_padding_mask(padding_mask: Optional[Array]) -> Optional[Array]:
  """``[B, S]`` bool (True = real token) -> attention mask ``[B, 1, 1, S]``."""
  if padding_mask is None:
    return None
  return jnp.asarray(padding_mask, bool)[:, None, None, :]


class TransformerLM(nn.Module):
  """Decoder-only (causal) Transformer language model.

  ``config.vocab_size`` is required; ``config.attention`` must support
  causal masking (``ValueError`` otherwise) and, for :meth:`generate`, be
  exact; ``config.max_len`` bounds the generated length.
  """
  config: TransformerConfig

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
    cfg = self.config
    deterministic = not train
    x = TokenEmbedding(cfg, name="embedding")(tokens,
                                              deterministic=deterministic)
    x = TransformerEncoder(cfg, causal=True, name="decoder")(
        x, deterministic=deterministic)
    logits = nn.Dense(cfg.need_vocab("TransformerLM"), dtype=cfg.dtype,
                      name="logits")(x)
    return logits.astype(jnp.float32)

  @nn.nowrap
  def generate(self, params, prompt: Array, max_new_tokens: int, rng: Array,
               temperature: float = 1.0, top_k: Optional[int] = None,
               use_cache: Optional[bool] = None) -> Array:
    """Samples a continuation; see :func:`generate`."""
    return generate(self, params, prompt, max_new_tokens, rng,
                    temperature=temperature, top_k=top_k,
                    use_cache=use_cache)


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


def can_decode(attention) -> bool:
  """Whether ``attention`` (a spec or ``attention_fn``) can decode with a KV
  cache: the rule :class:`~attn.modules.MultiHeadAttention` applies."""
  try:
    check_support(resolve_attention(attention), causal=True, decode=True)
  except ValueError:
    return False
  return True


def generate(model: TransformerLM, params, prompt: Array, max_new_tokens: int,
             rng: Array, *, temperature: float = 1.0,
             top_k: Optional[int] = None,
             use_cache: Optional[bool] = None) -> Array:
  """Autoregressive generation (jit-compiled).

  With the KV cache (``use_cache``; default: when the model's attention can
  decode, :func:`can_decode`) the prompt is consumed in one cached forward
  pass, then one token per step inside ``lax.scan``. Without it (attention
  variants that cannot decode, e.g. ``linformer`` or ``performer``), every
  new token takes one full causal forward pass over a buffer that has its
  final length from the start (later tokens do not change the causal logits
  at earlier positions), so the loop compiles once; exact, and fine for
  short samples. Both draw token ``i`` from ``fold_in(rng, i)``, so they
  agree token for token where both apply.

  Args:
    model: a :class:`TransformerLM` (its ``config.decode`` is ignored).
    params: the model's ``params`` tree or ``{"params": ...}``.
    prompt: int ``[B, P]`` with ``P >= 1`` (no padding).
    max_new_tokens: how many tokens to append (``P + max_new_tokens <=
      config.max_len``).
    rng: PRNG key for sampling (unused when ``temperature == 0``).
    temperature: ``0`` = greedy, else sampling temperature.
    top_k: sample among the ``top_k`` most likely tokens (``None`` = all).

  Returns:
    int32 ``[B, P + max_new_tokens]``: the prompt followed by new tokens.

  Raises:
    ValueError: bad lengths/temperature/top_k, or ``use_cache=True`` with
      an attention variant that cannot decode with a cache.
  """
  cfg = model.config
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be int [B, P] with P >= 1, got shape "
                     f"{prompt.shape}")
  total = prompt.shape[1] + max_new_tokens
  if max_new_tokens < 1 or total > cfg.max_len:
    raise ValueError(f"need 1 <= max_new_tokens and prompt length + "
                     f"max_new_tokens <= max_len={cfg.max_len}; got "
                     f"{prompt.shape[1]} + {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size={cfg.vocab_size}], "
                     f"got {top_k}")
  variables = params if "params" in params else {"params": params}
  if use_cache is None:
    use_cache = can_decode(cfg.attention)
  if not use_cache:
    return _generate_full_prefix(model.clone(parent=None), variables, prompt,
                                 rng, jnp.float32(temperature),
                                 max_new_tokens, top_k)
  decoder = model.clone(config=cfg.replace(decode=True), parent=None)
  return _generate(decoder, variables, prompt, rng, jnp.float32(temperature),
                   max_new_tokens, top_k)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate_full_prefix(model: TransformerLM, variables, prompt, rng,
                          temperature, max_new_tokens, top_k):
  B, P = prompt.shape
  tokens = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(
      prompt)

  def body(i, tokens):
    logits = model.apply(variables, tokens)
    last = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1,
                                        keepdims=False)
    token = sample_logits(last, jax.random.fold_in(rng, i), temperature,
                          top_k)
    return jax.lax.dynamic_update_index_in_dim(tokens, token, P + i, axis=1)

  return jax.lax.fori_loop(0, max_new_tokens, body, tokens)


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
    config: the encoder (non-causal); ``config.vocab_size`` is required.
    num_classes: output classes.
    pooling: ``"mean"`` (over real tokens), ``"max"`` or ``"cls"`` (a learned
      token prepended to the sequence).
  """
  config: TransformerConfig
  num_classes: int
  pooling: str = "mean"

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
    cfg = self.config
    deterministic = not train
    B, T = tokens.shape
    valid = (jnp.ones((B, T), bool) if padding_mask is None
             else jnp.asarray(padding_mask, bool))
    x = TokenEmbedding(cfg, name="embedding")(tokens,
                                              deterministic=deterministic)
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.emb_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, cfg.emb_dim))
                           .astype(x.dtype), x], axis=1)
      valid = jnp.concatenate([jnp.ones((B, 1), bool), valid], axis=1)
    x = TransformerEncoder(cfg, name="encoder")(
        x, mask=None if padding_mask is None else key_padding_mask(valid),
        deterministic=deterministic)
    pooled = pool(x, valid, self.pooling)
    logits = nn.Dense(self.num_classes, dtype=cfg.dtype, name="head")(pooled)
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

  Attention appears in three places: encoder self-attention
  (``config.attention``), causal decoder self-attention (``config.attention``)
  and decoder-to-encoder cross-attention (``config.cross_attention``, default
  ``config.attention``). ``config.vocab_size`` is required;
  ``config.output_vocab_size`` defaults to it.
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    vocab_out = cfg.output_vocab_size or cfg.need_vocab("Seq2SeqTransformer")
    self.source_embedding = TokenEmbedding(cfg)
    self.target_embedding = TokenEmbedding(cfg, vocab_out)
    self.encoder = TransformerEncoder(cfg)
    self.decoder = TransformerDecoder(cfg)
    self.logits = nn.Dense(vocab_out, dtype=cfg.dtype)

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
           "TokenEmbedding", "TransformerBlock", "TransformerConfig",
           "TransformerDecoder", "TransformerEncoder", "TransformerLM",
           "attention_weights", "generate", "key_padding_mask", "pool",
           "residual", "sample_logits"]
