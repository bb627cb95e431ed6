"""Tests of BigBird block-sparse attention ``bigbird``."""

import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kernels import bigbird as bigbird_lib
from tests.reference import reference_output
from tests.variant_helpers import make_inputs, run


def _bigbird_mask(t, s, block, table, n_global, causal, kv_len):
  """Dense [1, 1, t, s] mask of the BigBird pattern (brute force)."""
  mask = np.zeros((1, 1, t, s), bool)
  for i in range(t):
    for j in range(s):
      ok = (j // block) in table[i // block] or i < n_global * block
      ok &= j < kv_len and (j <= i or not causal)
      mask[0, 0, i, j] = ok
  return mask


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_matches_brute_force_pattern(causal):
  q, k, v = make_inputs(b=1, t=22, s=22, seed=18)
  options = dict(num_window_blocks=3, num_global_blocks=1,
                 num_random_blocks=1, seed=5)
  out = run(
      "bigbird(block_size=3, num_window_blocks=3, num_global_blocks=1, "
      "num_random_blocks=1, seed=5)", q, k, v, is_causal=causal,
      key_value_seq_lengths=jnp.array([20]))
  table = bigbird_lib.bigbird_block_table(8, 8, is_causal=causal, **options)
  mask = _bigbird_mask(22, 22, 3, table, 1, causal, 20)
  assert not mask.all()
  np.testing.assert_allclose(out, reference_output(q, k, v, mask),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_full_window_is_exact(causal):
  q, k, v = make_inputs(seed=19)
  out = run("bigbird(block_size=4, num_window_blocks=7)", q, k, v,
             is_causal=causal)
  exact = attn.dot_product_attention(q, k, v, is_causal=causal,
                                     implementation="xla")
  np.testing.assert_allclose(out, exact, rtol=2e-5, atol=2e-5)


def test_bigbird_block_table_properties():
  for causal in (False, True):
    table = bigbird_lib.bigbird_block_table(
        12, 12, num_window_blocks=3, num_global_blocks=2,
        num_random_blocks=3, is_causal=causal, seed=0)
    again = bigbird_lib.bigbird_block_table(
        12, 12, num_window_blocks=3, num_global_blocks=2,
        num_random_blocks=3, is_causal=causal, seed=0)
    np.testing.assert_array_equal(table, again)
    for i, row in enumerate(table):
      row = row[row >= 0]
      assert len(set(row)) == len(row)
      assert {0, 1} <= set(row) or (causal and i < 1)
      if causal:
        assert row.max() <= i
      elif 3 <= i <= 10:
        assert len(row) == 3 + 2 + 3   # window + global + random
