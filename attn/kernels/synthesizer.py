"""Synthesizer attention (Tay et al. 2021): weights without query-key dots.

* ``kind="dense"``: each query position predicts its own row of logits with
  a two-layer MLP, ``B_t = W2ᵀ relu(W1ᵀ x_t + b1) + b2`` (``x_t`` the query
  vector of the head), ``W1 [H, hidden]``, ``W2 [hidden, S_max]`` shared by
  the heads.
* ``kind="random"``: the logits are a ``[T_max, S_max]`` table per head,
  learned (``trainable=True``) or fixed at its random initialisation
  (``trainable=False``: the kernel stops its gradient).

The output is ``softmax(B + bias, masked) v``; the keys are not read (only
their length). The tables are sliced to the actual ``[T, S]``; sequences
longer than the parameters raise ``ValueError``. Time and memory are
``O(T·S)`` like exact attention, so any bias and mask is honoured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.masks import masked_softmax
from attn.kernels import blocks, canonical
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32
KINDS = ("dense", "random")


def synthesizer_param_shapes(query_shape, key_shape, *, kind: str = "dense",
                             hidden: int = 64, **unused_options):
  """Parameters of the synthesizer for ``query [B, T, N, H]``, ``key
  [B, S, K, H]``: dense ``w1 [H, hidden], b1 [hidden], w2 [hidden, S],
  b2 [S]``; random ``table [N, T, S]`` (``T``, ``S`` are the maxima)."""
  registry.check_options(
      "synthesizer", kind=kind, hidden=hidden)
  del unused_options
  _, T, N, H = query_shape
  S = max(1, key_shape[1])   # S == 0: one unused key column
  init = jax.nn.initializers
  if kind == "dense":
    return {"w1": ((H, hidden), init.lecun_normal()),
            "b1": ((hidden,), init.zeros),
            "w2": ((hidden, S), init.lecun_normal()),
            "b2": ((S,), init.zeros)}
  if kind == "random":
    return {"table": ((N, T, S), init.normal(1.0))}
  raise ValueError(f"synthesizer: unknown kind {kind!r}; choose from {KINDS}")


def _check_params(params, kind: str, T: int, S: int, N: int):
  want = {"dense": ("w1", "b1", "w2", "b2"), "random": ("table",)}[kind]
  if params is None or any(name not in params for name in want):
    raise ValueError(
        f"synthesizer(kind={kind!r}) needs params {list(want)}, got "
        f"{None if params is None else sorted(params)}; create them from "
        "attn.registry.attention_param_shapes")
  if kind == "dense":
    have = params["w2"].shape[-1]
  else:
    table = params["table"]
    if table.ndim != 3 or table.shape[0] != N or table.shape[1] < T:
      raise ValueError(f"synthesizer: table must be [N={N}, T_max>={T}, "
                       f"S_max], got {table.shape}")
    have = table.shape[2]
  if have < S:
    raise ValueError(f"synthesizer: parameters cover {have} keys but the key "
                     f"length is {S}; create them for the longest sequence")


def _dense_logits_TS(x_TH, w1, b1, w2, b2, S) -> Array:
  """``relu(x W1 + b1) W2[:, :S] + b2[:S]`` in float32."""
  hidden_TA = jax.nn.relu(
      jnp.einsum("th,ha->ta", x_TH, w1.astype(x_TH.dtype),
                 preferred_element_type=F32) + b1.astype(F32))
  return (jnp.einsum("ta,as->ts", hidden_TA, w2[:, :S].astype(F32))
          + b2[:S].astype(F32))


@register_attention(
    "synthesizer", exact=False, causal=True, padding=True, cross=True,
    complexity="time O(T·hidden·(H + S)) dense / O(T·S) random, "
    "memory O(T·S)",
    description="Synthesizer: attention logits from an MLP of each query "
    "(dense) or a per-head table (random), no query-key dots",
    metadata={"param_shapes": synthesizer_param_shapes},
    option_rules={
        "kind": registry.choice_option(*KINDS),
        "hidden": registry.int_option(1),
        "trainable": registry.bool_option()})
def synthesizer_attention(query, key, value, bias=None, mask=None, *,
                          kind: str = "dense", hidden: int = 64,
                          trainable: bool = True, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None,
                          segment_ids=None, local_window_size=None,
                          params=None):
  """Synthesizer attention: ``softmax(B + bias, masked) v``.

  Args:
    query: ``[B, T, N, H]`` (the input of the dense MLP).
    key: ``[B, S, K, H]``; only its length ``S`` is used.
    value: ``[B, S, K, Dv]``, ``N % K == 0`` (kv heads are shared).
    bias, mask, is_causal, query_seq_lengths, key_value_seq_lengths,
      segment_ids, local_window_size: as in :func:`attn.dot_product_attention`.
    kind: ``"dense"`` (``B_t = MLP(q_t)``) or ``"random"`` (``B`` a table).
    hidden: MLP width (dense; sets the parameter shapes).
    trainable: random kind only; False stops the table's gradient.
    params: from :func:`synthesizer_param_shapes`: dense ``w1 [H, hidden],
      b1 [hidden], w2 [hidden, S_max], b2 [S_max]``; random
      ``table [N, T_max, S_max]``.

  Returns:
    ``[B, T, N, Dv]``. Time ``O(T·hidden·(H+S))`` (dense) or ``O(T·S)``
    (random), memory ``O(T·S)`` per head.
  """
  registry.check_options(
      "synthesizer", kind=kind, hidden=hidden, trainable=trainable)
  if kind not in KINDS:
    raise ValueError(f"synthesizer: unknown kind {kind!r}; choose from "
                     f"{KINDS}")
  del hidden  # sets the parameter shapes only
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids)
  q_valid, _ = blocks.lengths_valid(inputs)
  bias_BNTS, mask_BNTS = blocks.dense_masks(inputs)
  B, T, S, N, *_ = inputs.shape
  _check_params(params, kind, T, S, N)

  if kind == "dense":
    def logits_fn(q_TH, table_TS):
      del table_TS
      return _dense_logits_TS(q_TH, params["w1"], params["b1"], params["w2"],
                              params["b2"], S)
    table = None
  else:
    table = params["table"][:, :T, :S].astype(F32)
    if not trainable:
      table = jax.lax.stop_gradient(table)
    table = jnp.broadcast_to(table[None], (B, N, T, S))

    def logits_fn(q_TH, table_TS):
      del q_TH
      return table_TS

  def one_head(q_TH, k_SH, v_SD, table_TS, bias_TS, mask_TS):
    del k_SH  # only its length S matters
    logits_TS = logits_fn(q_TH, table_TS)
    if bias_TS is not None:
      logits_TS = logits_TS + bias_TS
    w_TS = masked_softmax(logits_TS, mask_TS)
    return jnp.einsum("ts,sd->td", w_TS.astype(v_SD.dtype), v_SD,
                      preferred_element_type=F32)

  out = blocks.map_heads(one_head, inputs.query, inputs.key, inputs.value,
                         per_head=(table, bias_BNTS, mask_BNTS))
  return blocks.finish(out, inputs, q_valid)
