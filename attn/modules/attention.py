"""Multi-head attention whose kernel is chosen by name.

:class:`MultiHeadAttention` owns the projections and whatever the chosen
kernel needs (variant parameters, a T5 bias table, a KV cache) and calls the
pure kernel from :mod:`attn.registry`::

    MultiHeadAttention(num_heads=4, attention="performer(num_features=64)")

Shapes: inputs ``[B, T, D]``, keys/values ``[B, S, D']``, projected heads
``[B, T, N, H]`` (``[B, S, K, H]`` for keys/values, ``K = num_kv_heads``),
output ``[B, T, out_features]``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import positional as pe
from attn import registry
from attn.masks import combine_masks
from attn.modules.embeddings import T5RelativeBias

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ResolvedAttention:
  """A kernel with what a module needs to know about it.

  Attributes:
    fn: Flax-compatible ``attention_fn`` (see :func:`registry.flax_compatible`).
    spec: the registry spec string, or ``None`` for a user callable.
    entry: the registry entry, or ``None`` for a user callable.
    takes_rng: the kernel has an explicit ``rng`` argument.
    takes_params: a registered kernel with an explicit ``params`` argument
      (its shapes come from :func:`registry.attention_param_shapes`).
  """
  fn: Callable[..., Array]
  spec: Optional[str]
  entry: Optional[registry.AttentionEntry]
  takes_rng: bool
  takes_params: bool


def _explicit_params(fn) -> tuple:
  try:
    return tuple(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return ()


def _registered(spec: str) -> ResolvedAttention:
  entry = registry.get_entry(registry.parse_spec(spec)[0])
  explicit = _explicit_params(entry.fn)
  return ResolvedAttention(
      fn=registry.get_attention(spec), spec=spec, entry=entry,
      takes_rng="rng" in explicit, takes_params="params" in explicit)


def resolve_attention(attention: Union[str, Callable[..., Array]]
                      ) -> ResolvedAttention:
  """Registry spec or callable -> :class:`ResolvedAttention`.

  A callable from :func:`attn.get_attention` is recognised by its spec; any
  other callable is a user ``attention_fn`` (wrapped so Flax's keyword
  arguments work) that gets an ``rng`` only if it names that argument.

  Raises:
    ValueError: unknown name/option (the message lists what exists) or a
      value that is neither a string nor callable.
  """
  if isinstance(attention, str):
    return _registered(attention)
  if not callable(attention):
    raise ValueError(f"attention must be a registry spec string or a "
                     f"callable, got {attention!r}; registered: "
                     f"{registry.list_attention()}")
  spec = getattr(attention, "attn_name", None)
  if spec is not None:
    try:
      return _registered(spec)
    except ValueError:  # wrapped by flax_compatible, but not registered
      return ResolvedAttention(fn=attention, spec=None, entry=None,
                               takes_rng=False, takes_params=False)
  return ResolvedAttention(
      fn=registry.flax_compatible(
          attention, name=getattr(attention, "__name__", "custom attention")),
      spec=None, entry=None,
      takes_rng="rng" in _explicit_params(attention), takes_params=False)


# What a module may ask of a kernel -> the registry flag that allows it.
_CAPABILITIES = {
    "causal": ("causal masking", lambda e: e.causal),
    "padding": ("padding masks", lambda e: e.padding),
    "cross": ("cross-attention", lambda e: e.cross),
    "decode": ("incremental decoding with a KV cache (exact kernels only)",
               lambda e: getattr(e, "decode", e.exact)),
}


def check_support(resolved: ResolvedAttention, **asked: bool) -> None:
  """Raises ``ValueError`` if the registered variant cannot do what is asked.

  ``asked`` maps ``causal``/``padding``/``cross``/``decode`` to whether the
  caller needs it. User callables are trusted (their own errors surface at
  call time).
  """
  if resolved.entry is None:
    return
  for capability, needed in asked.items():
    what, supports = _CAPABILITIES[capability]
    if needed and not supports(resolved.entry):
      able = [n for n in registry.list_attention()
              if supports(registry.get_entry(n))]
      raise ValueError(f"attention {resolved.spec!r} does not support "
                       f"{what}; variants that do: {able}")


class MultiHeadAttention(nn.Module):
  """Multi-head (grouped-query) attention with a swappable kernel.

  Attributes:
    num_heads: query heads ``N``.
    num_kv_heads: key/value heads ``K`` (``N % K == 0``); ``None`` = ``N``
      (multi-head), ``1`` = multi-query, else grouped-query attention.
    qkv_features: total projection width ``N * H``; default: input width.
    out_features: output width; default: input width.
    attention: registry spec (``"softmax"``, ``"local(window=64)"``) or a
      Flax-style ``attention_fn`` callable.
    positional: positional-encoding name; ``"rope"`` rotates q/k, ``"alibi"``
      and ``"t5"`` add a bias, the absolute kinds and ``"none"`` do nothing
      here (they act on embeddings).
    causal: query ``t`` attends keys ``s <= t``.
    dropout_rate: dropout on the attention weights (needs the ``"dropout"``
      rng when ``deterministic=False``).
    decode: autoregressive decoding with a KV cache in the ``'cache'``
      collection (``cached_key``, ``cached_value``, ``cache_index``), as in
      ``flax.linen``: ``init`` with the full-length input allocates it, each
      later call appends ``T >= 1`` new positions. Needs ``causal=True``,
      self-attention and an exact kernel.
    use_bias, dtype, param_dtype, kernel_init: as in ``flax.linen``.
    t5_num_buckets, t5_max_distance, rope_base: positional options.
    logits_soft_cap: ``None`` or ``c > 0``: scores become
      ``c·tanh(scores / c)`` (Gemma 2) inside the kernel; kernels that
      cannot cap raise ``ValueError``.

  Kernels that take an ``rng`` (random features, sampling) get one from the
  ``"attention"`` rng stream when ``deterministic=False`` and that stream is
  given, else ``None`` (deterministic). Variant parameters declared by the
  registry (``attention_param_shapes``) are created as ``attn_<name>``.
  When the ``'intermediates'`` collection is mutable, kernels that can return
  their weights sow them as ``intermediates/.../attention_weights``
  (``[B, N, T, S]``).
  """
  num_heads: int
  num_kv_heads: Optional[int] = None
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  attention: Union[str, Callable[..., Array]] = "softmax"
  positional: str = "none"
  causal: bool = False
  dropout_rate: float = 0.0
  decode: bool = False
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.linear.default_kernel_init
  t5_num_buckets: int = 32
  t5_max_distance: int = 128
  rope_base: float = 10000.0
  logits_soft_cap: Optional[float] = None

  def _head_dims(self, width: int) -> tuple[int, int, int]:
    """``(N, K, H)`` validated against the projection width."""
    features = self.qkv_features or width
    kv_heads = self.num_kv_heads or self.num_heads
    if features % self.num_heads:
      raise ValueError(f"qkv_features={features} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={kv_heads}")
    return self.num_heads, kv_heads, features // self.num_heads

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None, *,
               mask: Optional[Array] = None, bias: Optional[Array] = None,
               query_seq_lengths: Optional[Array] = None,
               key_value_seq_lengths: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Attends ``inputs_q[B, T, D]`` to ``inputs_kv[B, S, D']`` (default self).

    Args:
      inputs_q: ``[B, T, D]``.
      inputs_kv: ``[B, S, D']`` for cross-attention; ``None`` = self.
      mask: boolean, True = may attend, broadcastable to ``[B, N, T, S]``
        (a key-padding mask is ``[B, 1, 1, S]``).
      bias: added to the scores, broadcastable to ``[B, N, T, S]``.
      query_seq_lengths / key_value_seq_lengths: int ``[B]`` valid lengths.
      deterministic: no dropout and no attention rng.

    Returns:
      ``[B, T, out_features]`` in ``dtype``.
    """
    resolved = resolve_attention(self.attention)
    self_attention = inputs_kv is None
    padded = (mask is not None or query_seq_lengths is not None
              or key_value_seq_lengths is not None)
    check_support(resolved, causal=self.causal, padding=padded,
                  cross=not self_attention, decode=self.decode)
    if self.decode and not (self.causal and self_attention):
      raise ValueError("decode=True needs causal self-attention "
                       f"(causal={self.causal}, cross-attention="
                       f"{not self_attention})")
    kind = pe.positional_kind(self.positional)
    if inputs_kv is None:
      inputs_kv = inputs_q
    N, K, H = self._head_dims(inputs_q.shape[-1])
    dense = lambda heads, name: nn.DenseGeneral(  # pylint: disable=g-long-lambda
        (heads, H), dtype=self.dtype, param_dtype=self.param_dtype,
        use_bias=self.use_bias, kernel_init=self.kernel_init, name=name)
    query = dense(N, "query")(inputs_q)
    key = dense(K, "key")(inputs_kv)
    value = dense(K, "value")(inputs_kv)
    T = query.shape[1]

    offset = 0
    is_causal = self.causal
    is_initialized = False
    if self.decode:
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape,
                                 key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros,
                                   value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index",
                                  lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        offset = cache_index.value
    if kind == "rotary":
      positions = offset + jnp.arange(T)
      query = pe.apply_rope(query, positions, base=self.rope_base)
      key = pe.apply_rope(key, positions if self_attention
                          else jnp.arange(key.shape[1]), base=self.rope_base)
    if is_initialized:
      max_len = cached_key.value.shape[1]
      start = (0, offset, 0, 0)
      key = jax.lax.dynamic_update_slice(cached_key.value, key, start)
      value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
      cached_key.value, cached_value.value = key, value
      cache_index.value = offset + T
      # New query t sits at position offset + t: it sees the cache up to it.
      visible_TS = (jnp.arange(max_len)[None, :]
                    <= offset + jnp.arange(T)[:, None])
      mask = combine_masks(mask, visible_TS[None, None])
      is_causal = False
    S = key.shape[1]

    if kind == "bias":
      if self.positional == "alibi":
        pos_bias = pe.alibi_bias(N, T, S, causal=self.causal, q_offset=offset)
      else:
        pos_bias = T5RelativeBias(
            N, bidirectional=not self.causal, num_buckets=self.t5_num_buckets,
            max_distance=self.t5_max_distance, name="relative_bias")(
                T, S, q_offset=offset)
      bias = pos_bias if bias is None else bias + pos_bias

    kwargs = {}
    if self.dropout_rate > 0.0 and not deterministic:
      kwargs["dropout_rng"] = self.make_rng("dropout")
    if resolved.takes_rng and not deterministic and self.has_rng("attention"):
      kwargs["rng"] = self.make_rng("attention")
    if resolved.takes_params:
      shapes = registry.attention_param_shapes(resolved.spec, query.shape,
                                               key.shape)
      kwargs["params"] = {
          name: self.param(f"attn_{name}", init, shape, self.param_dtype)
          for name, (shape, init) in shapes.items()}
    if query_seq_lengths is not None:
      kwargs["query_seq_lengths"] = query_seq_lengths
    if key_value_seq_lengths is not None:
      kwargs["key_value_seq_lengths"] = key_value_seq_lengths
    if is_causal:
      kwargs["is_causal"] = True
    if self.is_mutable_collection("intermediates"):
      kwargs["module"] = self
    if self.logits_soft_cap is not None:
      kwargs["logits_soft_cap"] = self.logits_soft_cap
    out = resolved.fn(query, key, value, bias, mask,
                      dropout_rate=self.dropout_rate,
                      deterministic=deterministic, **kwargs)
    features = self.out_features or inputs_q.shape[-1]
    return nn.DenseGeneral(
        features, axis=(-2, -1), dtype=self.dtype,
        param_dtype=self.param_dtype, use_bias=self.use_bias,
        kernel_init=self.kernel_init, name="out")(out)
