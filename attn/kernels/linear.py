"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Replaces ``exp(q·k)`` by a kernel ``φ(q)·φ(k)`` with the positive feature
map ``φ(x) = elu(x) + 1``, so attention factorises::

    out_t = φ(q_t)ᵀ Σ_s φ(k_s) v_sᵀ  /  φ(q_t)ᵀ Σ_s φ(k_s)

:func:`feature_attention_one_head` (shared with the Performer kernel) streams
over chunks of ``c`` tokens with ``jax.lax.scan``: bidirectional, one scan
accumulates the state ``Σ φ(k) vᵀ [M, Dv]`` and then the queries are mapped
chunk by chunk; causal, one scan carries the state of all previous chunks
and adds the masked ``[c, c]`` product inside the chunk. Time ``O(T)``,
memory ``O(T)`` in the length, and the working set of a step does not grow
with ``T``. The registered kernels run both cases as
:func:`feature_attention_noncausal` and :func:`feature_attention_causal`:
the same loops over the ``[B, T, N, H]`` layout itself (no per-head copies
of q, k and v; the feature map still sees one head's chunk), which keeps
the time linear in T on a CPU whose caches the per-head copies outgrow.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import einops
import jax
import jax.numpy as jnp

from attn.kernels import blocks, canonical
from attn.masks import MASK_VALUE
from attn import registry
from attn.registry import register_attention

Array = jax.Array
F32 = jnp.float32


class FeatureMap(NamedTuple):
  """A positive feature map ``φ`` for kernelised attention (one head).

  Attributes:
    query: ``q_cH -> φ(q) [c, M]`` (float32, >= 0). A positive factor per
      row cancels in the attention ratio.
    key: ``(k_cH, valid_c, stab) -> φ(k) [c, M]`` (float32, >= 0), zero rows
      where ``valid_c`` is False. ``stab`` is a running stabiliser: features
      of the form ``exp(l - stab)`` use it, others ignore it.
    key_max: ``(k_cH, valid_c) -> scalar``: the largest ``l`` over valid
      keys of the chunk (``MASK_VALUE`` if none), or a constant for feature
      maps that need no stabiliser.
  """
  query: Callable[[Array], Array]
  key: Callable[[Array, Array, Array], Array]
  key_max: Callable[[Array, Array], Array]


def elu_feature_map(x: Array) -> Array:
  """``φ(x) = elu(x) + 1`` in float32 (strictly positive), elementwise:
  ``x [c, H]`` -> ``[c, H]`` (the feature dim ``M`` equals ``H``)."""
  return jax.nn.elu(x.astype(F32)) + 1.0


ELU_FEATURES = FeatureMap(
    query=elu_feature_map,
    key=lambda k, valid, stab: jnp.where(valid[:, None], elu_feature_map(k),
                                         0.0),
    key_max=lambda k, valid: jnp.zeros((), F32))


def _safe_divide(num: Array, den: Array) -> Array:
  """``num / den[..., None]``, zero (with finite gradients) where den == 0."""
  ok = den > 0
  return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0)


def feature_attention_one_head(q_TH: Array, k_SH: Array, v_SD: Array,
                               kv_valid_S: Optional[Array],
                               features: FeatureMap, *, is_causal: bool,
                               chunk_size: int) -> Array:
  """Normalised kernel attention ``φ(Q) φ(K)ᵀ V / φ(Q) φ(K)ᵀ 1``, one head.

  The registered kernels run :func:`feature_attention_noncausal` and
  :func:`feature_attention_causal` instead (all heads at once over the
  native layout); the tests check both against this one-head form.

  Args:
    q_TH: ``[T, H]``; k_SH: ``[S, H]``; v_SD: ``[S, Dv]``.
    kv_valid_S: bool ``[S]`` or ``None``; invalid keys are never attended.
    features: the feature map ``φ``.
    is_causal: sums only over ``s <= t`` (needs ``S == T``).
    chunk_size: tokens per scan step ``c``. Time ``O(T·M·(H + Dv + c))``,
      memory ``O(T·Dv + c·(M + c))`` forward.

  Returns:
    ``[T, Dv]`` float32; zeros for a query whose normaliser is 0.

  Keys are absorbed chunk by chunk into ``state = (Σ φ(k) vᵀ, Σ φ(k))``
  scaled by ``exp(-m)`` for the running stabiliser ``m``; when a chunk
  raises ``m`` the state is rescaled, as in online softmax.
  """
  T, S, Dv = q_TH.shape[0], k_SH.shape[0], v_SD.shape[-1]
  if is_causal and S != T:
    raise ValueError(f"causal feature attention needs S == T, got S={S}, "
                     f"T={T}")
  c = max(1, min(chunk_size, max(T, S)))
  n_q, n_k = -(-T // c), -(-S // c)
  chunks = lambda x, n, fill=0: blocks.to_blocks(x, c, fill, num_blocks=n)
  valid = jnp.ones((S,), bool) if kv_valid_S is None else kv_valid_S
  k_ncH, v_ncD = chunks(k_SH, n_k), chunks(v_SD.astype(F32), n_k)
  ok_nc = chunks(valid, n_k, False)
  M = features.query(q_TH[:1]).shape[-1]
  init = (jnp.zeros((M, Dv), F32), jnp.zeros((M,), F32),
          jnp.asarray(MASK_VALUE, F32))

  def absorb(state, k_cH, ok_c):
    """Rescales the state to the new stabiliser; returns it and φ(k)."""
    kv_MD, z_M, m = state
    m_new = jax.lax.stop_gradient(
        jnp.maximum(m, features.key_max(k_cH, ok_c)))
    rescale = jnp.exp(m - m_new)
    phi_k = features.key(k_cH, ok_c, m_new)
    return kv_MD * rescale, z_M * rescale, m_new, phi_k

  if not is_causal:
    def add_keys(state, xs):
      kv_MD, z_M, m, phi_k = absorb(state, *xs[:2])
      return (kv_MD + phi_k.T @ xs[2], z_M + jnp.sum(phi_k, axis=0), m), None

    (kv_MD, z_M, _), _ = jax.lax.scan(add_keys, init, (k_ncH, ok_nc, v_ncD))

    def read(q_cH):
      phi_q = features.query(q_cH)
      return _safe_divide(phi_q @ kv_MD, phi_q @ z_M)

    return blocks.from_blocks(jax.lax.map(read, chunks(q_TH, n_q)), T)

  tril_cc = jnp.tril(jnp.ones((c, c), bool))

  def step(state, xs):
    q_cH, k_cH, ok_c, v_cD = xs
    kv_MD, z_M, m, phi_k = absorb(state, k_cH, ok_c)
    phi_q = features.query(q_cH)
    w_cc = jnp.where(tril_cc, phi_q @ phi_k.T, 0.0)
    num = phi_q @ kv_MD + w_cc @ v_cD
    den = phi_q @ z_M + jnp.sum(w_cc, axis=-1)
    new_state = (kv_MD + phi_k.T @ v_cD, z_M + jnp.sum(phi_k, axis=0), m)
    return new_state, _safe_divide(num, den)

  _, out = jax.lax.scan(step, init, (chunks(q_TH, n_q), k_ncH, ok_nc, v_ncD))
  return blocks.from_blocks(out, T)


def _pad_length(x: Array, n: int, fill=0) -> Array:
  """Pads the length axis (1) of ``x[B, L, ...]`` to ``n`` with ``fill``."""
  widths = [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, widths, constant_values=fill)


def feature_attention_noncausal(q: Array, k: Array, v: Array,
                                kv_valid: Optional[Array],
                                features: FeatureMap, *,
                                chunk_size: int) -> Array:
  """Non-causal :func:`feature_attention_one_head` for all heads at once.

  Same result, but the chunk loops walk the ``[B, T, N, H]`` layout
  directly (``dynamic_slice`` along the length axis) instead of ``vmap``
  per head: a per-head ``vmap`` around a ``scan`` first copies q, k and v
  into head-major layout, copies that stop fitting in cache as T grows.
  The feature map still sees one head's ``[c, H]`` chunk at a time.

  Args:
    q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Dv]``, with
      ``N % K == 0`` (query head ``n`` uses key head ``n // (N // K)``).
    kv_valid: bool ``[B, S]`` or None.
    features: the feature map ``φ``.
    chunk_size: rows per loop step ``c``.

  Returns:
    float32 ``[B, T, N, Dv]``; zeros for a query whose normaliser is 0.
  """
  B, T, N, H = q.shape
  S, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
  if T == 0:
    return jnp.zeros((B, 0, N, Dv), F32)
  c_k, c_q = max(1, min(chunk_size, S)), max(1, min(chunk_size, T))
  n_k, n_q = -(-S // c_k), -(-T // c_q)
  valid = jnp.ones((B, S), bool) if kv_valid is None else kv_valid
  k, v = _pad_length(k, n_k * c_k), _pad_length(v.astype(F32), n_k * c_k)
  valid = _pad_length(valid, n_k * c_k, False)
  M = features.query(q[0, :1, 0]).shape[-1]
  # per (b, kv head): k chunk [c, H] at axis 1 of [B, c, K, H].
  key_max = jax.vmap(jax.vmap(features.key_max, in_axes=(1, None)),
                     in_axes=(0, 0))
  key_phi = jax.vmap(jax.vmap(features.key, in_axes=(1, None, 0),
                              out_axes=1), in_axes=(0, 0, 0))

  def add_keys(i, state):
    kv_BKMD, z_BKM, m_BK = state
    k_c = jax.lax.dynamic_slice_in_dim(k, i * c_k, c_k, axis=1)
    v_c = jax.lax.dynamic_slice_in_dim(v, i * c_k, c_k, axis=1)
    ok_c = jax.lax.dynamic_slice_in_dim(valid, i * c_k, c_k, axis=1)
    m_new = jax.lax.stop_gradient(jnp.maximum(m_BK, key_max(k_c, ok_c)))
    rescale = jnp.exp(m_BK - m_new)
    phi = key_phi(k_c, ok_c, m_new)                       # [B, c, K, M]
    kv_BKMD = (kv_BKMD * rescale[..., None, None]
               + jnp.einsum("bckm,bckd->bkmd", phi, v_c))
    z_BKM = z_BKM * rescale[..., None] + jnp.sum(phi, axis=1)
    return kv_BKMD, z_BKM, m_new

  init = (jnp.zeros((B, K, M, Dv), F32), jnp.zeros((B, K, M), F32),
          jnp.full((B, K), MASK_VALUE, F32))
  kv_BKMD, z_BKM, _ = jax.lax.fori_loop(0, n_k, add_keys, init)

  q = einops.rearrange(_pad_length(q, n_q * c_q), "b t (k g) h -> b t k g h",
                       k=K)
  # per (b, kv head, group member): q chunk [c, H] of [B, c, K, G, H].
  query_phi = jax.vmap(jax.vmap(jax.vmap(features.query, in_axes=1,
                                         out_axes=1), in_axes=1, out_axes=1))

  def read(i):
    q_c = jax.lax.dynamic_slice_in_dim(q, i * c_q, c_q, axis=1)
    phi_q = query_phi(q_c)                                # [B, c, K, G, M]
    num = jnp.einsum("bckgm,bkmd->bckgd", phi_q, kv_BKMD)
    den = jnp.einsum("bckgm,bkm->bckg", phi_q, z_BKM)
    return einops.rearrange(_safe_divide(num, den),
                            "b c k g d -> b c (k g) d")

  out = jax.lax.map(read, jnp.arange(n_q))               # [n_q, B, c, N, Dv]
  out = einops.rearrange(out, "i b c n d -> b (i c) n d")
  return out[:, :T]


def feature_attention_causal(q: Array, k: Array, v: Array,
                             kv_valid: Optional[Array],
                             features: FeatureMap, *,
                             chunk_size: int) -> Array:
  """Causal :func:`feature_attention_one_head` for all heads at once.

  Same numerics as the one-head causal scan (chunk ``i`` first raises the
  running stabiliser to the largest key logit of the chunk and rescales the
  state, then adds the ``[c, c]`` lower-triangular in-chunk products to the
  state of chunks ``< i``), but the loop walks the ``[B, T, N, H]`` layout
  directly (``dynamic_slice`` along the length axis), so q, k and v are
  never copied into head-major layout as a whole (a per-head ``vmap``
  around the ``scan`` does that); only each step's ``[B, c, N, H]`` chunk
  is rearranged, in cache. The feature map still sees one head's
  ``[c, H]`` chunk at a time; key features are computed once per key/value
  head and shared by its ``G`` query heads.

  Args:
    q: ``[B, T, N, H]``; k: ``[B, T, K, H]``; v: ``[B, T, K, Dv]`` (keys
      already aligned to the query positions, see
      :func:`attn.kernels.blocks.align_keys`), ``N % K == 0`` (query head
      ``n`` uses key head ``n // (N // K)``).
    kv_valid: bool ``[B, T]`` or None; invalid keys are never attended.
    features: the feature map ``φ``.
    chunk_size: rows per loop step ``c``.

  Returns:
    float32 ``[B, T, N, Dv]``: ``out_t = Σ_{s<=t} φ(q_t)·φ(k_s) v_s /
    Σ_{s<=t} φ(q_t)·φ(k_s)``; zeros for a query whose normaliser is 0.
  """
  B, T, N, H = q.shape
  S, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
  if S != T:
    raise ValueError(f"causal feature attention needs S == T, got S={S}, "
                     f"T={T}")
  if T == 0:
    return jnp.zeros((B, 0, N, Dv), F32)
  c = max(1, min(chunk_size, T))
  n = -(-T // c)
  q, k, v = (_pad_length(x, n * c) for x in (q, k, v.astype(F32)))
  if kv_valid is None and n * c == T:
    # All keys valid: a constant per step, so XLA can drop the masking
    # (padded keys, when T % c != 0, must stay masked: they could move the
    # stabiliser of the last chunk).
    chunk_valid = lambda i: jnp.ones((B, c), bool)
  else:
    valid = jnp.ones((B, T), bool) if kv_valid is None else kv_valid
    valid = _pad_length(valid, n * c, False)
    chunk_valid = lambda i: jax.lax.dynamic_slice_in_dim(valid, i * c, c,
                                                         axis=1)
  M = features.query(q[0, :1, 0]).shape[-1]
  # One head's [c, H] chunk per call, over the leading (b, k[, g]) axes of
  # the head-major chunk.
  key_max = jax.vmap(jax.vmap(features.key_max, in_axes=(0, None)))
  key_phi = jax.vmap(jax.vmap(features.key, in_axes=(0, None, 0)))
  query_phi = jax.vmap(jax.vmap(jax.vmap(features.query)))
  tril_cc = jnp.tril(jnp.ones((c, c), bool))

  def step(state, i):
    kv_BKMD, z_BKM, m_BK = state
    chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
    # Only the [c]-row chunk is transposed to head-major (it stays in
    # cache), so every einsum below has its batch axes leading.
    q_BKGcH = einops.rearrange(chunk(q), "b c (k g) h -> b k g c h", k=K)
    k_BKcH = einops.rearrange(chunk(k), "b c k h -> b k c h")
    v_BKcD = einops.rearrange(chunk(v), "b c k d -> b k c d")
    ok_Bc = chunk_valid(i)
    m_new = jax.lax.stop_gradient(jnp.maximum(m_BK, key_max(k_BKcH, ok_Bc)))
    rescale = jnp.exp(m_BK - m_new)
    kv_BKMD = kv_BKMD * rescale[..., None, None]
    z_BKM = z_BKM * rescale[..., None]
    phi_k = key_phi(k_BKcH, ok_Bc, m_new)                 # [B, K, c, M]
    phi_q = query_phi(q_BKGcH)                            # [B, K, G, c, M]
    w = jnp.where(tril_cc, jnp.einsum("bkgtm,bksm->bkgts", phi_q, phi_k),
                  0.0)                                    # [B, K, G, c, c]
    num = (jnp.einsum("bkgtm,bkmd->bkgtd", phi_q, kv_BKMD)
           + jnp.einsum("bkgts,bksd->bkgtd", w, v_BKcD))
    den = jnp.einsum("bkgtm,bkm->bkgt", phi_q, z_BKM) + jnp.sum(w, axis=-1)
    # φ(k)ᵀ v with φ(k) transposed first: XLA's CPU backend then runs it
    # as its fast batched matmul; contracting φ(k)'s row axis directly
    # compiled to a slower generic dot (performer measurably slower).
    phi_k_BKMc = jnp.swapaxes(phi_k, -1, -2)
    new_state = (kv_BKMD + jnp.einsum("bkms,bksd->bkmd", phi_k_BKMc, v_BKcD),
                 z_BKM + jnp.sum(phi_k, axis=2), m_new)
    return new_state, einops.rearrange(_safe_divide(num, den),
                                       "b k g c d -> b c (k g) d")

  init = (jnp.zeros((B, K, M, Dv), F32), jnp.zeros((B, K, M), F32),
          jnp.full((B, K), MASK_VALUE, F32))
  _, out = jax.lax.scan(step, init, jnp.arange(n))        # [n, B, c, N, Dv]
  out = einops.rearrange(out, "i b c n d -> b (i c) n d")
  return out[:, :T]


def kernelized_attention(name: str, inputs: canonical.AttentionInputs,
                         features: FeatureMap, *, chunk_size: int) -> Array:
  """Runs feature attention for validated inputs, handling masks and GQA.

  Args:
    name: variant name for error messages.
    inputs: canonical inputs (bias / segment ids already rejected).
    features: the feature map ``φ``.
    chunk_size: tokens per scan step.

  Returns:
    ``[B, T, N, Dv]`` (or ``[T, N, Dv]``) in the input dtype.
  """
  if chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
  empty = blocks.no_keys_output(inputs)
  if empty is not None:
    return empty
  q_valid, kv_valid = blocks.validity(name, inputs)
  if not inputs.is_causal:
    out = feature_attention_noncausal(inputs.query, inputs.key, inputs.value,
                                      kv_valid, features,
                                      chunk_size=chunk_size)
    return blocks.finish(out, inputs, q_valid)
  key, value, kv_valid = blocks.align_keys(inputs.key, inputs.value, kv_valid,
                                           inputs.query.shape[1])
  out = feature_attention_causal(inputs.query, key, value, kv_valid, features,
                                 chunk_size=chunk_size)
  return blocks.finish(out, inputs, q_valid)


@register_attention(
    "linear", exact=False, causal=True, padding=True, cross=True,
    complexity="time O((T+S)·H·Dv) (causal: O(T·(c+H)·Dv)), memory O(T+S)",
    description="linear attention with feature map elu(x)+1 "
    "(Katharopoulos et al. 2020); causal via a chunked scan of prefix sums")
def linear_attention(query, key, value, bias=None, mask=None, *,
                     chunk_size: int = 128, is_causal: bool = False,
                     query_seq_lengths=None, key_value_seq_lengths=None,
                     segment_ids=None):
  """Katharopoulos linear attention, ``φ(x) = elu(x) + 1``.

  Approximates softmax attention by replacing ``exp(q·k/√H)`` with
  ``φ(q)·φ(k)`` (a different, positive similarity; there is no budget that
  makes it exact). ``out_t = φ(q_t)ᵀ Σ_s φ(k_s) v_sᵀ / φ(q_t)ᵀ Σ_s φ(k_s)``.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``, ``N % K == 0`` (GQA).
    value: ``[B, S, K, Dv]``.
    bias: not supported (``ValueError``).
    mask: padding mask ``[B, 1, 1, S]`` / ``[B, 1, T, 1]`` only.
    chunk_size: option, tokens per scan step ``c``.
    is_causal: sum over ``s <= t`` (absolute positions; for ``S != T`` the
      keys are padded/truncated to ``T``).
    query_seq_lengths / key_value_seq_lengths: int ``[B]``.
    segment_ids: not supported (``ValueError``).

  Returns:
    ``[B, T, N, Dv]`` in the input dtype; computed in float32. Time
    ``O(B·N·(T+S)·H·Dv)`` (causal adds ``O(B·N·T·c·(H+Dv))`` for the
    in-chunk products), memory ``O(B·N·(T+S)·(H+Dv))``. Queries with no valid
    key output zeros.
  """
  registry.check_options(
      "linear", chunk_size=chunk_size)
  inputs = canonical.canonicalize(
      query, key, value, bias, mask, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids)
  blocks.check_supported("linear", inputs, causal=True, segments=False)
  return kernelized_attention("linear", inputs, ELU_FEATURES,
                              chunk_size=chunk_size)
