"""Tests for the group-B attention variants: reformer, synthesizer, sinkhorn,
sparse, topk, hard and local_p.

References are independent NumPy float64 implementations (brute-force loops
where the variant's candidate set is data dependent) or exact attention in
the variant's exact limit.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attn
from attn.kernels import reformer as reformer_lib
from attn.registry import attention_param_shapes, get_attention, get_entry

B, T, N, K, H, DV = 2, 16, 4, 2, 8, 6

# Every variant with small options so that the sparsity is real at T=16.
SPECS = [
    "reformer(chunk_size=4, n_buckets=4)",
    "reformer(chunk_size=4, n_buckets=4, shared_qk=True)",
    "synthesizer(hidden=8)",
    "synthesizer(kind='random')",
    "sinkhorn(block_size=4, hidden=8, partners=2)",
    "sparse(stride=4)",
    "sparse(pattern='fixed', stride=4, num_summary=2)",
    "topk(k=3)",
    "hard",
    "local_p(window=3, hidden=8)",
]
# The non-shared reformer refuses is_causal (tested below).
CAUSAL_SPECS = [s for s in SPECS if s != SPECS[0]]


def _inputs(b=B, t=T, s=T, n=N, k=K, h=H, dv=DV, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, h))
  key = rng.normal(size=(b, s, k, h))
  v = rng.normal(size=(b, s, k, dv))
  return tuple(jnp.asarray(x, dtype) for x in (q, key, v))


def _params(spec, q, k):
  return _params_for_shapes(spec, q.shape, k.shape)


@functools.lru_cache(maxsize=None)
def _params_for_shapes(spec, q_shape, k_shape):
  """Random parameters of the registered shapes (NumPy: no compilations)."""
  shapes = attention_param_shapes(spec, q_shape, k_shape)
  if not shapes:
    return None
  rng = np.random.default_rng(42)
  return {name: jnp.asarray(rng.normal(size=shape) * (
      shape[-2] ** -0.5 if len(shape) > 1 else 0.3), jnp.float32)
          for name, (shape, _) in sorted(shapes.items())}


def _split_kwargs(kwargs):
  """Python scalars/None are static (part of the cache key); arrays are not."""
  def is_static(x):
    return x is None or isinstance(x, (bool, int, float))
  static = tuple(sorted((n, x) for n, x in kwargs.items() if is_static(x)))
  arrays = {n: x for n, x in kwargs.items() if not is_static(x)}
  return static, arrays


@functools.lru_cache(maxsize=None)
def _jitted(spec, static, with_grads):
  """One compiled function per configuration: tests reuse compilations."""
  fn = get_attention(spec)

  def forward(q, k, v, arrays):
    return fn(q, k, v, **arrays, **dict(static))

  if not with_grads:
    return jax.jit(forward)

  def loss(q, k, v, arrays):
    out = forward(q, k, v, arrays)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _with_params(spec, q, k, params, kwargs):
  params = _params(spec, q, k) if params is None else params
  return dict(kwargs, params=params) if params is not None else kwargs


def _call(spec, q, k, v, params=None, **kwargs):
  static, arrays = _split_kwargs(_with_params(spec, q, k, params, kwargs))
  return _jitted(spec, static, False)(q, k, v, arrays)


def _call_and_grads(spec, q, k, v, params=None, **kwargs):
  """``(out, (dq, dk, dv))`` of ``sum(out ** 2)``."""
  static, arrays = _split_kwargs(_with_params(spec, q, k, params, kwargs))
  (_, out), grads = _jitted(spec, static, True)(q, k, v, arrays)
  return out, grads


def np_attention(q, k, v, mask=None, bias=None, scale=None):
  """Float64 softmax attention, BTNH, GQA by repetition; empty rows -> 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  if mask is not None:
    s = np.where(mask, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(m), m, 0))
  d = e.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnd->btnd", e / np.where(d == 0, 1, d), v)


def _lengths_mask(lengths, s):
  return (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None, None]


# ---------------------------------------------------------------- contract


def test_all_registered_with_metadata():
  names = attn.list_attention()
  for name in ("reformer", "synthesizer", "sinkhorn", "sparse", "topk",
               "hard", "local_p"):
    assert name in names
    entry = get_entry(name)
    assert not entry.exact and entry.causal and entry.padding and entry.cross
    assert entry.complexity and entry.description
  assert set(attention_param_shapes("sinkhorn", (1, 16, 2, 8),
                                    (1, 16, 2, 8))) == {
                                        "sort_w1", "sort_b1", "sort_w2",
                                        "sort_b2"}
  assert attention_param_shapes("sinkhorn(block_size=4)", (1, 16, 2, 8),
                                (1, 16, 2, 8))["sort_w2"][0] == (64, 4)
  assert attention_param_shapes("local_p(hidden=5)", (1, 16, 2, 8),
                                (1, 9, 2, 8))["w_p"][0] == (8, 5)
  assert attention_param_shapes("synthesizer(kind='random')", (1, 7, 3, 8),
                                (1, 9, 1, 8))["table"][0] == (3, 7, 9)
  # every registered initializer makes an array of its declared shape
  for spec in SPECS:
    for shape, init in attention_param_shapes(spec, (B, T, N, H),
                                              (B, T, K, H)).values():
      made = jax.eval_shape(functools.partial(init, shape=shape),
                            jax.random.PRNGKey(0))
      assert made.shape == tuple(shape)


KV_LENGTHS, Q_LENGTHS = jnp.array([11, 16]), jnp.array([5, 16])


@pytest.mark.parametrize("spec,dtype", [
    (spec, dtype) for spec in SPECS for dtype in (jnp.float32, jnp.bfloat16)
    if dtype == jnp.float32 or "shared_qk" not in spec])  # one bf16 reformer
def test_shape_dtype_finite(spec, dtype):
  q, k, v = _inputs(dtype=dtype)
  out = _call(spec, q, k, v, key_value_seq_lengths=KV_LENGTHS,
              query_seq_lengths=Q_LENGTHS)
  assert out.shape == (B, T, N, DV) and out.dtype == dtype
  assert np.isfinite(np.asarray(out, np.float32)).all()
  if dtype == jnp.bfloat16 and spec.startswith(("sparse", "synthesizer")):
    # no discrete choices: bf16 tracks fp32
    ref = _call(spec, *(x.astype(jnp.float32) for x in (q, k, v)),
                key_value_seq_lengths=KV_LENGTHS, query_seq_lengths=Q_LENGTHS)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


@pytest.mark.parametrize("spec", SPECS)
def test_padding_by_lengths_and_by_mask_agree_and_ignore_padding(spec):
  q, k, v = _inputs()
  kwargs = {"query_seq_lengths": Q_LENGTHS}
  by_len = _call(spec, q, k, v, key_value_seq_lengths=KV_LENGTHS, **kwargs)
  by_mask = _call(spec, q, k, v,
                  mask=jnp.asarray(_lengths_mask(KV_LENGTHS, T)), **kwargs)
  np.testing.assert_allclose(by_len, by_mask, atol=1e-6)
  # queries past their length output zeros
  assert not np.asarray(by_len[0, 5:]).any()
  # whatever sits in the padded key/value slots must not matter
  k2 = k.at[0, 11:].set(100.0)
  v2 = v.at[0, 11:].set(-100.0)
  np.testing.assert_allclose(
      by_len, _call(spec, q, k2, v2, key_value_seq_lengths=KV_LENGTHS,
                    **kwargs), atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_finite_and_no_causal_leak(spec):
  causal = spec in CAUSAL_SPECS
  q, k, v = _inputs(seed=3)
  kwargs = {"is_causal": causal, "key_value_seq_lengths": jnp.array([9, 16])}
  out, grads = _call_and_grads(spec, q, k, v, **kwargs)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads[2])).sum() > 0  # values always matter
  if not causal:
    return
  rng = np.random.default_rng(4)
  for t0 in (0, 6, 11):
    def perturb(x):
      noise = rng.normal(size=x[:, t0 + 1:].shape)
      return x.at[:, t0 + 1:].add(jnp.asarray(noise, x.dtype))
    # shared-QK keys are derived from the queries: perturb those too
    q2 = perturb(q) if "shared_qk" in spec else q
    out2, _ = _call_and_grads(spec, q2, perturb(k), perturb(v), **kwargs)
    np.testing.assert_allclose(out2[:, :t0 + 1], out[:, :t0 + 1], atol=1e-5)
    assert np.abs(np.asarray(out2[:, t0 + 1:] - out[:, t0 + 1:])).max() > 1e-3


@pytest.mark.parametrize("spec", ["reformer", "sinkhorn", "sparse", "local_p"])
def test_subquadratic_variants_reject_what_they_cannot_honour(spec):
  q, k, v = _inputs()
  dense_mask = jnp.asarray(np.tril(np.ones((T, T), bool)))[None, None]
  with pytest.raises(ValueError, match="dense mask"):
    _call(spec, q, k, v, mask=dense_mask)
  with pytest.raises(ValueError, match="bias"):
    _call(spec, q, k, v, bias=jnp.zeros((1, 1, T, T)))
  with pytest.raises(ValueError, match="segment_ids"):
    _call(spec, q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32))
  with pytest.raises(ValueError, match="local_window_size"):
    _call(spec, q, k, v, local_window_size=2)


def test_bad_options_raise_value_error():
  q, k, v = _inputs()
  bad = [
      ("sparse(pattern='diagonal')", {}, "pattern"),
      ("sparse(pattern='fixed', stride=4, num_summary=5)", {}, "num_summary"),
      ("synthesizer(kind='mixture')", {"params": {}}, "kind"),
      ("hard(estimator='reinforce')", {}, "estimator"),
      ("hard(temperature=0.0)", {}, "temperature"),
      ("topk(k=0)", {}, "k must be"),
      ("reformer(n_buckets=3)", {}, "n_buckets"),
      ("reformer", {"is_causal": True}, "shared_qk"),
      ("local_p(window=0)", {}, "window"),
      ("sinkhorn(partners=0)", {}, "partners"),
  ]
  for spec, kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      _call(spec, q, k, v, **kwargs)
  with pytest.raises(ValueError, match="has no option"):
    get_attention("sparse(blocksize=4)")
  for spec in ("synthesizer", "sinkhorn", "local_p"):
    with pytest.raises(ValueError, match="needs params"):
      get_attention(spec)(q, k, v)
  q3, k3, v3 = _inputs(t=8, s=16)
  with pytest.raises(ValueError, match="T == S"):
    _call("sinkhorn(block_size=4)", q3, k3, v3, is_causal=True)
  with pytest.raises(ValueError, match="self-attention"):
    _call("reformer(shared_qk=True)", q3, k3, v3)
  with pytest.raises(ValueError, match="key length"):  # params too small
    _call("synthesizer", *_inputs(s=32), params=_params("synthesizer", q, k))


def test_cross_attention_shapes():
  # (sparse, reformer, local_p and the random synthesizer are checked
  # against references with T != S below)
  q, k, v = _inputs(t=8, s=20, seed=5)
  for spec in ("sinkhorn(block_size=4, hidden=8)", "topk(k=3)", "hard",
               "synthesizer(hidden=8)"):
    out = _call(spec, q, k, v)
    assert out.shape == (B, 8, N, DV)
    assert np.isfinite(np.asarray(out)).all()


def test_drops_into_flax_multihead_attention():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 32)),
                  jnp.float32)
  for spec in ("topk(k=4)",):
    layer = nn.MultiHeadDotProductAttention(
        num_heads=4, attention_fn=get_attention(spec))
    variables = layer.init(jax.random.PRNGKey(0), x)
    out = layer.apply(variables, x)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()


# ---------------------------------------------------------------- sparse


def np_sparse_mask(t, s, pattern, stride, num_summary, causal):
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  if pattern == "strided":
    m = (np.abs(i - j) <= stride) | ((i - j) % stride == 0)
  else:
    m = (i // stride == j // stride) | (j % stride >= stride - num_summary)
  return m & (j <= i) if causal else m


@settings(max_examples=4, deadline=None)
@given(pattern=st.sampled_from(["strided", "fixed"]), causal=st.booleans(),
       t=st.integers(1, 19), s=st.integers(1, 19), stride=st.integers(1, 6),
       summary=st.integers(1, 6), length=st.integers(1, 19))
def test_sparse_equals_exact_attention_under_its_pattern(
    pattern, causal, t, s, stride, summary, length):
  summary = min(summary, stride)
  length = min(length, s)
  q, k, v = _inputs(t=t, s=s, seed=t * 100 + s)
  out = _call(f"sparse(pattern={pattern!r}, stride={stride}, "
              f"num_summary={summary})", q, k, v, is_causal=causal,
              key_value_seq_lengths=jnp.array([length, s]))
  mask = np_sparse_mask(t, s, pattern, stride, summary, causal)[None, None]
  mask = mask & _lengths_mask([length, s], s)
  np.testing.assert_allclose(out, np_attention(q, k, v, mask), atol=2e-5)


# ---------------------------------------------------------------- topk / hard


def test_topk_with_k_at_least_s_is_exact_attention():
  q, k, v = _inputs(seed=6)
  rng = np.random.default_rng(7)
  bias = rng.normal(size=(1, N, T, T))
  mask = rng.random((B, 1, T, T)) < 0.7
  for kwargs, m in (({}, None), ({"is_causal": True},
                                 np.tril(np.ones((T, T), bool)))):
    for kk in (T, T + 5):
      out = _call(f"topk(k={kk})", q, k, v, bias=jnp.asarray(bias),
                  mask=jnp.asarray(mask), **kwargs)
      full = mask if m is None else mask & m
      np.testing.assert_allclose(out, np_attention(q, k, v, full, bias),
                                 atol=2e-5)


def test_topk_keeps_exactly_the_k_best_keys():
  q, k, v = _inputs(seed=8)
  out = _call("topk(k=3)", q, k, v, is_causal=True)
  qq, kk = np.asarray(q, np.float64), np.repeat(np.asarray(k), N // K, 2)
  s = np.einsum("btnh,bsnh->bnts", qq, kk) / np.sqrt(H)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  kth = -np.sort(-s, axis=-1)[..., 2:3]
  keep = (s >= kth) & np.isfinite(s)
  np.testing.assert_allclose(out, np_attention(q, k, v, keep), atol=2e-5)


def test_topk_error_shrinks_as_k_grows():
  q, k, v = _inputs(seed=9)
  exact = np_attention(q, k, v)
  errors = [np.abs(_call(f"topk(k={kk})", q, k, v) - exact).mean()
            for kk in (1, 4, 8, 16)]
  assert errors[0] > errors[1] > errors[2] > errors[3]
  assert errors[3] < 1e-6


def _is_one_value_row_per_query(out, v):
  v_rep = np.repeat(np.asarray(v, np.float32), N // K, axis=2)
  # distance of out[b, t, n] to each value row v[b, s, n]
  d = np.abs(np.asarray(out, np.float32)[:, :, None]
             - v_rep[:, None, :]).max(-1)  # [B, T, S, N]
  return (d.min(axis=2) == 0).all()


@pytest.mark.parametrize("estimator", ["straight_through", "gumbel"])
def test_hard_attention_picks_one_row_and_has_gradients(estimator):
  q, k, v = _inputs(seed=10)
  spec = f"hard(estimator={estimator!r}, temperature=0.5)"
  rng = jax.random.PRNGKey(3)
  sampled, (gq, gk, _) = _call_and_grads(spec, q, k, v, rng=rng)
  assert _is_one_value_row_per_query(sampled, v)
  # gradients reach the scores through the surrogate
  assert np.isfinite(np.asarray(gq)).all() and np.isfinite(np.asarray(gk)).all()
  assert np.abs(np.asarray(gq)).sum() > 0 and np.abs(np.asarray(gk)).sum() > 0
  # deterministic for a fixed rng, different for another
  again, _ = _call_and_grads(spec, q, k, v, rng=rng)
  np.testing.assert_array_equal(sampled, again)
  other, _ = _call_and_grads(spec, q, k, v, rng=jax.random.PRNGKey(4))
  assert not np.array_equal(sampled, other)
  # without rng: the argmax of the allowed scores
  mask = np.random.default_rng(11).random((B, 1, T, T)) < 0.5
  argmax = _call(spec, q, k, v, mask=jnp.asarray(mask))
  qq, kk = np.asarray(q, np.float64), np.repeat(np.asarray(k), N // K, 2)
  s = np.where(mask, np.einsum("btnh,bsnh->bnts", qq, kk), -np.inf)
  pick = np.argmax(s, -1)  # [B, N, T]
  v_rep = np.repeat(np.asarray(v), N // K, axis=2)
  want = np.stack([v_rep[b, pick[b, n], n] for b in range(B)
                   for n in range(N)]).reshape(B, N, T, DV)
  want = np.where(mask.any(-1)[..., None], want, 0.0)
  np.testing.assert_array_equal(argmax, want.transpose(0, 2, 1, 3))
  if estimator == "gumbel":  # deterministic=True ignores the rng
    np.testing.assert_array_equal(
        argmax, _call(spec, q, k, v, mask=jnp.asarray(mask), rng=rng,
                      deterministic=True))


# ---------------------------------------------------------------- synthesizer


def test_dense_synthesizer_matches_numpy_mlp():
  q, k, v = _inputs(seed=12)
  p = _params("synthesizer(hidden=8)", q, k)
  bias = np.random.default_rng(13).normal(size=(B, 1, T, T))
  out = _call("synthesizer(hidden=8)", q, k, v, params=p, is_causal=True,
              bias=jnp.asarray(bias))
  qq = np.asarray(q, np.float64)
  hidden = np.maximum(qq @ np.asarray(p["w1"], np.float64) + p["b1"], 0)
  logits = hidden @ np.asarray(p["w2"], np.float64) + p["b2"]  # [B,T,N,S]
  logits = logits.transpose(0, 2, 1, 3) + bias
  causal = np.tril(np.ones((T, T), bool))
  # the keys do not enter: scores are the logits (scale 1, no q·k)
  w = np.where(causal, np.exp(logits - logits.max(-1, keepdims=True)), 0)
  w = w / w.sum(-1, keepdims=True)
  v_rep = np.repeat(np.asarray(v, np.float64), N // K, axis=2)
  want = np.einsum("bnts,bsnd->btnd", w, v_rep)
  np.testing.assert_allclose(out, want, atol=2e-5)


def test_random_synthesizer_table_and_trainable_flag():
  q, k, v = _inputs(t=5, s=7, seed=14)
  table = jnp.asarray(np.random.default_rng(15).normal(size=(N, 8, 9)),
                      jnp.float32)  # larger than needed: sliced
  out = _call("synthesizer(kind='random')", q, k, v,
              params={"table": table})
  logits = np.asarray(table, np.float64)[:, :5, :7]
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  v_rep = np.repeat(np.asarray(v, np.float64), N // K, axis=2)
  np.testing.assert_allclose(out, np.einsum("nts,bsnd->btnd", w, v_rep),
                             atol=2e-5)

  def table_grad(spec):
    return jax.grad(lambda t: jnp.sum(_call(spec, q, k, v, params={
        "table": t}) ** 2))(table)

  assert np.abs(np.asarray(table_grad("synthesizer(kind='random')"))).sum() > 0
  assert not np.asarray(
      table_grad("synthesizer(kind='random', trainable=False)")).any()


# ---------------------------------------------------------------- sinkhorn


def test_sinkhorn_single_block_is_exact_attention():
  q, k, v = _inputs(seed=16)
  lengths = jnp.array([12, 16])
  mask = _lengths_mask(lengths, T)
  for causal in (False, True):
    out = _call("sinkhorn(block_size=16)", q, k, v, is_causal=causal,
                key_value_seq_lengths=lengths)
    full = mask & np.tril(np.ones((T, T), bool)) if causal else mask
    np.testing.assert_allclose(out, np_attention(q, k, v, full), atol=2e-5)


def test_sinkhorn_normalize_is_doubly_stochastic():
  from attn.kernels.sinkhorn import sinkhorn_normalize
  logits = jnp.asarray(np.random.default_rng(17).normal(size=(6, 6)) * 3)
  p = np.asarray(sinkhorn_normalize(logits, jnp.ones((6, 6), bool), 50))
  np.testing.assert_allclose(p.sum(0), 1, atol=1e-5)
  np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


def np_sinkhorn(q, k, v, p, block, partners, n_iters, temperature):
  """Loop reference, one example, non-causal, no padding, N == K."""
  t, n, h = q.shape
  nb = t // block
  out = np.zeros((t, n, v.shape[-1]))
  for head in range(n):
    kb = k[:, head].reshape(nb, block, h)
    vb = v[:, head].reshape(nb, block, -1)
    hid = np.maximum(kb.mean(1) @ p["sort_w1"] + p["sort_b1"], 0)
    x = (hid @ p["sort_w2"][:, :nb] + p["sort_b2"][:nb]) / temperature
    for _ in range(n_iters):
      x = x - np.log(np.exp(x).sum(1, keepdims=True))
      x = x - np.log(np.exp(x).sum(0, keepdims=True))
    pm = np.exp(x)
    for i in range(nb):
      top = np.argsort(-pm[i], kind="stable")[:partners]
      w = pm[i, top] / pm[i, top].sum()
      ks = np.einsum("m,mbh->bh", w, kb[top])
      vs = np.einsum("m,mbd->bd", w, vb[top])
      keys = np.concatenate([kb[i], ks])
      vals = np.concatenate([vb[i], vs])
      for r in range(block):
        qi = q[i * block + r, head]
        s = keys @ qi / np.sqrt(h)
        e = np.exp(s - s.max())
        out[i * block + r, head] = e @ vals / e.sum()
  return out


def test_sinkhorn_matches_loop_reference():
  q, k, v = _inputs(k=N, seed=18)
  spec = "sinkhorn(block_size=4, hidden=8, partners=2, n_iters=3, " \
         "temperature=0.5)"
  p = _params(spec, q, k)
  out = _call(spec, q, k, v, params=p)
  p64 = {n: np.asarray(x, np.float64) for n, x in p.items()}
  for b in range(B):
    want = np_sinkhorn(*(np.asarray(x, np.float64)[b] for x in (q, k, v)),
                       p64, 4, 2, 3, 0.5)
    np.testing.assert_allclose(out[b], want, atol=2e-5)


# ---------------------------------------------------------------- reformer


def np_reformer(q, k, v, rotations, *, chunk, shared, causal):
  """Loop reference of the documented LSH attention, one example, one head.

  q [T, H], k [S, H], v [S, D], rotations [H, R, nb/2].
  """
  t_len, s_len = len(q), len(k)
  if shared:
    k = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
  n_chunks = max(1, -(-max(t_len, s_len) // chunk))
  cq, ck = -(-t_len // n_chunks), -(-s_len // n_chunks)
  outs, lses = [], []
  for r in range(rotations.shape[1]):
    def buckets(x):
      proj = x @ rotations[:, r]
      return np.argmax(np.concatenate([proj, -proj], -1), -1)
    qb = buckets(q)
    kb = qb if shared else buckets(k)
    q_order = np.lexsort((np.arange(t_len), qb))
    k_order = q_order if shared else np.lexsort((np.arange(s_len), kb))
    q_rank = np.argsort(q_order)
    out = np.zeros((t_len, v.shape[-1]))
    lse = np.full(t_len, -np.inf)
    for i in range(t_len):
      ci = q_rank[i] // cq
      cands = [j for j in range(s_len)
               if np.where(k_order == j)[0][0] // ck in
               ({ci, (ci - 1) % n_chunks} if n_chunks > 1 else {ci})]
      if causal:
        same = [j for j in range(i + 1) if qb[j] == qb[i]]
        cands = same[-(chunk + 1):]
      if not cands:
        continue
      s = np.array([q[i] @ k[j] / np.sqrt(q.shape[1]) for j in cands])
      if shared:
        s = np.where(np.array(cands) == i, -1e5, s)
      m = s.max()
      e = np.exp(s - m)
      out[i] = e @ v[cands] / e.sum()
      lse[i] = m + np.log(e.sum())
    outs.append(out)
    lses.append(lse)
  lses = np.stack(lses)
  top = np.max(lses, 0)
  w = np.where(np.isfinite(lses), np.exp(lses - np.where(np.isfinite(top),
                                                         top, 0)), 0)
  w = w / np.where(w.sum(0) == 0, 1, w.sum(0))
  return np.einsum("rt,rtd->td", w, np.stack(outs))


@pytest.mark.parametrize("shared,causal,t,s", [
    (False, False, 10, 14), (True, False, 16, 16), (True, True, 16, 16)])
def test_reformer_matches_loop_reference(shared, causal, t, s):
  q, k, v = _inputs(b=1, t=t, s=s, n=1, k=1, seed=19)
  spec = (f"reformer(chunk_size=4, n_buckets=4, n_hashes=3, "
          f"shared_qk={shared})")
  out = _call(spec, q, k, v, is_causal=causal, rng=jax.random.PRNGKey(5))
  rotations = np.asarray(jax.random.normal(
      jax.random.PRNGKey(5), (H, 3, 2), jnp.float32), np.float64)
  want = np_reformer(*(np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v)),
                     rotations, chunk=4, shared=shared, causal=causal)
  np.testing.assert_allclose(out[0, :, 0], want, atol=2e-5)


def test_reformer_single_chunk_is_exact_attention():
  q, k, v = _inputs(seed=20)
  lengths = jnp.array([10, 16])
  out = _call("reformer(chunk_size=16, n_hashes=3)", q, k, v,
              key_value_seq_lengths=lengths)
  np.testing.assert_allclose(
      out, np_attention(q, k, v, _lengths_mask(lengths, T)), atol=2e-5)


def test_reformer_is_deterministic_per_seed():
  # (the reference test above shows that a given rng seeds the rotations)
  q, k, v = _inputs(seed=21)
  spec = "reformer(chunk_size=4, n_buckets=4)"
  kwargs = {"key_value_seq_lengths": KV_LENGTHS,
            "query_seq_lengths": Q_LENGTHS}
  a = _call(spec, q, k, v, **kwargs)
  np.testing.assert_array_equal(a, _call(spec, q, k, v, **kwargs))
  assert not np.allclose(a, _call(spec[:-1] + ", seed=1)", q, k, v, **kwargs))


def test_reformer_more_hashes_approximate_better():
  # sharp scores: a query's mass sits on few keys, which more hash rounds
  # find more often (n_hashes=2 is the default of the spec)
  q, k, v = _inputs(seed=1)
  kwargs = {"key_value_seq_lengths": KV_LENGTHS,
            "query_seq_lengths": Q_LENGTHS}
  exact = np_attention(q * 3, k * 3, v, _lengths_mask(KV_LENGTHS, T))
  exact[0, 5:] = 0
  errors = [np.abs(_call(spec, q * 3, k * 3, v, **kwargs) - exact).mean()
            for spec in ("reformer(chunk_size=4, n_buckets=4)",
                         "reformer(chunk_size=4, n_buckets=4, n_hashes=8)")]
  assert errors[1] < 0.5 * errors[0]


def test_lsh_buckets_are_angular():
  rng = np.random.default_rng(23)
  x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  rot = jnp.asarray(rng.normal(size=(8, 2, 4)), jnp.float32)
  b = reformer_lib.lsh_buckets(x, rot)
  assert b.shape == (2, 32) and int(b.min()) >= 0 and int(b.max()) < 8
  np.testing.assert_array_equal(b, reformer_lib.lsh_buckets(x * 7.0, rot))
  # the opposite vector lands in the opposite bucket
  np.testing.assert_array_equal(reformer_lib.lsh_buckets(-x, rot), (b + 4) % 8)


# ---------------------------------------------------------------- local_p


def np_local_p(q, k, v, w_p, v_p, window, causal, length):
  """Loop reference of Luong local-p attention, one example, one head."""
  t_len, s_len = len(q), len(k)
  out = np.zeros((t_len, v.shape[-1]))
  sigma = window / 2
  for t in range(t_len):
    p = length / (1 + np.exp(-(np.tanh(q[t] @ w_p) @ v_p)))
    cands = [s for s in range(min(s_len, length))
             if p - window <= s <= p + window and (not causal or s <= t)]
    if not cands:
      continue
    sc = np.array([q[t] @ k[s] / np.sqrt(q.shape[1]) for s in cands])
    a = np.exp(sc - sc.max())
    a = a / a.sum() * np.exp(-(np.array(cands) - p) ** 2 / (2 * sigma ** 2))
    out[t] = a @ v[cands]
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_local_p_matches_loop_reference(causal):
  q, k, v = _inputs(b=2, t=12, s=20, n=2, k=2, seed=24)
  spec = "local_p(window=3, hidden=8)"
  p = _params(spec, q, k)
  p = {"w_p": p["w_p"] * 3.0, "v_p": p["v_p"] * 3.0}  # spread the centres
  lengths = [14, 20]
  out = _call(spec, q, k, v, params=p, is_causal=causal,
              key_value_seq_lengths=jnp.array(lengths))
  p64 = {n: np.asarray(x, np.float64) for n, x in p.items()}
  for b in range(2):
    for n in range(2):
      want = np_local_p(*(np.asarray(x, np.float64)[b, :, n]
                          for x in (q, k, v)), p64["w_p"], p64["v_p"], 3,
                        causal, lengths[b])
      np.testing.assert_allclose(out[b, :, n], want, atol=2e-5)
  # the centre predictor is trained through the Gaussian
  g = jax.grad(lambda w: jnp.sum(_call(spec, q, k, v, params={
      "w_p": w, "v_p": p["v_p"]}) ** 2))(p["w_p"])
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
