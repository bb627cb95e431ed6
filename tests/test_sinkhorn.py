"""Tests of Sparse Sinkhorn attention ``sinkhorn``."""

import jax.numpy as jnp
import numpy as np

from tests.reference import reference_output
from tests.variant_helpers import (B, T, N, make_inputs, call,
                                   random_params, lengths_mask)


def test_sinkhorn_single_block_is_exact_attention():
  q, k, v = make_inputs(seed=16)
  lengths = jnp.array([12, 16])
  mask = lengths_mask(lengths, T)
  for causal in (False, True):
    out = call("sinkhorn(block_size=16)", q, k, v, is_causal=causal,
                key_value_seq_lengths=lengths)
    full = mask & np.tril(np.ones((T, T), bool)) if causal else mask
    np.testing.assert_allclose(out, reference_output(q, k, v, full), atol=2e-5)


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
  q, k, v = make_inputs(k=N, seed=18)
  spec = "sinkhorn(block_size=4, hidden=8, partners=2, n_iters=3, " \
         "temperature=0.5)"
  p = random_params(spec, q, k)
  out = call(spec, q, k, v, params=p)
  p64 = {n: np.asarray(x, np.float64) for n, x in p.items()}
  for b in range(B):
    want = np_sinkhorn(*(np.asarray(x, np.float64)[b] for x in (q, k, v)),
                       p64, 4, 2, 3, 0.5)
    np.testing.assert_allclose(out[b], want, atol=2e-5)
