"""Tests for ``attn.dot_product_attention`` (the exact ``xla`` kernel).

Yardsticks: ``jax.nn.dot_product_attention`` (forward and VJP) and the
float64 NumPy reference in :mod:`tests.reference`. jax.nn returns the mean of
the values for a query row with nothing to attend to, ours returns zeros, so
rows are compared only where something is attended, and the empty rows are
checked to be zero separately.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attn
from tests.reference import reference_attention, reference_mask, tolerance

B, T, S, N, H = 2, 5, 6, 4, 8

# One jitted entry point shared by most tests: compiled once per shape and
# option set (eager execution is covered by the ``maybe_jit`` tests).
attention = jax.jit(attn.dot_product_attention, static_argnames=(
    "scale", "is_causal", "local_window_size", "dropout_rate",
    "broadcast_dropout", "return_weights", "implementation"))


def _qkv(rng, *, K=2, T=T, S=S, Dv=H, dtype=jnp.float32, B=B, N=N, H=H):
  q = rng.standard_normal((B, T, N, H))
  k = rng.standard_normal((B, S, K, H))
  v = rng.standard_normal((B, S, K, Dv))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# Each mode: rng -> (bias, mask, kwargs, structural-mask kwargs for the
# reference). Lengths/windows chosen so that some rows are fully masked.
def _mode(name, rng):
  bias = mask = None
  kw, ref = {}, {}
  parts = name.split("+")
  if "bias" in parts:
    bias = jnp.asarray(rng.standard_normal((B, N, T, S)), jnp.float32)
  if "bias3d" in parts:           # [N, 1, S]: broadcast over batch and T
    bias = jnp.asarray(rng.standard_normal((N, 1, S)), jnp.float32)
  if "mask" in parts:             # full rank, some rows fully masked
    m = rng.random((B, N, T, S)) < 0.6
    m[0, 1, 2] = False
    mask = jnp.asarray(m)
  if "mask2d" in parts:           # [T, S]
    m = rng.random((T, S)) < 0.6
    m[3] = False
    mask = jnp.asarray(m)
  if "causal" in parts:
    kw["is_causal"] = ref["is_causal"] = True
  if "padding" in parts:
    kw["query_seq_lengths"] = jnp.array([3, T], jnp.int32)
    kw["key_value_seq_lengths"] = jnp.array([4, 0], jnp.int32)
    ref["q_lengths"], ref["kv_lengths"] = [3, T], [4, 0]
  if "window" in parts:
    kw["local_window_size"] = ref["window"] = 1
  if "window_pair" in parts:
    kw["local_window_size"] = ref["window"] = (2, 0)
  return bias, mask, kw, ref


MODES = ["none", "bias3d", "mask", "mask2d", "mask2d+bias", "causal",
         "causal+window_pair+bias", "padding+mask+causal",
         "window+padding+bias3d"]


def _full_mask(mask, ref, *, T=T, S=S):
  """Combined boolean [B, N, T, S] mask (user mask & structure), NumPy."""
  m = reference_mask(B, T, S, **ref)
  if mask is not None:
    u = np.asarray(mask)
    m = m & u.reshape((1,) * (4 - u.ndim) + u.shape)
  return np.broadcast_to(m, (B, N, T, S))


def _check_against_jax_nn(q, k, v, bias, mask, kw, ref):
  """Forward and VJP (q, k, v, bias) of ours vs jax.nn on non-empty rows."""
  tol = tolerance(q.dtype)
  empty_BTN = ~_full_mask(mask, ref).any(-1).transpose(0, 2, 1)
  live = jnp.asarray(~empty_BTN)[..., None]
  args = (q, k, v) + (() if bias is None else (bias,))

  ct = jnp.where(live, jnp.asarray(
      np.random.default_rng(1).standard_normal(q.shape), q.dtype), 0)

  def fwd_bwd(impl):
    def f(*a):
      return impl(*a[:3], a[3] if len(a) > 3 else None, mask, **kw)
    out, vjp = jax.vjp(f, *args)
    return out, vjp(ct)

  out, grads_ours = jax.jit(lambda a: fwd_bwd(attn.dot_product_attention))(
      args)
  # jax.nn asks for an F16_F16_F32 dot, which CPU compiles only eagerly.
  jit = jax.jit if q.dtype != jnp.float16 else (lambda f: f)
  ref_out, grads_theirs = jit(
      lambda a: fwd_bwd(jax.nn.dot_product_attention))(args)
  assert out.dtype == q.dtype and out.shape == q.shape
  np.testing.assert_allclose(_f64(jnp.where(live, out, 0)),
                             _f64(jnp.where(live, ref_out, 0)), **tol)
  assert not np.any(_f64(out)[empty_BTN]), "empty rows must be exactly zero"
  for g_ours, g_theirs in zip(grads_ours, grads_theirs):
    assert g_ours.shape == g_theirs.shape
    assert np.all(np.isfinite(_f64(g_ours)))
    scale = max(1.0, np.abs(_f64(g_theirs)).max())
    np.testing.assert_allclose(_f64(g_ours) / scale, _f64(g_theirs) / scale,
                               **tol)
  # And the float64 reference (all rows, zeros included).
  full = _full_mask(mask, ref)
  want, _ = reference_attention(_f64(q), _f64(k), _f64(v),
                                None if bias is None else _f64(bias), full)
  np.testing.assert_allclose(_f64(out), want, **tol)


@pytest.mark.parametrize("mode, K", [(m, 2) for m in MODES] + [
    (m, K) for K in (4, 1) for m in ("none", "causal+window_pair+bias",
                                     "padding+mask+causal")])
def test_matches_jax_nn_and_reference_f32(np_rng, mode, K):
  """Every mask mode with groups of 2; groups of 1 (MHA) and 4 (MQA) too."""
  q, k, v = _qkv(np_rng, K=K)
  bias, mask, kw, ref = _mode(mode, np_rng)
  _check_against_jax_nn(q, k, v, bias, mask, kw, ref)


@pytest.mark.parametrize("dtype, mode", [
    (jnp.bfloat16, "causal+window_pair+bias"),
    (jnp.float16, "padding+mask+causal")])
def test_matches_jax_nn_and_reference_half(np_rng, dtype, mode):
  q, k, v = _qkv(np_rng, K=2, dtype=dtype)
  bias, mask, kw, ref = _mode(mode, np_rng)
  _check_against_jax_nn(q, k, v, bias, mask, kw, ref)


def test_rank3_inputs_match_jax_nn(np_rng):
  q, k, v = (x[0] for x in _qkv(np_rng))
  out = attention(q, k, v, is_causal=True)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  assert out.shape == (T, N, H)
  np.testing.assert_allclose(out, want, **tolerance(jnp.float32))


def test_jit_matches_eager(np_rng, maybe_jit):
  q, k, v = _qkv(np_rng)
  bias, mask, kw, ref = _mode("padding+mask+causal", np_rng)
  lengths = (kw.pop("query_seq_lengths"), kw.pop("key_value_seq_lengths"))
  fn = maybe_jit(lambda q, k, v, m, ql, kl: attn.dot_product_attention(
      q, k, v, mask=m, query_seq_lengths=ql, key_value_seq_lengths=kl, **kw))
  out = fn(q, k, v, mask, *lengths)
  want, _ = reference_attention(q, k, v, None, _full_mask(mask, ref))
  np.testing.assert_allclose(out, want, **tolerance(jnp.float32))


def test_value_head_dim_may_differ(np_rng):
  q, k, v = _qkv(np_rng, Dv=3)
  out = attention(q, k, v, is_causal=True)
  assert out.shape == (B, T, N, 3)
  want, _ = reference_attention(q, k, v,
                                mask=reference_mask(B, T, S, is_causal=True))
  np.testing.assert_allclose(out, want, **tolerance(jnp.float32))


def test_segment_ids_self_attention(np_rng):
  q, k, v = _qkv(np_rng, S=T)
  seg = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
  out = attention(q, k, v, segment_ids=jnp.asarray(seg),
                                   is_causal=True)
  mask = reference_mask(B, T, T, is_causal=True, q_segment_ids=seg,
                        kv_segment_ids=seg)
  want, _ = reference_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(out, want, **tolerance(jnp.float32))
  # Packing: each segment alone gives the same output as within the pack.
  alone = attention(q[:1, 2:], k[:1, 2:], v[:1, 2:],
                                     is_causal=True)
  np.testing.assert_allclose(out[:1, 2:], alone, **tolerance(jnp.float32))


def test_segment_ids_pair_cross_attention(np_rng):
  q, k, v = _qkv(np_rng)
  q_seg = np.array([[0, 0, 1, 1, 2], [3, 3, 3, 3, 3]])
  kv_seg = np.array([[0, 1, 1, 1, 0, 0], [3, 3, 0, 0, 3, 1]])
  out = attention(
      q, k, v, segment_ids=(jnp.asarray(q_seg), jnp.asarray(kv_seg)))
  mask = reference_mask(B, T, S, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  want, _ = reference_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(out, want, **tolerance(jnp.float32))
  assert not np.any(np.asarray(out)[0, 4])   # segment 2 has no keys


def test_return_weights(np_rng):
  q, k, v = _qkv(np_rng, K=1, Dv=3)
  bias, mask, kw, ref = _mode("padding+mask+causal", np_rng)
  out, w = attention(q, k, v, bias, mask, return_weights=True,
                                      **kw)
  full = _full_mask(mask, ref)
  want_out, want_w = reference_attention(q, k, v, bias, full)
  assert w.shape == (B, N, T, S) and w.dtype == jnp.float32
  np.testing.assert_allclose(w, want_w, **tolerance(jnp.float32))
  np.testing.assert_allclose(out, want_out, **tolerance(jnp.float32))
  row_sums = np.asarray(w).sum(-1)
  np.testing.assert_allclose(row_sums, full.any(-1).astype(float), atol=1e-6)
  np.testing.assert_allclose(
      out, jnp.einsum("bnts,bsd->btnd", w, v[:, :, 0]), rtol=1e-5, atol=1e-5)


def test_causality_future_keys_do_not_leak(np_rng):
  q, k, v = _qkv(np_rng, S=T)
  t0 = 2
  k2 = k.at[:, t0 + 1:].add(100.0)
  v2 = v.at[:, t0 + 1:].add(100.0)
  a = attention(q, k, v, is_causal=True)
  b = attention(q, k2, v2, is_causal=True)
  np.testing.assert_allclose(a[:, :t0 + 1], b[:, :t0 + 1], atol=1e-6)
  assert np.abs(np.asarray(a[:, t0 + 1:] - b[:, t0 + 1:])).max() > 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fully_masked_rows_zero_with_finite_grads(np_rng, dtype):
  q, k, v = _qkv(np_rng, dtype=dtype)
  mask = np.ones((B, N, T, S), bool)
  mask[:, :, 1] = False                      # row 1 empty everywhere
  mask[1] = False                            # example 1 empty entirely
  mask = jnp.asarray(mask)

  def loss(q, k, v):
    out = attention(q, k, v, mask=mask)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  out = _f64(out)
  assert np.all(np.isfinite(out))
  assert not np.any(out[:, 1]) and not np.any(out[1])
  assert np.any(out[0, 0])
  for g in grads:
    g = _f64(g)
    assert np.all(np.isfinite(g))
    assert not np.any(g[1])                  # nothing flows from empty rows
  assert not np.any(_f64(grads[0])[:, 1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_logits_of_magnitude_1e4_stay_finite(dtype):
  rng = np.random.default_rng(3)
  q = 100.0 * np.sign(rng.standard_normal((1, 4, 2, 1)))
  k = 100.0 * np.sign(rng.standard_normal((1, 6, 2, 1)))
  k[0, 0] = 99.0                                 # break exact ties
  v = rng.standard_normal((1, 6, 2, 3))
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  mask = jnp.asarray(np.tril(np.ones((4, 6), bool)))

  def loss(q, k, v):
    out = attention(q, k, v, mask=mask, scale=1.0)
    return jnp.sum(out.astype(jnp.float32)), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  want, _ = reference_attention(q, k, v, mask=mask, scale=1.0)
  np.testing.assert_allclose(_f64(out), want, **tolerance(dtype))
  for g in grads:
    assert np.all(np.isfinite(_f64(g)))


class TestDropout:
  """Dropout on the attention weights (beyond jax.nn)."""

  # Queries are zero, so every allowed key has weight 1/S; values are
  # one-hot in s, so out[b, t, n, s] is the (dropped) weight of key s.
  def _uniform(self, S=32):
    q = jnp.zeros((2, 32, 2, 4))
    k = jnp.ones((2, S, 2, 4))
    v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (2, S, 2, S))
    return q, k, v

  def test_pattern_rate_and_mean(self):
    q, k, v = self._uniform()
    rate = 0.3
    out = np.asarray(attention(
        q, k, v, dropout_rate=rate, dropout_rng=jax.random.PRNGKey(0)))
    kept = out != 0
    assert abs(1 - kept.mean() - rate) < 0.04
    np.testing.assert_allclose(out[kept], 1 / 32 / (1 - rate), rtol=1e-6)
    assert abs(out.mean() * 32 - 1) < 0.05        # expectation preserved

  def test_deterministic_given_rng(self):
    q, k, v = self._uniform()
    run = functools.partial(attn.dot_product_attention, q, k, v,
                            dropout_rate=0.5)
    a = run(dropout_rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, run(dropout_rng=jax.random.PRNGKey(1)))
    assert np.any(a != run(dropout_rng=jax.random.PRNGKey(2)))

  def test_broadcast_dropout_shares_mask_over_batch_and_heads(self):
    q, k, v = self._uniform()
    out = np.asarray(attention(
        q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0),
        broadcast_dropout=True))
    zeros = out == 0                               # [B, T, N, S]
    assert zeros.any() and not zeros.all()
    assert np.all(zeros == zeros[:1, :, :1])

  def test_return_weights_are_pre_dropout(self):
    q, k, v = self._uniform()
    _, w = attention(
        q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0),
        return_weights=True)
    np.testing.assert_allclose(w, 1 / 32, rtol=1e-6)

  @pytest.mark.parametrize("rate, rng, match", [
      (0.1, None, "dropout_rng"), (1.0, jax.random.PRNGKey(0), r"\[0, 1\)"),
      (-0.1, jax.random.PRNGKey(0), r"\[0, 1\)")])
  def test_bad_arguments(self, rate, rng, match):
    q, k, v = self._uniform(S=4)
    with pytest.raises(ValueError, match=match):
      attention(q, k, v, dropout_rate=rate, dropout_rng=rng)


class TestImplementation:
  """The ``implementation`` argument: names, lists, fallbacks, errors."""

  def test_cudnn_on_cpu_raises_and_list_falls_back(self, np_rng):
    if jax.devices()[0].platform == "gpu":
      pytest.skip("cuDNN may be available on this GPU")
    q, k, v = _qkv(np_rng)
    with pytest.raises(ValueError, match="cudnn.*needs an NVIDIA GPU"):
      attn.dot_product_attention(q, k, v, implementation="cudnn")
    out = attn.dot_product_attention(q, k, v, is_causal=True,
                                     implementation=["cudnn", "xla"])
    want = attn.dot_product_attention(q, k, v, is_causal=True,
                                      implementation="xla")
    np.testing.assert_array_equal(out, want)

  def test_auto_on_short_inputs_is_xla(self, np_rng):
    q, k, v = _qkv(np_rng)
    np.testing.assert_array_equal(
        attn.dot_product_attention(q, k, v),
        attn.dot_product_attention(q, k, v, implementation="xla"))

  @pytest.mark.parametrize("impl", ["flash", [], ["xla", "bogus"]])
  def test_unknown_names_list_choices(self, np_rng, impl):
    q, k, v = _qkv(np_rng)
    with pytest.raises(ValueError, match="choose from.*'xla'.*'chunked'"):
      attn.dot_product_attention(q, k, v, implementation=impl)

  def test_chunked_weights_fall_back_to_xla(self, np_rng):
    q, k, v = _qkv(np_rng)
    out, w = attn.dot_product_attention(q, k, v, implementation="chunked",
                                        return_weights=True)
    want, want_w = attn.dot_product_attention(q, k, v, implementation="xla",
                                              return_weights=True)
    np.testing.assert_array_equal(w, want_w)
    np.testing.assert_array_equal(out, want)

  def test_all_failing_list_reports_each(self, np_rng):
    q, k, v = _qkv(np_rng)
    with pytest.raises(ValueError, match="no attention implementation could "
                       "run: cudnn: .*; chunked: .*einsum_dot_general"):
      attn.dot_product_attention(q, k, v, einsum_dot_general=jax.lax.dot_general,
                                 implementation=["cudnn", "chunked"])


def _bad_inputs():
  f = jnp.zeros
  q, k, v = f((2, 5, 4, 8)), f((2, 6, 2, 8)), f((2, 6, 2, 8))
  return [
      ((q[0, 0], k, v), {}, r"rank >= 3.*query=\(4, 8\)"),
      ((q, k, v[..., :1, :]), {}, r"head counts differ.*\(2, 6, 1, 8\)"),
      ((f((2, 5, 3, 8)), k, v), {}, r"multiple of key/value heads \(2\)"),
      ((q, k, v[:, :5]), {}, r"lengths differ.*value=\(2, 5, 2, 8\)"),
      ((q, k[:1], v), {}, r"batch sizes differ.*key=\(1, 6, 2, 8\)"),
      ((q, k[..., :4], v), {}, r"head_dim differ.*key=\(2, 6, 2, 4\)"),
      ((q, k.astype(jnp.bfloat16), v), {}, "dtypes differ"),
      ((q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)), {},
       "floating point"),
      ((q, k, v), {"bias": f((3, 5, 6))}, r"bias of shape \(1, 3, 5, 6\).*"
       r"\(2, 4, 5, 6\)"),
      ((q, k, v), {"mask": jnp.ones((5, 5), bool)}, "mask of shape"),
      ((q, k, v), {"mask": jnp.ones((5, 6))}, "mask must be boolean"),
      ((q, k, v), {"key_value_seq_lengths": jnp.array([1, 2, 3])},
       r"key_value_seq_lengths.*\[\*B\]=\(2,\)"),
      ((q, k, v), {"segment_ids": jnp.zeros((2, 5), jnp.int32)},
       r"segment_ids.*\[\*B, S\]=\(2, 6\)"),
      ((q, k, v), {"local_window_size": -1}, "non-negative"),
      ((q, k, v), {"local_window_size": (1, 2, 3)}, "pair"),
  ]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_invalid_inputs_raise_value_error_naming_shapes(jit):
  for args, kwargs, match in _bad_inputs():
    arrays = {k: v for k, v in kwargs.items() if k != "local_window_size"}
    static = {k: v for k, v in kwargs.items() if k == "local_window_size"}
    fn = lambda q, k, v, arrays: attn.dot_product_attention(  # noqa: E731
        q, k, v, **arrays, **static)
    if jit:
      fn = jax.jit(fn)
    with pytest.raises(ValueError, match=match):
      fn(*args, arrays)


def test_no_retracing_for_same_shapes(np_rng):
  traces = []

  @jax.jit
  def fn(q, k, v, lengths):
    traces.append(None)                       # runs only while tracing
    return attn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                      is_causal=True)

  q, k, v = _qkv(np_rng)
  for seed in range(3):
    q2, k2, v2 = _qkv(np.random.default_rng(seed))
    fn(q2, k2, v2, jnp.array([seed + 1, 6], jnp.int32))
  assert len(traces) == 1
  fn(q[:, :4], k, v, jnp.array([1, 6], jnp.int32))   # new shape: one more
  assert len(traces) == 2


@st.composite
def _problem(draw):
  b, t, s = draw(st.integers(1, 2)), draw(st.integers(1, 6)), \
      draw(st.integers(1, 6))
  kv_heads, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
  h, dv = draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 3]))
  mask_rank = draw(st.sampled_from([None, 2, 3, 4]))
  return dict(
      shape=(b, t, s, kv_heads * group, kv_heads, h, dv),
      mask_rank=mask_rank, bias=draw(st.booleans()),
      is_causal=draw(st.booleans()),
      window=draw(st.sampled_from([None, 0, 2, (1, 0), (0, 3)])),
      kv_lengths=draw(st.none() | st.lists(st.integers(0, s), min_size=b,
                                           max_size=b)),
      seed=draw(st.integers(0, 2**16)))


@settings(max_examples=8, deadline=None)
@given(_problem())
def test_property_matches_reference(p):
  b, t, s, n, kv_heads, h, dv = p["shape"]
  rng = np.random.default_rng(p["seed"])
  q = rng.standard_normal((b, t, n, h)).astype(np.float32)
  k = rng.standard_normal((b, s, kv_heads, h)).astype(np.float32)
  v = rng.standard_normal((b, s, kv_heads, dv)).astype(np.float32)
  full = (b, n, t, s)
  mask = bias = None
  if p["mask_rank"]:
    mask = rng.random(full[4 - p["mask_rank"]:]) < 0.7
  if p["bias"]:
    bias = rng.standard_normal((1, n, 1, s)).astype(np.float32)
  static = dict(is_causal=p["is_causal"], local_window_size=p["window"])
  kw = {}
  if p["kv_lengths"] is not None:
    kw["key_value_seq_lengths"] = jnp.asarray(p["kv_lengths"], jnp.int32)
  out, w = jax.jit(lambda q, k, v, bias, mask, kw: attn.dot_product_attention(
      q, k, v, bias, mask, return_weights=True, **kw, **static))(
          q, k, v, bias, mask, kw)
  structure = reference_mask(b, t, s, is_causal=p["is_causal"],
                             window=p["window"], kv_lengths=p["kv_lengths"])
  combined = structure if mask is None else structure & mask
  want_out, want_w = reference_attention(q, k, v, bias, combined)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-5)
