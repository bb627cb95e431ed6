"""Drop-in parity with jax.nn.dot_product_attention and Flax's attention_fn,
and exact numerics at the edges (residuals, batch axes, einsum keywords,
sown-weight dtypes, soft-capping, fully masked rows, huge lengths/windows)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import attn
from attn import masks
from attn.models.transformer import TransformerConfig
from attn.modules.attention import MultiHeadAttention
from tests.reference import reference_attention

B, T, S, N, K, H = 2, 5, 6, 4, 2, 8


def _qkv(seed=0, *, batch=(B,), T=T, S=S, N=N, K=K, H=H, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = r.normal(size=batch + (T, N, H))
  k = r.normal(size=batch + (S, K, H))
  v = r.normal(size=batch + (S, K, H))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _lse_reference(q, k, mask=None, scale=None):
  """float64 logsumexp over keys, masked entries at MASK_VALUE: [B, T, N]."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  G = q.shape[2] // k.shape[2]
  kk = np.repeat(k, G, axis=2)
  scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
  x = scale * np.einsum("btnh,bsnh->bnts", q, kk)
  if mask is not None:
    x = np.where(np.broadcast_to(mask, x.shape), x, masks.MASK_VALUE)
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  return lse.transpose(0, 2, 1)


# ----------------------------------------------------------------------------
# 1. return_residual


class TestResidual:

  def test_lse_matches_float64(self):
    q, k, v = _qkv()
    mask = np.random.default_rng(1).random((B, 1, T, S)) > 0.3
    mask[0, 0, 2] = False                      # one fully masked row
    out, lse = attn.dot_product_attention(q, k, v, mask=jnp.asarray(mask),
                                          implementation="xla",
                                          return_residual=True)
    assert lse.shape == (B, T, N) and lse.dtype == q.dtype
    want = _lse_reference(q, k, mask)
    np.testing.assert_allclose(lse, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(lse[0, 2]) < -1e37)  # jax.nn's masked-row value
    np.testing.assert_allclose(
        out, attn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)),
        rtol=0, atol=0)

  @pytest.mark.parametrize("implementation", ["chunked", "xla"])
  def test_fully_masked_row_lse_is_jax_nns(self, implementation):
    """jax.nn counts masked logits as MASK_VALUE: an empty row's lse is
    about -2.4e38, not -inf, for every implementation (masks and lengths)."""
    q, k, v = _qkv()
    mask = np.ones((B, 1, T, S), bool)
    mask[0, 0, 2] = False
    lengths = jnp.array([0] + [S] * (B - 1))
    for kw in (dict(mask=jnp.asarray(mask)),
               dict(key_value_seq_lengths=lengths)):
      _, lse = attn.dot_product_attention(
          q, k, v, implementation=implementation, return_residual=True, **kw)
      _, want = jax.nn.dot_product_attention(
          q, k, v, implementation="xla", return_residual=True, **kw)
      np.testing.assert_allclose(lse, want, rtol=1e-6)
      assert np.all(np.isfinite(np.asarray(lse)))

  def test_no_gradient_through_lse_and_unbatched_shape(self):
    q, k, v = _qkv()
    f = functools.partial(attn.dot_product_attention, implementation="xla",
                          return_residual=True)
    (_, lse), vjp = jax.vjp(f, q[0], k[0], v[0])
    assert lse.shape == (T, N)
    grads = vjp((jnp.zeros((T, N, H)), jnp.ones((T, N))))
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)

  def test_weights_and_residual_together(self):
    q, k, v = _qkv()
    out, w, lse = attn.dot_product_attention(
        q, k, v, return_weights=True, return_residual=True,
        implementation="xla")
    assert w.shape == (B, N, T, S) and lse.shape == (B, T, N)
    np.testing.assert_allclose(lse, _lse_reference(q, k), rtol=1e-5)


# ----------------------------------------------------------------------------
# 2. leading batch axes


class TestBatchAxes:

  def test_two_batch_axes_equal_flattened(self):
    q, k, v = _qkv(batch=(2, 3))
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(2, 1, N, T, S)),
                       jnp.float32)              # broadcast over axis 1
    lens = jnp.array([[1, 6, 3], [6, 2, 5]])
    out, w, lse = attn.dot_product_attention(
        q, k, v, bias, key_value_seq_lengths=lens, return_weights=True,
        return_residual=True, implementation="xla")
    assert out.shape == q.shape and w.shape == (2, 3, N, T, S)
    assert lse.shape == (2, 3, T, N)
    flat = lambda x: x.reshape((6,) + x.shape[2:])
    want = attn.dot_product_attention(
        flat(q), flat(k), flat(v), flat(jnp.broadcast_to(bias, (2, 3, N, T,
                                                                   S))),
        key_value_seq_lengths=lens.reshape(6), implementation="xla")
    np.testing.assert_array_equal(flat(out), want)

  def test_bias_with_wrong_batch_axis_names_it(self):
    q, k, v = _qkv(batch=(2, 3))
    with pytest.raises(ValueError, match=r"bias .*axis 1: 2 vs 3"):
      attn.dot_product_attention(q, k, v, jnp.zeros((2, 2, N, T, S)))

  def test_flax_module_with_extra_batch_axis(self):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 2, T, 8)),
                    jnp.float32)
    ours = nn.MultiHeadDotProductAttention(
        num_heads=2, attention_fn=attn.get_attention("xla"))
    theirs = nn.MultiHeadDotProductAttention(num_heads=2)
    params = theirs.init(jax.random.key(0), x)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# 3. Flax's einsum keywords


class _Counting:
  """An einsum that counts its calls (a stand-in for a quantised one)."""

  def __init__(self):
    self.calls = []

  def __call__(self, spec, a, b):
    self.calls.append(spec)
    return jnp.einsum(spec, a, b)


class TestEinsumKeywords:

  def test_custom_einsums_are_called_and_exact(self):
    q, k, v = _qkv()
    qk, pv = _Counting(), _Counting()
    fn = attn.get_attention("softmax")
    out = fn(q, k, v, qk_attn_weights_einsum=qk, attn_weights_value_einsum=pv)
    assert qk.calls == ["...qhd,...khd->...hqk"]
    assert pv.calls == ["...hqk,...khd->...qhd"]
    want = reference_attention(q, k, v)[0]
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)

  def test_dot_general_is_used(self):
    q, k, v = _qkv()
    seen = []

    def dot_general(*a, **kw):
      seen.append(1)
      return jax.lax.dot_general(*a, **kw)

    out = attn.get_attention("xla")(q, k, v, einsum_dot_general=dot_general)
    assert len(seen) >= 2                      # q·k and p·v
    np.testing.assert_allclose(out, reference_attention(q, k, v)[0],
                               rtol=2e-5, atol=2e-5)

  def test_precision_changes_the_product(self):
    q, k, v = _qkv()
    hi = attn.dot_product_attention(q, k, v, precision="highest",
                                    implementation="xla")
    np.testing.assert_allclose(hi, reference_attention(q, k, v)[0],
                               rtol=2e-5, atol=2e-5)
    # The value reaches the einsums (jax rejects a bad one there).
    with pytest.raises(ValueError, match="(?i)precision argument"):
      attn.dot_product_attention(q, k, v, precision="bogus",
                                 implementation="xla")

  @pytest.mark.parametrize("kwargs, match", [
      (dict(qk_attn_weights_einsum=jnp.einsum), "together"),
      (dict(attn_weights_value_einsum=jnp.einsum), "together"),
      (dict(precision=jax.lax.Precision.HIGHEST,
            qk_attn_weights_einsum=jnp.einsum,
            attn_weights_value_einsum=jnp.einsum), "mutually exclusive"),
      (dict(einsum_dot_general=jax.lax.dot_general,
            qk_attn_weights_einsum=jnp.einsum,
            attn_weights_value_einsum=jnp.einsum), "mutually exclusive"),
  ])
  def test_flax_rules(self, kwargs, match):
    q, k, v = _qkv()
    for spec in ("softmax", "linear"):
      with pytest.raises(ValueError, match=match):
        attn.get_attention(spec)(q, k, v, **kwargs)

  def test_other_kernels_refuse_rather_than_ignore(self):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="cannot honour einsum_dot_general.*"
                       "'xla'"):
      attn.get_attention("linear")(q, k, v,
                                   einsum_dot_general=jax.lax.dot_general)
    with pytest.raises(ValueError, match="chunked.*einsum_dot_general.*xla"):
      attn.dot_product_attention(q, k, v, implementation="chunked",
                                 einsum_dot_general=jax.lax.dot_general)

  def test_unknown_keyword_lists_what_it_takes(self):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"does not accept \['bogus'\].*"
                       "return_residual"):
      attn.get_attention("softmax")(q, k, v, bogus=1)


# ----------------------------------------------------------------------------
# 4. sown weights


class _Sow(nn.Module):
  spec: str
  force_fp32: bool
  dtype: jnp.dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(
        num_heads=2, dtype=self.dtype, force_fp32_for_softmax=self.force_fp32,
        attention_fn=attn.get_attention(self.spec))(x, sow_weights=True)


@pytest.mark.parametrize("spec", ["xla", "chunked"])
@pytest.mark.parametrize("force_fp32, want", [(True, jnp.float32),
                                              (False, jnp.bfloat16)])
def test_sown_weights_dtype_and_values(spec, force_fp32, want):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, T, 8)),
                  jnp.float32)
  model = _Sow(spec, force_fp32)
  params = model.init(jax.random.key(0), x)
  _, state = model.apply(params, x, mutable=["intermediates"])
  (w,) = jax.tree.leaves(state)
  assert w.dtype == want and w.shape == (2, 2, T, T)
  np.testing.assert_allclose(np.asarray(w, np.float32).sum(-1), 1.0,
                             atol=2e-2)


# ----------------------------------------------------------------------------
# 6. logit soft-capping


def _dense64(q, k, v, bias, cap):
  """Dense float64 jnp reference (differentiable)."""
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  x = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  x = cap * jnp.tanh(x / cap) + bias
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(x, -1), v)


class TestSoftCap:
  CAP = 0.7

  def test_forward_and_grads_vs_float64(self):
    q, k, v = _qkv()
    q = q * 3                                    # make the cap bite
    bias = jnp.asarray(np.random.default_rng(5).normal(size=(N, T, S)),
                       jnp.float32)
    f = lambda q, k, v, b: attn.dot_product_attention(
        q, k, v, b, logits_soft_cap=self.CAP, implementation="xla")
    np.testing.assert_allclose(
        f(q, k, v, bias), reference_attention(q, k, v, bias,
                                              soft_cap=self.CAP)[0],
        rtol=2e-5, atol=2e-5)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * jnp.arange(H))
    got = jax.grad(loss(f), argnums=(0, 1, 2, 3))(q, k, v, bias)
    with jax.enable_x64():
      args64 = [jnp.asarray(np.asarray(x), jnp.float64)
                for x in (q, k, v, bias)]
      want = jax.grad(loss(functools.partial(_dense64, cap=self.CAP)),
                      argnums=(0, 1, 2, 3))(*args64)
      want = [np.asarray(w) for w in want]
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

  @pytest.mark.parametrize("cap", [0, -1.0, float("inf"), "a", True])
  def test_bad_cap(self, cap):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="logits_soft_cap"):
      attn.dot_product_attention(q, k, v, logits_soft_cap=cap)

  def test_module_and_config_field(self):
    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, T, 8)),
                    jnp.float32)
    capped = MultiHeadAttention(num_heads=2, logits_soft_cap=1e-6)
    plain = MultiHeadAttention(num_heads=2)
    params = plain.init(jax.random.key(0), x)
    a, b = capped.apply(params, x), plain.apply(params, x)
    assert not np.allclose(a, b, atol=1e-4)
    # A tiny cap flattens every score: every query gets the same output.
    np.testing.assert_allclose(a, jnp.broadcast_to(a[:, :1], a.shape),
                               atol=1e-4)
    cfg = TransformerConfig(logits_soft_cap=2.0)
    assert cfg.logits_soft_cap == 2.0


# ----------------------------------------------------------------------------
# 7. edges


class TestEdges:

  def test_row_of_minus_inf_bias_is_zero_and_finite(self):
    q, k, v = _qkv()
    bias = np.zeros((B, N, T, S), np.float32)
    bias[1, :, 3] = -np.inf
    bias[0, 0, 0, :3] = -np.inf
    f = lambda q, k, v, b: attn.dot_product_attention(q, k, v, b,
                                                      implementation="xla")
    out = f(q, k, v, jnp.asarray(bias))
    np.testing.assert_array_equal(out[1, 3], 0.0)
    want = reference_attention(q, k, v, mask=np.isfinite(bias))[0]
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3))(
        q, k, v, jnp.asarray(bias))
    for g in grads:
      assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(grads[0][1, 3], 0.0)

  def test_int64_lengths_past_int32(self):
    q, k, v = _qkv()
    big = np.array([2**31, 2**40], np.int64)
    out = attn.dot_product_attention(q, k, v, key_value_seq_lengths=big,
                                     query_seq_lengths=big)
    np.testing.assert_allclose(out, attn.dot_product_attention(q, k, v),
                               rtol=0, atol=0)
    with jax.enable_x64():
      q64, k64, v64 = (jnp.asarray(np.asarray(x), jnp.float64)
                       for x in (q, k, v))
      out = jax.jit(lambda l: attn.dot_product_attention(
          q64, k64, v64, key_value_seq_lengths=l))(jnp.asarray(big))
      np.testing.assert_allclose(out, reference_attention(q64, k64, v64)[0],
                                 rtol=1e-6)

  def test_head_dim_zero(self):
    q, k, v = _qkv(H=0)
    with pytest.raises(ValueError, match="head_dim is 0.*scale"):
      attn.dot_product_attention(q, k, v)

  def test_zero_heads_is_empty(self):
    q, k, v = _qkv(N=0, K=0)
    out, lse = attn.dot_product_attention(q, k, v, return_residual=True)
    assert out.shape == (B, T, 0, H) and lse.shape == (B, T, 0)

  def test_huge_window_is_no_window(self):
    q, k, v = _qkv()
    np.testing.assert_array_equal(
        attn.dot_product_attention(q, k, v, local_window_size=10**12),
        attn.dot_product_attention(q, k, v))

  def test_shape_error_before_dropout_refusal(self):
    q, k, v = _qkv()
    fn = attn.get_attention("linear")
    with pytest.raises(ValueError, match="head_dim differ"):
      fn(q, k[..., :4], v[..., :4], dropout_rate=0.1,
         dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="dropout"):
      fn(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))

  def test_complex_is_a_clear_refusal(self):
    q, k, v = _qkv(dtype=jnp.complex64)
    with pytest.raises(ValueError, match="complex"):
      attn.dot_product_attention(q, k, v)
