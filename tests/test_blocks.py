"""Tests of the per-head / blocking helpers in ``attn.kernels.blocks``."""

import jax.numpy as jnp
import numpy as np

import attn
from attn.kernels import blocks
from tests.variant_helpers import B, T, make_inputs


def test_validity_factorises_padding_masks():
  """[B,1,1,S] / [B,1,T,1] masks become validity vectors (AND lengths)."""
  q, k, v = make_inputs(s=12)
  key_mask = jnp.asarray(np.random.default_rng(0).random((B, 1, 1, 12)) > .3)
  inputs = attn.kernels.canonical.canonicalize(
      q, k, v, mask=key_mask, key_value_seq_lengths=jnp.array([12, 7]))
  q_valid, kv_valid = blocks.validity("x", inputs)
  assert q_valid is None
  np.testing.assert_array_equal(
      kv_valid, key_mask[:, 0, 0] & (np.arange(12) < np.array([[12], [7]])))
  row_mask = jnp.asarray([True] * 5 + [False] * (T - 5))[None, None, :, None]
  inputs = attn.kernels.canonical.canonicalize(q, k, v, mask=row_mask)
  q_valid, kv_valid = blocks.validity("x", inputs)
  assert kv_valid is None
  np.testing.assert_array_equal(q_valid, np.broadcast_to(row_mask[0, 0, :, 0],
                                                         (B, T)))


def test_window_blocks_cover_window_and_nothing_far():
  table = blocks.window_blocks(40, 30, 8, (5, 9), is_causal=False)
  assert table.shape[0] == 5
  for i, row in enumerate(table):
    needed = set(range(max(0, (8 * i - 5) // 8),
                       min(3, (8 * i + 7 + 9) // 8) + 1))
    assert needed <= set(row[row >= 0].tolist())
  assert (table < 4).all()
