"""Tests for attn.positional against NumPy float64 formulas and hand-computed
values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn import positional as pe


def test_positional_kinds_and_unknown_name():
  assert pe.POSITIONAL_ENCODINGS == ("none", "sinusoidal", "learned", "rope",
                                     "alibi", "t5")
  kinds = [pe.positional_kind(n) for n in pe.POSITIONAL_ENCODINGS]
  assert kinds == ["none", "absolute", "absolute", "rotary", "bias", "bias"]
  with pytest.raises(ValueError, match="sinusoidal, learned, rope"):
    pe.positional_kind("xpos")


def test_sinusoidal_matches_the_paper_formula():
  length, dim, offset = 50, 16, 7
  got = np.asarray(pe.sinusoidal_encoding(length, dim, offset=offset))
  want = np.zeros((length, dim))
  for p in range(length):
    for i in range(dim // 2):
      angle = (p + offset) / 10000.0 ** (2 * i / dim)
      want[p, 2 * i], want[p, 2 * i + 1] = math.sin(angle), math.cos(angle)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-5)
  # a traced offset (incremental decoding) gives the same rows
  jitted = jax.jit(lambda o: pe.sinusoidal_encoding(length, dim, offset=o))
  np.testing.assert_allclose(jitted(offset), got, atol=1e-6)
  with pytest.raises(ValueError, match="even"):
    pe.sinusoidal_encoding(4, 7)


def test_sinusoidal_2d_rows_then_columns():
  got = np.asarray(pe.sinusoidal_2d(3, 5, 16))
  assert got.shape == (15, 16)
  rows = np.asarray(pe.sinusoidal_encoding(3, 8))
  cols = np.asarray(pe.sinusoidal_encoding(5, 8))
  for r in range(3):
    for c in range(5):
      np.testing.assert_array_equal(got[r * 5 + c, :8], rows[r])
      np.testing.assert_array_equal(got[r * 5 + c, 8:], cols[c])
  with pytest.raises(ValueError, match="multiple of 4"):
    pe.sinusoidal_2d(2, 2, 10)


def np_rope(x, positions, base=10000.0):
  """Rotate-half RoPE in float64, x [B, T, N, H], positions [B, T]."""
  h = x.shape[-1]
  inv = base ** (-np.arange(0, h, 2) / h)
  ang = positions[:, :, None, None] * inv
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def test_rope_matches_numpy_and_keeps_dtype():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 3, 8))
  pos = rng.integers(0, 100, size=(2, 6))
  got = pe.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos))
  np.testing.assert_allclose(got, np_rope(x, pos), atol=1e-4)
  default = pe.apply_rope(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(default, np_rope(x, np.tile(np.arange(6), (2, 1))),
                             atol=1e-5)
  bf16 = pe.apply_rope(jnp.asarray(x, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), default, atol=5e-2)
  with pytest.raises(ValueError, match="even head_dim"):
    pe.apply_rope(jnp.zeros((1, 2, 1, 5)))
  with pytest.raises(ValueError, match="positions"):
    pe.apply_rope(jnp.zeros((1, 2, 1, 4)), jnp.arange(3))


@settings(max_examples=5, deadline=None)
@given(shift=st.integers(-50, 1000), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_offset(shift, seed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 60, size=5))

  def scores(p):
    return jnp.einsum("btnh,bsnh->bnts", pe.apply_rope(q, p),
                      pe.apply_rope(k, p))

  np.testing.assert_allclose(scores(pos + shift), scores(pos), atol=2e-3)
  # ...and they do depend on it: moving only the keys changes them
  moved = jnp.einsum("btnh,bsnh->bnts", pe.apply_rope(q, pos),
                     pe.apply_rope(k, pos + 3))
  assert np.abs(np.asarray(moved - scores(pos))).max() > 1e-2


def test_alibi_slopes_hand_computed():
  np.testing.assert_allclose(pe.alibi_slopes(8), [2.0 ** -i for i in
                                                  range(1, 9)])
  np.testing.assert_allclose(pe.alibi_slopes(4), [2.0 ** -(2 * i) for i in
                                                  range(1, 5)])
  # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads
  twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5)
                                               for i in range(0, 4)]
  np.testing.assert_allclose(pe.alibi_slopes(12), twelve, rtol=1e-6)
  np.testing.assert_allclose(pe.alibi_slopes(1), [2.0 ** -8])
  with pytest.raises(ValueError):
    pe.alibi_slopes(0)


def test_alibi_bias_hand_computed():
  bias = np.asarray(pe.alibi_bias(2, 3, 4))  # 2 heads: slopes 1/16, 1/256
  assert bias.shape == (1, 2, 3, 4) and bias.dtype == np.float32
  dist = np.array([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1]])
  np.testing.assert_allclose(bias[0, 0], -dist / 16)
  np.testing.assert_allclose(bias[0, 1], -dist / 256)
  causal = np.asarray(pe.alibi_bias(8, 2, 4, causal=True, q_offset=2))
  # query positions 2, 3; keys after the query get 0 (the mask removes them)
  np.testing.assert_allclose(causal[0, 0], -0.5 * np.array([[2, 1, 0, 0],
                                                            [3, 2, 1, 0]]))
  np.testing.assert_allclose(causal[0, 7], causal[0, 0] / 128)


def t5_bucket_brute_force(n, bidirectional, num_buckets, max_distance):
  """The T5 formula for one relative offset n = query pos - key pos."""
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  large = max_exact + int(
      np.float32(math.log(n / max_exact)) / np.float32(
          math.log(max_distance / max_exact)) * (num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


def test_t5_buckets_hand_computed():
  # bidirectional, 32 buckets, max distance 128: query at 200, keys around it
  offsets = np.array([0, 1, 7, 8, 15, 16, 127, 128, 199, -1, -7, -8, -128])
  keys = 200 - offsets
  got = np.asarray(pe.t5_relative_buckets(1, 400, q_offset=200))[0, keys]
  np.testing.assert_array_equal(
      got, [0, 1, 7, 8, 9, 10, 15, 15, 15, 17, 23, 24, 31])
  uni = np.asarray(pe.t5_relative_buckets(1, 400, bidirectional=False,
                                          q_offset=200))[0, keys]
  np.testing.assert_array_equal(uni, [0, 1, 7, 8, 15, 16, 31, 31, 31, 0, 0,
                                      0, 0])


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", [
    (True, 32, 128), (False, 32, 128), (True, 8, 20)])
def test_t5_buckets_match_brute_force(bidirectional, num_buckets,
                                      max_distance):
  got = np.asarray(pe.t5_relative_buckets(
      40, 300, bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance, q_offset=150))
  assert got.dtype == np.int32
  want = np.array([[t5_bucket_brute_force(150 + t - s, bidirectional,
                                          num_buckets, max_distance)
                    for s in range(300)] for t in range(40)])
  np.testing.assert_array_equal(got, want)


def test_t5_relative_bias_looks_up_the_table():
  table = jnp.asarray(np.random.default_rng(1).normal(size=(32, 3)),
                      jnp.float32)
  buckets = pe.t5_relative_buckets(4, 6)
  bias = np.asarray(pe.t5_relative_bias(table, buckets))
  assert bias.shape == (1, 3, 4, 6)
  for n in range(3):
    np.testing.assert_array_equal(bias[0, n],
                                  np.asarray(table)[np.asarray(buckets), n])
  with pytest.raises(ValueError, match="table"):
    pe.t5_relative_bias(table[0], buckets)
