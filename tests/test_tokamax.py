"""implementation="tokamax": delegation with our validation and row rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kernels import tokamax_adapter


def _inputs(B=2, T=8, S=8, N=2, K=1, H=4, Dv=None):
  r = np.random.default_rng(0)
  return [jnp.asarray(r.normal(size=s), jnp.float32)
          for s in ((B, T, N, H), (B, S, K, H), (B, S, K, Dv or H))]


def test_not_installed_says_pip_install(monkeypatch):
  monkeypatch.setattr(tokamax_adapter, "available", lambda: False)
  with pytest.raises(ValueError, match="pip install tokamax"):
    attn.dot_product_attention(*_inputs(), implementation="tokamax")


def test_bad_input_is_our_value_error(monkeypatch):
  # Our validation runs first, whether or not tokamax is installed.
  monkeypatch.setattr(tokamax_adapter, "available", lambda: False)
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    attn.dot_product_attention(q, k[:, :, :0], v[:, :, :0],
                               implementation="tokamax")


_SEG = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)


@pytest.mark.parametrize("kw", [
    {"segment_ids": _SEG, "is_causal": True,
     "mask": jnp.ones((2, 1, 8, 8), bool).at[0, 0, 2].set(False),
     "key_value_seq_lengths": jnp.asarray([6, 8])},
    {"local_window_size": (1, 2), "logits_soft_cap": 1.5, "scale": 0.8,
     "query_seq_lengths": jnp.asarray([8, 5]), "value_dim": 6},
    {"bias": jnp.linspace(-1, 1, 64).reshape(8, 8), "is_causal": True,
     "query_seq_lengths": jnp.asarray([8, 5])},
], ids=["segments-mask-causal-lengths", "window-softcap-scale-qlengths-dv",
        "bias-causal-qlengths"])
def test_matches_xla_forward_and_gradients(kw):
  pytest.importorskip("tokamax")   # optional extra; CI installs '.[test]'
  kw = dict(kw)
  q, k, v = _inputs(Dv=kw.pop("value_dim", None))   # Dv != H where given

  def f(impl):
    def loss(q, k, v):
      out = attn.dot_product_attention(q, k, v, implementation=impl, **kw)
      return jnp.sum(out * jnp.sin(out)), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (_, out), g = f("tokamax")
  (_, ref), ref_g = f("xla")
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  if "mask" in kw:
    assert np.all(np.asarray(out)[0, 2] == 0)   # the fully masked row
  else:
    assert np.all(np.asarray(out)[1, 5:] == 0)  # past the query length
  for a, b in zip(g, ref_g):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_soft_cap_with_bias_refused(monkeypatch):
  # tokamax caps scale·q·k + bias; attn's contract caps before the bias, so
  # delegating would give other numbers. Refused before tokamax is imported.
  monkeypatch.setattr(tokamax_adapter, "available", lambda: True)
  with pytest.raises(ValueError, match="logits_soft_cap together with a bias"
                     ) as e:
    attn.dot_product_attention(*_inputs(), implementation="tokamax",
                               logits_soft_cap=2.0, bias=jnp.ones((8, 8)))
  assert "'xla'" in str(e.value)


def test_precision_reaches_tokamax(monkeypatch):
  tokamax = pytest.importorskip("tokamax")
  seen = []
  original = tokamax.dot_product_attention

  def spy(*args, **kwargs):
    seen.append(kwargs.get("precision"))
    return original(*args, **kwargs)

  monkeypatch.setattr(tokamax, "dot_product_attention", spy)
  q, k, v = _inputs()
  highest = jax.lax.Precision.HIGHEST
  out = attn.dot_product_attention(q, k, v, implementation="tokamax",
                                   precision=highest)
  ref = attn.dot_product_attention(q, k, v, implementation="xla",
                                   precision=highest)
  assert seen == [highest]
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
