"""Ring attention (attn.kernels.ring).

Multi-device checks run on 8 simulated CPU devices in a subprocess (see
tests/multidevice_helpers.py); the blockwise math, padding and error paths
are also checked in-process on a one-device mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attn
from attn.kernels.ring import ring_attention
from attn.parallel import make_mesh
from attn.registry import get_entry
from tests import multidevice_helpers as helpers

F32_TOL = 2e-5
BF16_TOL = 3e-2


def _one_device_mesh():
  return make_mesh(data=1, seq=1, devices=jax.devices()[:1])


def _normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def eight_devices():
  """The 8-device checks of this module, in one subprocess (one start)."""
  return helpers.run_helper("ring", "memory", "--length=65536")


def test_ring_on_8_devices_matches_single_device_attention(eight_devices):
  """Shards of 2/4/8, causal and not, padding, bias/mask, bf16, Flax."""
  results = eight_devices["ring"]
  expected = {f"seq{n}_{c}" for n in (2, 4, 8) for c in ("full", "causal")}
  expected |= {"padding_lengths", "shorter_than_ring", "cross_bias_mask",
               "segments_window_bias",
               "bf16_causal", "explicit_axes_mesh", "flax_by_name"}
  assert set(results) == expected
  failures = []
  for case, errors in results.items():
    tol = BF16_TOL if case.startswith("bf16") else F32_TOL
    assert "out" in errors and any(n.startswith("d") for n in errors), errors
    for name, err in errors.items():
      if not err <= tol:
        failures.append(f"{case}.{name} = {err:.3g} > {tol}")
  assert not failures, failures


def test_ring_memory_on_8_devices_at_64k_is_a_sixth_of_chunked(
    eight_devices):
  """XLA memory analysis, T=65536, 8 heads of 64, causal forward."""
  mem = eight_devices["memory"]
  ring, chunked = mem["ring_seq8"]["total"], mem["chunked_1device"]["total"]
  # Per-device inputs and output are 1/8 of the single-device ones.
  assert mem["ring_seq8"]["argument"] * 8 == mem["chunked_1device"]["argument"]
  assert ring * 6 <= chunked, mem
  # The ring's own scaling: per-device memory is O(T/8) plus one receive
  # buffer, not O(T) (measured about 0.26 of the one-device ring).
  assert ring * 3 <= mem["ring_seq1"]["total"], mem


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 2), t=st.integers(1, 13), s=st.integers(1, 13),
       kv_heads=st.sampled_from([1, 2]), causal=st.booleans(),
       block_q=st.integers(1, 5), block_k=st.integers(1, 5),
       seed=st.integers(0, 2 ** 16))
def test_blockwise_forward_matches_numpy(batch, t, s, kv_heads, causal,
                                         block_q, block_k, seed):
  """Chunking, skipping, padding and lengths on a one-device mesh."""
  rng = np.random.default_rng(seed)
  N, H = 2, 4
  q = _normal(rng, batch, t, N, H)
  k, v = _normal(rng, batch, s, kv_heads, H), _normal(rng, batch, s,
                                                      kv_heads, H)
  q_len = rng.integers(0, t + 1, size=batch).astype(np.int32)
  kv_len = rng.integers(0, s + 1, size=batch).astype(np.int32)
  # Jitted: one program per example (eagerly, one per operation).
  out = jax.jit(functools.partial(
      ring_attention, mesh=_one_device_mesh(), is_causal=causal,
      block_q=block_q, block_k=block_k))(
          q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
  ref = helpers.numpy_attention(q, k, v, mask=helpers.numpy_mask(
      batch, N, t, s, is_causal=causal, q_lengths=q_len, kv_lengths=kv_len))
  assert out.shape == (batch, t, N, H) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, atol=F32_TOL,
                             rtol=F32_TOL)


def test_gradients_match_xla_on_one_device():
  rng = np.random.default_rng(1)
  q, k, v = (_normal(rng, 2, 11, 4, 8) for _ in range(3))
  bias = _normal(rng, 1, 4, 11, 11)
  kw = dict(is_causal=True, key_value_seq_lengths=jnp.asarray([11, 0]))

  def loss(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a)))

  mesh = _one_device_mesh()
  grads = jax.jit(jax.grad(loss(lambda q, k, v, b: ring_attention(
      q, k, v, b, mesh=mesh, block_q=3, block_k=4, **kw)),
                           argnums=(0, 1, 2, 3)))(q, k, v, bias)
  ref = jax.jit(jax.grad(loss(lambda q, k, v, b: attn.dot_product_attention(
      q, k, v, b, implementation="xla", **kw)), argnums=(0, 1, 2, 3)))(
          q, k, v, bias)
  for g, r in zip(grads, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=F32_TOL)
  # Example 1 sees no key at all: zero, finite gradients.
  assert np.all(np.asarray(grads[0][1]) == 0.0)


def test_registered_by_name_and_needs_a_seq_mesh():
  entry = get_entry("ring")
  assert entry.exact and entry.causal and entry.cross
  assert {"mesh", "seq_axis", "block_q", "block_k"} <= set(entry.options)
  assert "ring" in attn.list_attention()
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="mesh with a 'seq' axis"):
    attn.get_attention("ring")(q, q, q)
  no_seq = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"has axes \('data',\)"):
    ring_attention(q, q, q, mesh=no_seq)
  with jax.set_mesh(_one_device_mesh()):
    out = attn.get_attention("ring(block_q=2)")(q, q, q, is_causal=True)
  assert out.shape == q.shape


def test_rejects_what_it_cannot_do():
  q = jnp.ones((1, 4, 2, 8))
  fn = attn.get_attention("ring")
  mesh = _one_device_mesh()
  with pytest.raises(ValueError, match="does not support dropout"):
    fn(q, q, q, mesh=mesh, dropout_rate=0.1, deterministic=False,
       dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match="block_q must be a positive int"):
    ring_attention(q, q, q, mesh=mesh, block_q=0)
  with pytest.raises(ValueError, match="static Python float scale"):
    jax.jit(lambda s: ring_attention(q, q, q, mesh=mesh, scale=s))(0.5)
