"""implementation="pallas": jax's Pallas kernels, run interpreted on CPU.

Each case compiles forward and gradients once (interpret mode compiles
slowly), so the cases combine options rather than test them one by one, and
compiles with XLA's backend optimisations off (about 3x faster to compile;
the numbers do not depend on it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kernels import exact
from attn.kernels import pallas as pallas_kernels

_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _inputs(B, T, S, N, K, H, Dv=None, seed=0):
  r = np.random.default_rng(seed)
  return [jnp.asarray(r.normal(size=s), jnp.float32)
          for s in ((B, T, N, H), (B, S, K, H), (B, S, K, Dv or H))]


def _fwd_grad(impl, kw):
  """Jitted ``((loss, out), grads)`` with respect to every argument: q, k, v
  and, when one is passed, the bias."""
  def loss(q, k, v, *bias):
    out = attn.dot_product_attention(q, k, v, *bias, implementation=impl,
                                     **kw)
    return jnp.sum(out * jnp.cos(out)), out
  return jax.jit(lambda *args: jax.value_and_grad(
      loss, argnums=tuple(range(len(args))), has_aux=True)(*args),
                 compiler_options=_FAST_COMPILE)


def _check_against_xla(target, shape, kw, bias=None):
  """Output and gradients (bias's too, when given) of the interpreted Pallas
  kernel against implementation="xla"; returns ``(out, grads)``."""
  args = _inputs(*shape) + ([] if bias is None else [bias])
  (_, ref), ref_g = _fwd_grad("xla", kw)(*args)
  with pallas_kernels.interpret(target):
    (_, out), g = _fwd_grad("pallas", kw)(*args)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  for a, b in zip(g, ref_g):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)
  return out, g


def test_gpu_gqa_causal_segments_lengths_padding():
  # T = 24 is padded to a block multiple; GQA (N=4, K=2); row 1 of example 0
  # is past its length -> zeros.
  seg = jnp.asarray([[0] * 10 + [1] * 14, [0] * 5 + [2] * 19])
  lens = jnp.asarray([12, 24])
  kw = {"is_causal": True, "segment_ids": seg, "query_seq_lengths": lens,
            "key_value_seq_lengths": lens}
  out, _ = _check_against_xla("gpu", (2, 24, 24, 4, 2, 8), kw)
  assert np.all(np.asarray(out)[0, 12:] == 0)


@pytest.mark.parametrize("shape, causal", [
    ((1, 16, 32, 2, 1, 8), False), ((1, 16, 32, 2, 1, 8), True),
    ((1, 32, 16, 2, 2, 8), False)])
def test_gpu_cross_attention_t_ne_s(shape, causal):
  _check_against_xla("gpu", shape, {"is_causal": causal})


def test_gpu_causal_more_queries_than_keys_refused():
  # The kernel's causal loop would read past the last key (NaNs when
  # interpreted), so T > S with is_causal is refused.
  q, k, v = _inputs(1, 32, 16, 2, 2, 8)
  with pallas_kernels.interpret("gpu"), pytest.raises(
      ValueError, match=r"is_causal with more queries than keys \(T=32 > "
      r"S=16\).*'chunked' or 'xla'"):
    attn.dot_product_attention(q, k, v, implementation="pallas",
                               is_causal=True)


def test_gpu_mqa_scale_query_lengths_segments_not_causal():
  # MQA (K=1), a non-default scale (the kernel's sm_scale), segment ids
  # without causal, query lengths alone (rows past them -> zeros), T=40
  # padded to a block multiple.
  seg = jnp.asarray([[3] * 25 + [7] * 15])
  kw = {"segment_ids": seg, "scale": 0.3,
        "query_seq_lengths": jnp.asarray([33])}
  out, _ = _check_against_xla("gpu", (1, 40, 40, 4, 1, 8), kw)
  assert np.all(np.asarray(out)[0, 33:] == 0)


def test_tpu_gqa_segment_pair_causal_lengths():
  segs = (jnp.asarray([[0] * 8 + [1] * 8]), jnp.asarray([[1] * 6 + [0] * 10]))
  kw = {"segment_ids": segs, "is_causal": True,
            "key_value_seq_lengths": jnp.asarray([12])}
  out, _ = _check_against_xla("tpu", (1, 16, 16, 2, 1, 8), kw)
  assert np.all(np.asarray(out)[0, :6] == 0)   # rows with no key -> zeros


def test_tpu_splash_window_soft_cap_scale_gqa():
  # Splash attention: causal + window as its block-sparse mask, native GQA,
  # logits_soft_cap, a non-default scale; T, S padded to 128.
  kw = {"is_causal": True, "local_window_size": (3, 5),
        "logits_soft_cap": 2.0, "scale": 0.7}
  _check_against_xla("tpu", (2, 20, 24, 4, 2, 8), kw)


def test_tpu_splash_value_head_dim_differs():
  # Splash takes Dv != H (its head_dim_v); GQA, causal, key lengths.
  kw = {"is_causal": True, "key_value_seq_lengths": jnp.asarray([20, 9])}
  out, _ = _check_against_xla("tpu", (2, 20, 20, 4, 2, 8, 12), kw)
  assert out.shape == (2, 20, 4, 12)


def test_tpu_splash_window_leaves_query_blocks_without_keys():
  # T=300 > S + left: rows t > 115 see no key; the third query block (rows
  # 256..383 after padding) has no key block at all, which splash skips.
  # Zeros, finite gradients.
  out, _ = _check_against_xla("tpu", (1, 300, 100, 2, 1, 8),
                           {"local_window_size": (16, 16)})
  assert np.all(np.asarray(out)[0, 116:] == 0)
  assert np.all(np.asarray(out)[0, 115] != 0)


@pytest.mark.parametrize("kw", [{}, {"bias": jnp.full((200, 130), 0.5)}],
                         ids=["splash", "flash"])
def test_tpu_causal_more_queries_than_keys(kw):
  # T=200 > S=130, both padded to multiples of 128 (256 and 256).
  _check_against_xla("tpu", (1, 200, 130, 2, 2, 8), {"is_causal": True, **kw})


def test_tpu_splash_bf16_as_close_to_float64_as_xla():
  q, k, v = _inputs(2, 24, 24, 4, 2, 8)
  kw = {"is_causal": True, "local_window_size": 4}
  exact64 = np.asarray(
      attn.dot_product_attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                                 implementation="xla", **kw))
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  ref = attn.dot_product_attention(*bf, implementation="xla", **kw)
  with pallas_kernels.interpret("tpu"):
    out = jax.jit(lambda *a: attn.dot_product_attention(
        *a, implementation="pallas", **kw))(*bf)
  assert out.dtype == jnp.bfloat16
  err = lambda x: np.max(np.abs(np.asarray(x, np.float64) - exact64))
  assert err(out) <= 2 * err(ref) + 1e-3, (err(out), err(ref))


def test_tpu_flash_bias_and_mask_forward_and_gradients():
  # A bias or dense mask goes to flash_attention's additive `ab` (the kernel
  # adds it before its sm_scale, so it gets bias / scale). Row 3 of
  # example 0 is fully masked -> zeros and zero bias gradient.
  r = np.random.default_rng(1)
  bias = jnp.asarray(r.normal(size=(2, 4, 20, 24)), jnp.float32)
  mask = jnp.asarray(r.random((2, 1, 20, 24)) > 0.3).at[0, 0, 3].set(False)
  kw = {"mask": mask, "is_causal": True, "scale": 0.3,
        "key_value_seq_lengths": jnp.asarray([20, 13])}
  out, g = _check_against_xla("tpu", (2, 20, 24, 4, 2, 8), kw, bias=bias)
  assert np.all(np.asarray(out)[0, 3] == 0)
  assert np.all(np.asarray(g[3])[0, :, 3] == 0)
  assert np.any(np.asarray(g[3]) != 0)


@pytest.mark.parametrize("kw, words", [
    ({"local_window_size": 2, "bias": jnp.zeros((8, 8))},
     "local_window_size together with a bias"),
    ({"logits_soft_cap": 2.0, "mask": jnp.ones((8, 8), bool)},
     "logits_soft_cap together with a bias"),
    ({"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}, "dropout"),
    ({"value_dim": 6, "mask": jnp.ones((8, 8), bool)},
     "value head_dim 6 != query head_dim 4 together with a bias"),
    ({"head_dim": 192, "bias": jnp.zeros((8, 8))}, "head_dim 192 with a bias"),
    ({"precision": "highest"}, "precision='highest'"),
])
def test_tpu_unsupported_raise_value_error(kw, words):
  kw = dict(kw)
  q, k, v = _inputs(1, 8, 8, 2, 2, kw.pop("head_dim", 4),
                    Dv=kw.pop("value_dim", None))
  with pallas_kernels.interpret("tpu"), pytest.raises(ValueError,
                                                      match=words) as e:
    attn.dot_product_attention(q, k, v, implementation="pallas", **kw)
  assert "'xla'" in str(e.value)


@pytest.mark.parametrize("kw, words", [
    ({"local_window_size": 2}, "local_window_size"),
    ({"bias": jnp.zeros((8, 8))}, "bias"),
    ({"key_value_seq_lengths": jnp.asarray([3])}, "query_seq_lengths"),
    ({"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}, "dropout"),
    ({"mask": jnp.ones((8, 8), bool)}, "a dense mask"),
    ({"logits_soft_cap": 3.0}, "logits_soft_cap"),
    ({"segment_ids": (jnp.zeros((1, 8), jnp.int32),
                      jnp.ones((1, 8), jnp.int32))}, "separate query/key"),
    ({"return_weights": True}, "return_weights"),
    ({"value_dim": 6}, "value head_dim 6 != query head_dim 4"),
    ({"precision": jax.lax.Precision.HIGHEST}, "precision=Precision.HIGHEST"),
])
def test_gpu_unsupported_raise_value_error(kw, words):
  kw = dict(kw)
  q, k, v = _inputs(1, 8, 8, 2, 2, 4, Dv=kw.pop("value_dim", None))
  with pallas_kernels.interpret("gpu"), pytest.raises(ValueError, match=words) as e:
    attn.dot_product_attention(q, k, v, implementation="pallas", **kw)
  assert "'xla'" in str(e.value)   # names who can


def test_gpu_traced_lengths_query_longer_than_keys_run_chunked():
  # Under jit the lengths are traced: an example with query length > key
  # length cannot be one segment array, so that call takes the chunked
  # kernel (a lax.cond at run time); the other branch is the Pallas kernel.
  q, k, v = _inputs(2, 24, 24, 4, 2, 8)

  def loss(impl, q, k, v, q_len, kv_len):
    out = attn.dot_product_attention(
        q, k, v, implementation=impl, is_causal=True,
        query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    return jnp.sum(out * jnp.cos(out)), out

  step = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True),
                 static_argnums=0, compiler_options=_FAST_COMPILE)
  for q_len, kv_len in (([20, 24], [12, 24]), ([12, 24], [20, 24])):
    lens = jnp.asarray(q_len), jnp.asarray(kv_len)
    (_, ref), ref_g = step("xla", q, k, v, *lens)
    with pallas_kernels.interpret("gpu"):
      (_, out), g = step("pallas", q, k, v, *lens)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(g, ref_g):
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_gpu_lengths_query_longer_than_keys_refused():
  q, k, v = _inputs(1, 8, 8, 2, 2, 4)
  with pallas_kernels.interpret("gpu"), pytest.raises(ValueError,
                                                      match="<="):
    attn.dot_product_attention(
        q, k, v, implementation="pallas",
        query_seq_lengths=jnp.asarray([8]),
        key_value_seq_lengths=jnp.asarray([4]))


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_reserved_segment_id_refused(target):
  q, k, v = _inputs(1, 8, 8, 2, 2, 4)
  seg = jnp.asarray([[0] * 4 + [pallas_kernels.SENTINEL] * 4], jnp.int32)
  with pallas_kernels.interpret(target), pytest.raises(
      ValueError, match="reserved by implementation='pallas'.*renumber"):
    attn.dot_product_attention(q, k, v, implementation="pallas",
                               segment_ids=seg)


def test_pallas_off_accelerator_says_so():
  q, k, v = _inputs(1, 8, 8, 2, 2, 4)
  with pytest.raises(ValueError, match="needs an NVIDIA GPU or a TPU"):
    attn.dot_product_attention(q, k, v, implementation="pallas")


@pytest.mark.parametrize("platform, dtype, kw, tried", [
    ("gpu", jnp.bfloat16, {}, ["cudnn", "pallas", "xla"]),
    ("gpu", jnp.float32, {}, ["pallas", "xla"]),
    ("gpu", jnp.bfloat16, {"segment_ids": jnp.zeros((1, 8), jnp.int32)},
     ["pallas", "xla"]),
    ("gpu", jnp.bfloat16, {"local_window_size": 2}, ["cudnn", "xla"]),
    ("gpu", jnp.bfloat16, {"precision": jax.lax.Precision.HIGHEST}, ["xla"]),
    ("tpu", jnp.float32, {}, ["pallas", "xla"]),
    ("tpu", jnp.float32, {"local_window_size": 2}, ["pallas", "xla"]),
    ("tpu", jnp.float32, {"local_window_size": 2, "bias": jnp.zeros((8, 8))},
     ["xla"]),
    ("cpu", jnp.float32, {}, ["xla"]),
])
def test_implementation_order(monkeypatch, platform, dtype, kw, tried):
  monkeypatch.setattr(exact, "_platform", lambda: platform)
  q, k, v = (x.astype(dtype) for x in _inputs(1, 8, 8, 2, 2, 4))
  order = exact.implementation_order(q, k, v, **kw)
  assert [n for n, why in order if why is None] == tried
  assert all(why for n, why in order if n not in tried)
  inputs = attn.kernels.canonical.canonicalize(q, k, v, **kw)
  assert exact.auto_implementations(
      inputs, dropout_rate=0.0, return_weights=False) == tried


def test_implementation_order_names_the_reason(monkeypatch):
  monkeypatch.setattr(exact, "_platform", lambda: "gpu")
  q, k, v = _inputs(1, 8, 8, 2, 2, 4)
  reasons = dict(exact.implementation_order(q, k, v, local_window_size=2))
  assert "float32" in reasons["cudnn"]
  assert "local_window_size" in reasons["pallas"]
  assert "short sequence" in reasons["chunked"]
  long = _inputs(1, 1024, 1024, 1, 1, 4)
  assert dict(exact.implementation_order(*long, platform="cpu"))[
      "chunked"] is None
