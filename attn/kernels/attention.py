"""``attn.dot_product_attention``: the public exact-attention entry point."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from attn.kernels import canonical
from attn.kernels.exact import xla_attention

Array = jax.Array

IMPLEMENTATIONS = ("xla", "chunked", "cudnn")
# `implementation=None` switches to the blockwise kernel from this many keys
# on (see the README's benchmark table for where it starts to win).
CHUNKED_MIN_LENGTH = 1024


def _cudnn(inputs: canonical.AttentionInputs, *, dropout_rate, return_weights,
           **_):
  """Delegates to jax.nn's cuDNN flash attention, or raises ValueError."""
  platform = jax.devices()[0].platform
  if platform != "gpu":
    raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU; the "
                     f"default device here is {platform!r}")
  B, T, S, N, K, H, Dv = inputs.shape
  unsupported = []
  if inputs.q_segment_ids is not None:
    unsupported.append("segment_ids")
  if dropout_rate > 0:
    unsupported.append("dropout")
  if return_weights:
    unsupported.append("return_weights")
  if Dv != H:
    unsupported.append(f"value head_dim {Dv} != query head_dim {H}")
  if inputs.query.dtype not in (jnp.bfloat16, jnp.float16):
    unsupported.append(f"dtype {inputs.query.dtype} (cuDNN needs bf16/fp16)")
  if unsupported:
    raise ValueError("implementation='cudnn' does not support: "
                     + ", ".join(unsupported))
  try:
    return jax.nn.dot_product_attention(
        inputs.query, inputs.key, inputs.value, bias=inputs.bias,
        mask=inputs.mask, scale=inputs.scale, is_causal=inputs.is_causal,
        query_seq_lengths=inputs.q_lengths,
        key_value_seq_lengths=inputs.kv_lengths,
        local_window_size=inputs.window, implementation="cudnn")
  except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
    raise ValueError(f"implementation='cudnn' is unavailable: {e}") from e


def _chunked(inputs: canonical.AttentionInputs, *, dropout_rate, return_weights,
             block_q=None, block_k=None, **_):
  """Blockwise online-softmax kernel; no dropout, no weights."""
  if dropout_rate > 0:
    raise ValueError("implementation='chunked' does not support dropout on "
                     "attention weights; use implementation='xla'")
  if return_weights:
    raise ValueError("implementation='chunked' never materialises the "
                     "weights; use implementation='xla' with "
                     "return_weights=True")
  # Lazy import: attn.kernels.chunked may itself import this module.
  from attn.kernels.chunked import chunked_attention  # pylint: disable=g-import-not-at-top
  return chunked_attention(inputs, block_q=block_q, block_k=block_k)


def _xla(inputs, *, dropout_rate, dropout_rng, broadcast_dropout,
         return_weights, **_):
  """Materialised-scores kernel; supports every option."""
  return xla_attention(inputs, dropout_rate=dropout_rate,
                       dropout_rng=dropout_rng,
                       broadcast_dropout=broadcast_dropout,
                       return_weights=return_weights)


_DISPATCH = {"xla": _xla, "chunked": _chunked, "cudnn": _cudnn}


def auto_implementations(inputs: canonical.AttentionInputs, *, dropout_rate,
                         return_weights) -> list[str]:
  """The order ``implementation=None`` tries: cuDNN on GPU, then ours."""
  order = []
  if jax.devices()[0].platform == "gpu":
    order.append("cudnn")
  B, T, S, *_ = inputs.shape
  if (S >= CHUNKED_MIN_LENGTH and T >= 128 and dropout_rate == 0
      and not return_weights):
    order.append("chunked")
  order.append("xla")
  return order


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    query_seq_lengths: Optional[Array] = None,
    key_value_seq_lengths: Optional[Array] = None,
    local_window_size: Union[int, tuple[int, int], None] = None,
    segment_ids=None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[Array] = None,
    broadcast_dropout: bool = False,
    return_weights: bool = False,
    implementation: Union[str, Sequence[str], None] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
):
  """Exact scaled dot-product attention, a superset of ``jax.nn``'s.

  ``out = softmax(scale · q kᵀ + bias, masked) v`` for each head.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]`` with ``N % K == 0`` (GQA/MQA when ``K < N``).
    value: ``[B, S, K, Dv]``; ``Dv`` may differ from ``H``.
    bias: added to the scores; any rank <= 4 broadcastable to ``[B,N,T,S]``.
    mask: boolean, True = may attend; broadcastable to ``[B, N, T, S]``.
    scale: defaults to ``1/sqrt(H)``.
    is_causal: query ``t`` attends keys ``s <= t``.
    query_seq_lengths: int32 ``[B]``; queries past it output zeros.
    key_value_seq_lengths: int32 ``[B]``; keys past it are ignored.
    local_window_size: ``w`` or ``(left, right)``: ``t-left <= s <= t+right``.
    segment_ids: int ``[B, T]`` (self-attention) or a pair ``([B,T], [B,S])``;
      tokens attend only within their own segment (packed sequences).
    dropout_rate: dropout on the attention weights (``xla`` only).
    dropout_rng: PRNG key, required when ``dropout_rate > 0``.
    broadcast_dropout: share the dropout mask across batch and heads.
    return_weights: also return the (pre-dropout) weights ``[B, N, T, S]``.
    implementation: ``"xla"`` (materialised scores), ``"chunked"``
      (blockwise online softmax, O(T) memory), ``"cudnn"`` (jax.nn's cuDNN
      kernel, GPU only), ``None`` (automatic) or a sequence tried in order.
    block_q / block_k: block sizes for ``"chunked"``.

  Returns:
    ``[B, T, N, Dv]`` in the input dtype, or ``(out, weights)``.

  A query row with no key to attend to returns zeros (jax.nn returns the
  mean of the values there) and has zero, finite gradients. Softmax is always
  computed in float32.

  Raises:
    ValueError: bad shapes/dtypes, unknown implementation names, or an
      implementation that cannot serve the requested options.
  """
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  canonical.check_dropout(dropout_rate, dropout_rng)
  if implementation is None:
    order = auto_implementations(inputs, dropout_rate=dropout_rate,
                                 return_weights=return_weights)
  elif isinstance(implementation, str):
    order = [implementation]
  else:
    order = list(implementation)
  unknown = [name for name in order if name not in _DISPATCH]
  if not order or unknown:
    raise ValueError(f"unknown implementation(s) {unknown or order!r}; choose "
                     f"from {IMPLEMENTATIONS}, None, or a non-empty list of "
                     "them")
  errors = []
  for name in order:
    try:
      result = _DISPATCH[name](
          inputs, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
          broadcast_dropout=broadcast_dropout, return_weights=return_weights,
          block_q=block_q, block_k=block_k)
    except ValueError as e:
      if len(order) == 1:
        raise
      errors.append(f"{name}: {e}")
      continue
    if inputs.squeeze_batch:
      return (result[0][0], result[1][0]) if return_weights else result[0]
    return result
  raise ValueError("no attention implementation could run: "
                   + "; ".join(errors))
