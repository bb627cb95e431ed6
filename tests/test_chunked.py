"""Tests for memory-efficient exact attention (``implementation="chunked"``).

References: the float64 NumPy reference of tests/reference.py
(forward), ``implementation="xla"`` (forward and autodiff VJP), and
``jax.nn.dot_product_attention`` (forward and autodiff VJP).
Small blocks (8 x 16) with lengths that are not multiples of them make every
case run several padded blocks.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

import attn
from attn.kernels import chunked
from attn.kernels.exact import dot_product_attention
from tests.jaxprs import equations
from tests.reference import reference_mask, reference_output

BLOCKS = dict(block_q=8, block_k=16)


def _normal(seed, shape, dtype=jnp.float32):
  # NumPy, not jax.random: no XLA compilation per new shape.
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x, dtype)


def _qkv(B=2, T=37, S=53, N=4, K=2, H=16, Dv=8, dtype=jnp.float32, seed=0):
  return (_normal(seed, (B, T, N, H), dtype),
          _normal(seed + 1, (B, S, K, H), dtype),
          _normal(seed + 2, (B, S, K, Dv), dtype))


def reference(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None,
              local_window_size=None, segment_ids=None):
  """tests/reference.py's float64 output with the structural options as a
  brute-force mask (keyword names as in ``dot_product_attention``)."""
  B, T, N, _ = q.shape
  S = k.shape[1]
  seg = None if segment_ids is None else np.asarray(segment_ids)
  ok = reference_mask(
      B, T, S, is_causal=is_causal, window=local_window_size,
      q_lengths=None if query_seq_lengths is None
      else np.asarray(query_seq_lengths),
      kv_lengths=None if key_value_seq_lengths is None
      else np.asarray(key_value_seq_lengths),
      q_segment_ids=seg, kv_segment_ids=seg)
  if mask is not None:
    ok = ok & np.asarray(mask)
  return reference_output(q, k, v, mask=ok, bias=bias, scale=scale)


def chunked_fwd(q, k, v, bias=None, **kwargs):
  """Jitted forward of ``implementation="chunked"`` (small test blocks)."""
  blocks = {**BLOCKS, **{n: kwargs.pop(n) for n in BLOCKS if n in kwargs}}
  return jax.jit(lambda q, k, v, bias: dot_product_attention(
      q, k, v, bias, implementation="chunked", **blocks, **kwargs))(
          q, k, v, bias)


def out_and_grads(impl, q, k, v, bias, cotangent, **kwargs):
  """``(out, (dq, dk, dv, dbias))``, jitted; impl "jax_nn" = jax.nn's."""

  def f(q, k, v, bias):
    if impl == "jax_nn":
      return jax.nn.dot_product_attention(q, k, v, bias, implementation="xla",
                                          **kwargs)
    options = {**BLOCKS, **kwargs} if impl == "chunked" else kwargs
    return dot_product_attention(q, k, v, bias, implementation=impl,
                                 **options)

  @jax.jit
  def run(q, k, v, bias, cotangent):
    out, vjp = jax.vjp(f, q, k, v, bias)
    return out, vjp(cotangent)

  return run(q, k, v, bias, cotangent)


def assert_close(actual, expected, tol):
  np.testing.assert_allclose(np.asarray(actual, np.float64),
                             np.asarray(expected, np.float64),
                             rtol=tol, atol=tol)


def _case(mode, B=2, T=37, S=53):
  """``(bias, kwargs)`` for a mode like ``"causal+bias+lengths"``."""
  parts = set(mode.split("+"))
  rng = np.random.default_rng(0)
  bias = None
  kw = {}
  if "bias" in parts:                   # per head, shared over batch
    bias = _normal(7, (1, 4, T, S))
  if "keybias" in parts:                # per example and key
    bias = _normal(7, (B, 1, 1, S))
  if "mask" in parts:
    kw["mask"] = jnp.asarray(rng.random((B, 1, T, S)) < 0.7)
  if "causal" in parts:
    kw["is_causal"] = True
  if "lengths" in parts:
    kw["query_seq_lengths"] = jnp.array([T, 11], jnp.int32)
    kw["key_value_seq_lengths"] = jnp.array([20, S], jnp.int32)
  if "window" in parts:
    kw["local_window_size"] = (9, 4)
  if "segments" in parts:
    kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), -1))
  return bias, kw


MODES = ["plain", "causal", "bias", "keybias+lengths", "mask+window",
         "causal+window", "segments", "causal+bias+mask+lengths+window"]


@pytest.mark.parametrize("mode", MODES)
def test_matches_xla_and_numpy(mode):
  """Forward vs NumPy float64 and xla; VJP w.r.t. q, k, v, bias vs xla."""
  self_attention = "segments" in mode
  T, S = (37, 37) if self_attention else (37, 53)
  q, k, v = _qkv(T=T, S=S)
  bias, kw = _case(mode, T=T, S=S)
  cotangent = _normal(9, (2, T, 4, 8))
  out, grads = out_and_grads("chunked", q, k, v, bias, cotangent, **kw)
  ref_out, ref_grads = out_and_grads("xla", q, k, v, bias, cotangent, **kw)
  assert_close(out, reference(q, k, v, bias, **kw), 2e-5)
  assert_close(out, ref_out, 2e-5)
  for g, r in zip(grads, ref_grads):
    if r is None:
      assert g is None
    else:
      assert g.shape == r.shape and g.dtype == r.dtype
      assert_close(g, r, 5e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_matches_jax_nn_gqa(num_kv_heads):
  """GQA groups 1/2/4, causal + bias + key padding: forward, VJP vs jax.nn."""
  q, k, v = _qkv(T=45, S=45, N=4, K=num_kv_heads, H=16, Dv=16)
  bias = _normal(3, (1, 4, 45, 45))
  cotangent = _normal(4, (2, 45, 4, 16))
  kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([45, 30]))
  ref_out, ref_grads = out_and_grads("jax_nn", q, k, v, bias, cotangent, **kw)
  out, grads = out_and_grads("chunked", q, k, v, bias, cotangent, **kw)
  assert_close(out, ref_out, 2e-5)
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, 5e-5)


def test_vjp_matches_numpy_finite_differences():
  """<J^T c, u> == d/de <c, f(x + e u)> with the float64 NumPy forward."""
  q, k, v = _qkv(B=1, T=20, S=29, N=2, K=1, H=8, Dv=8)
  bias = _normal(5, (1, 2, 20, 29))
  kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([25]))
  cotangent = _normal(6, (1, 20, 2, 8))
  _, grads = out_and_grads("chunked", q, k, v, bias, cotangent, **kw)
  args = [np.asarray(x, np.float64) for x in (q, k, v, bias)]
  c = np.asarray(cotangent, np.float64)
  eps = 1e-6
  for n, grad in enumerate(grads):
    u = np.asarray(_normal(20 + n, args[n].shape), np.float64)
    plus = [a + eps * u if m == n else a for m, a in enumerate(args)]
    minus = [a - eps * u if m == n else a for m, a in enumerate(args)]
    numeric = np.sum(c * (reference(*plus, **kw) - reference(*minus, **kw))
                     ) / (2 * eps)
    analytic = np.sum(np.asarray(grad, np.float64) * u)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-4)


def test_causal_cross_attention_more_queries_than_keys():
  """T > S with causal masking: positions are top-left aligned (as xla)."""
  q, k, v = _qkv(B=1, T=70, S=16)
  out = chunked_fwd(q, k, v, is_causal=True)
  assert_close(out, reference(q, k, v, is_causal=True), 2e-5)


# CPU flags under which half-precision blocks run natively / in float32.
CPU_FLAGS = {"native": frozenset({"avx2", "avx512_bf16", "amx_fp16"}),
             "float32": frozenset({"avx2", "fma"})}


@pytest.mark.parametrize("blocks", sorted(CPU_FLAGS))
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2),
                                       (jnp.float16, 4e-3)])
def test_low_precision(dtype, tol, blocks, monkeypatch):
  """bf16/fp16 in, same dtype out; matches float64 and xla; finite grads;
  with the score blocks in the input dtype and in float32."""
  monkeypatch.setattr(chunked, "_cpu_flags", lambda: CPU_FLAGS[blocks])
  q, k, v = _qkv(T=40, S=40, dtype=dtype)
  bias, kw = _case("causal+bias+mask", T=40, S=40)
  bias = bias.astype(dtype)
  cotangent = _normal(9, (2, 40, 4, 8), dtype)
  out, grads = out_and_grads("chunked", q, k, v, bias, cotangent, **kw)
  ref_out, ref_grads = out_and_grads("xla", q, k, v, bias, cotangent, **kw)
  assert out.dtype == dtype
  assert_close(out, reference(q, k, v, bias, **kw), tol)
  assert_close(out, ref_out, tol)
  for g, r in zip(grads, ref_grads):
    assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g)))
    assert_close(g, r, 4 * tol)


@pytest.mark.parametrize("T", [64, 256, 700])
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2),
                                       (jnp.float16, 4e-3)])
def test_native_half_blocks_differentiate_at_default_blocks(dtype, tol, T,
                                                           monkeypatch):
  """Half-precision blocks (a CPU with bf16/fp16 matrix instructions) at the
  default block sizes, run, not just traced: one block (T = 64, 256) and
  several (700). The transposed dq dot once failed here when run, at
  T <= 256 (XLA:CPU: "Unsupported element type for DotThunk::Execute:
  BF16 x BF16 = F32"), so half blocks compute dq untransposed."""
  monkeypatch.setattr(chunked, "_cpu_flags", lambda: CPU_FLAGS["native"])
  assert not chunked.transposed_dq(dtype) and chunked.transposed_dq(
      jnp.float32)
  q, k, v = _qkv(B=1, T=T, S=T, dtype=dtype)
  cotangent = _normal(9, (1, T, 4, 8), dtype)

  @functools.partial(jax.jit, static_argnums=0)
  def run(impl, q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, implementation=impl), q, k, v)
    return out, vjp(cotangent)

  out, grads = run("chunked", q, k, v)
  ref_out, ref_grads = run("xla", q, k, v)
  assert out.dtype == dtype
  assert_close(out, ref_out, tol)
  for g, r in zip(grads, ref_grads):
    assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g)))
    assert_close(g, r, 4 * tol)


def _dot_dtypes(jaxpr):
  """Operand dtypes of every dot_general in a jaxpr, nested ones included."""
  return {str(x.aval.dtype) for eqn in equations(jaxpr)
          if eqn.primitive.name == "dot_general" for x in eqn.invars}


@pytest.mark.parametrize("flags,dtype,platform,want", [
    ({"avx2", "fma"}, "bfloat16", "cpu", "float32"),
    ({"avx2", "fma"}, "float16", "cpu", "float32"),
    ({"avx2", "fma"}, "float32", "cpu", "float32"),
    ({"avx2", "fma"}, "float64", "cpu", "float64"),
    ({"avx512f", "avx512_bf16"}, "bfloat16", "cpu", "bfloat16"),
    ({"avx512f", "avx512_bf16"}, "float16", "cpu", "float32"),
    ({"amx_bf16", "amx_fp16"}, "float16", "cpu", "float16"),
    ({"fp", "asimd", "bf16"}, "bfloat16", "cpu", "bfloat16"),
    (None, "bfloat16", "cpu", "bfloat16"),
    ({"avx2"}, "bfloat16", "gpu", "bfloat16"),
    ({"avx2"}, "float16", "tpu", "float16"),
])
def test_block_dtype_follows_the_cpu_flags(flags, dtype, platform, want,
                                           monkeypatch):
  """Half-precision blocks run in float32 only on a CPU that lists no
  native bf16/fp16 matrix instructions; every dot of the kernel then takes
  float32 operands, while the output and gradients keep the input dtype."""
  monkeypatch.setattr(chunked, "_cpu_flags",
                      lambda: None if flags is None else frozenset(flags))
  assert chunked.block_dtype(jnp.dtype(dtype), platform) == jnp.dtype(want)
  if platform != "cpu" or dtype == "float64":
    return
  q, k, v = _qkv(T=20, S=20, dtype=dtype)

  def f(q, k, v):
    return dot_product_attention(q, k, v, implementation="chunked", **BLOCKS)

  def out_and_grads(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(out)

  traced = jax.make_jaxpr(out_and_grads)(q, k, v)   # traced, not compiled
  assert {str(x.dtype) for x in traced.out_avals} == {dtype}
  assert _dot_dtypes(traced.jaxpr) == {want}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_block_matmul_contracts_the_left_operands_last_axis(causal,
                                                                  with_bias):
  """Forward and backward, every dot of the kernel contracts its left
  operand over the last axis: XLA:CPU runs a dot contracting the left
  operand's leading axis about 1.7x slower, so dq is computed transposed,
  dqᵀ = kᵀ · dsᵀ, from key blocks stored transposed
  (online_softmax.backward_step's ``k_HC``). 2 forward + 5 backward
  matmuls per block (two branches of the masking cond when causal)."""
  q, k, v = _qkv(T=1100, S=1100 if causal else 700, N=4, K=2)
  bias = (None if not with_bias else
          jnp.ones((2, 4, q.shape[1], k.shape[1]), jnp.float32))

  def loss(q, k, v):
    return dot_product_attention(q, k, v, bias=bias, is_causal=causal,
                                 implementation="chunked").sum()

  traced = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  dots = [(eqn.params["dimension_numbers"][0][0], eqn.invars[0].aval.ndim)
          for eqn in equations(traced.jaxpr)
          if eqn.primitive.name == "dot_general"]
  assert len(dots) >= 7
  assert all(contract == (ndim - 1,) for contract, ndim in dots), dots


def test_cpu_flags_reads_this_machine():
  """``_cpu_flags`` parses /proc/cpuinfo where it exists (None elsewhere)."""
  flags = chunked._cpu_flags.__wrapped__()
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    assert flags is None
    return
  line = next((l for l in text.splitlines()
               if l.split(":")[0].strip() in ("flags", "Features")), None)
  assert flags == (None if line is None else frozenset(
      line.split(":", 1)[1].split()))


def test_large_logits_stay_finite():
  """Logits around 1e4 in bf16: no overflow, no NaN, same as float64."""
  q, k, v = _qkv(B=1, T=24, S=24, dtype=jnp.bfloat16)
  q = q * 300
  out = chunked_fwd(q, k, v, is_causal=True)
  assert bool(jnp.all(jnp.isfinite(out)))
  assert_close(out, reference(q, k, v, is_causal=True), 3e-2)


def test_fully_masked_rows_are_zero_with_zero_grads():
  """Rows with nothing to attend to: zeros out, finite zero dq and dbias."""
  B, T, S = 2, 24, 40
  q, k, v = _qkv(B=B, T=T, S=S)
  bias = _normal(2, (B, 4, T, S))
  mask = np.ones((B, 4, T, S), bool)
  mask[0, :, 3] = False                 # row 3 in every head
  mask[1, 2, :9] = False                # rows 0..8 of head 2
  kw = dict(mask=jnp.asarray(mask), query_seq_lengths=jnp.array([T, 20]))
  out, (dq, dk, dv, dbias) = out_and_grads(
      "chunked", q, k, v, bias, _normal(3, (B, T, 4, 8)), **kw)
  for x in (out, dq, dk, dv, dbias):
    assert bool(jnp.all(jnp.isfinite(x)))
  out, dq, dbias = np.asarray(out), np.asarray(dq), np.asarray(dbias)
  for rows in (out[0, 3], out[1, :9, 2], out[1, 20:],
               dq[0, 3], dq[1, :9, 2], dq[1, 20:],
               dbias[0, :, 3], dbias[1, 2, :9], dbias[1, :, 20:]):
    np.testing.assert_array_equal(rows, 0.0)
  assert_close(out, reference(q, k, v, bias, **kw), 2e-5)


def test_window_without_visible_keys():
  """A window that leaves late query rows no key gives zeros, not NaN."""
  q, k, v = _qkv(B=1, T=60, S=20)
  out = chunked_fwd(q, k, v, local_window_size=(3, 0))
  ref = reference(q, k, v, local_window_size=(3, 0))
  assert_close(out, ref, 2e-5)
  np.testing.assert_array_equal(np.asarray(out)[:, 23:], 0.0)
  no_keys = dot_product_attention(q, k[:, :0], v[:, :0],
                                  implementation="chunked")
  np.testing.assert_array_equal(no_keys, np.zeros((1, 60, 4, 8)))


def test_visited_blocks_causal_is_about_half():
  visited, total = chunked.visited_blocks(4096, 4096, block_q=512,
                                          block_k=512, is_causal=True)
  assert (visited, total) == (36, 64)  # n (n + 1) / 2 of n^2, n = 8
  # 4 query blocks per key block: 4 * (1 + 2 + 3 + 4) of 16 * 4.
  assert chunked.visited_blocks(4096, 4096, block_q=256, block_k=1024,
                                is_causal=True) == (40, 64)
  visited, _ = chunked.visited_blocks(4096, 4096, block_q=512, block_k=512,
                                      local_window_size=(256, 0))
  assert visited == 8 + 7              # diagonal + one block to the left
  assert chunked.visited_blocks(100, 300, block_q=32, block_k=64) == (20, 20)


@pytest.mark.parametrize("kw,finite_rows", [
    (dict(is_causal=True), slice(0, 48)),
    (dict(local_window_size=(8, 8)), slice(0, 32)),
])
def test_skipped_blocks_are_never_read(kw, finite_rows):
  """NaN values in key block 3 reach only the query blocks that visit it.

  A fully masked block that were visited (masked, not skipped) would still
  poison the output with 0 * NaN in p @ v, forward and backward.
  """
  q, k, v = _qkv(B=1, T=64, S=64, N=2, K=2, H=8, Dv=8)
  v = v.at[:, 48:].set(jnp.nan)

  out, (dq, _, _, _) = out_and_grads(
      "chunked", q, k, v, None, jnp.ones((1, 64, 2, 8)), block_q=16,
      block_k=16, **kw)
  assert bool(jnp.all(jnp.isfinite(out[:, finite_rows])))
  assert bool(jnp.all(jnp.isfinite(dq[:, finite_rows])))
  assert not bool(jnp.all(jnp.isfinite(out)))   # the poison is real


def _temp_bytes(fn, T, S=None):
  arg = lambda L: jax.ShapeDtypeStruct((1, L, 8, 64), jnp.float32)  # noqa
  S = T if S is None else S
  compiled = jax.jit(fn).lower(arg(T), arg(S), arg(S)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _attention_fns(impl, **kw):
  fwd = lambda q, k, v: dot_product_attention(  # noqa: E731
      q, k, v, implementation=impl, **kw)
  fwd_bwd = jax.grad(lambda q, k, v: fwd(q, k, v).sum(), argnums=(0, 1, 2))
  return fwd, fwd_bwd


def _scan_lengths(jaxpr) -> list:
  """Lengths of every ``scan`` (``lax.map`` over query blocks, the
  backward's loop over key blocks) in a jaxpr and the jaxprs inside it."""
  return [eqn.params["length"] for eqn in equations(jaxpr)
          if eqn.primitive.name == "scan"]


@pytest.mark.parametrize("masked", [False, True])
def test_default_blocks_plain_call_and_differentiated_call_agree(masked):
  """Default blocks, no causal structure: a call that is not differentiated
  runs query blocks of up to DEFAULT_FORWARD_ONLY_BLOCK_Q rows (T=1100 ->
  2 blocks of 552), a differentiated one blocks of DEFAULT_BLOCK_Q (5 of
  224): both outputs are the float64 reference's, gradients are xla's.
  Bias, mask, key lengths, GQA and padded T and S (the padded keys masked
  by the kernel alone when unmasked) all cross the two layouts."""
  T, S = 1100, 700
  q, k, v = _qkv(B=1, T=T, S=S, N=2, K=1, H=8, Dv=8)
  bias = _normal(3, (1, 2, T, S))
  rng = np.random.default_rng(1)
  kw = dict(mask=jnp.asarray(rng.random((1, 1, T, S)) < 0.8),
            key_value_seq_lengths=jnp.array([650], jnp.int32)) if masked else {}
  cotangent = _normal(4, (1, T, 2, 8))

  def f(q, k, v, bias):
    return dot_product_attention(q, k, v, bias, implementation="chunked",
                                 **kw)

  # [query blocks, key blocks (2 of 352)] of the forward that runs.
  assert _scan_lengths(jax.make_jaxpr(f)(q, k, v, bias).jaxpr) == [2, 2]
  trained = jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[0])(q, k, v, bias)
  assert _scan_lengths(trained.jaxpr) == [5, 2]
  defaults = dict(block_q=None, block_k=None)
  plain = chunked_fwd(q, k, v, bias, **defaults, **kw)
  out, grads = out_and_grads("chunked", q, k, v, bias, cotangent, **defaults,
                             **kw)
  _, ref_grads = out_and_grads("xla", q, k, v, bias, cotangent, **kw)
  want = reference(q, k, v, bias, **kw)
  assert_close(plain, want, 2e-5)
  assert_close(out, want, 2e-5)
  for g, r in zip(grads, ref_grads):
    assert g.shape == r.shape
    assert_close(g, r, 5e-5)


def test_temp_memory_grows_linearly():
  """Doubling T doubles (not quadruples) XLA's temp memory; xla quadruples."""
  fwd, fwd_bwd = _attention_fns("chunked", block_q=128, block_k=256,
                                is_causal=True)
  for fn in (fwd, fwd_bwd):
    small, large = _temp_bytes(fn, 2048), _temp_bytes(fn, 4096)
    assert 1.5 < large / small < 2.5, (small, large)
  xla_fwd, _ = _attention_fns("xla")
  assert _temp_bytes(xla_fwd, 4096) / _temp_bytes(xla_fwd, 2048) > 3.5


def test_temp_memory_targets():
  """Default blocks: fwd at T=16384 <= 256 MiB, fwd+bwd at 8192 <= 1 GiB."""
  fwd, fwd_bwd = _attention_fns("chunked")
  assert _temp_bytes(fwd, 16384) <= 256 * 2**20
  assert _temp_bytes(fwd_bwd, 8192) <= 2**30


@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 40), S=st.integers(1, 40),
       group=st.sampled_from([1, 2]), K=st.integers(1, 2),
       block_q=st.integers(3, 16), block_k=st.integers(3, 16),
       causal=st.booleans(), window=st.none() | st.tuples(
           st.integers(0, 12), st.integers(0, 12)),
       kv_fraction=st.floats(0.0, 1.0), seed=st.integers(0, 100))
def test_random_shapes_and_masks(B, T, S, group, K, block_q, block_k, causal,
                                 window, kv_fraction, seed):
  """Forward equals the float64 reference for random shapes/masks/blocks."""
  N = group * K
  q, k, v = _qkv(B=B, T=T, S=S, N=N, K=K, H=8, Dv=4, seed=seed)
  kv_len = jnp.full((B,), int(round(kv_fraction * S)), jnp.int32)
  kw = dict(is_causal=causal, local_window_size=window,
            key_value_seq_lengths=kv_len)
  out = chunked_fwd(q, k, v, block_q=block_q, block_k=block_k, **kw)
  assert out.shape == (B, T, N, 4)
  assert_close(out, reference(q, k, v, **kw), 3e-5)


def test_jit_does_not_retrace():
  traces = []

  @jax.jit
  def f(q, k, v):
    traces.append(1)
    return dot_product_attention(q, k, v, is_causal=True,
                                 implementation="chunked", **BLOCKS)

  q, k, v = _qkv(B=1, T=20, S=20)
  first = f(q, k, v)
  second = f(q + 1.0, k, v)
  assert len(traces) == 1
  assert not np.allclose(first, second)


def test_traced_scale_and_unbatched_inputs():
  """A traced ``scale`` gets its gradient; 3-D inputs work."""
  q, k, v = _qkv(B=1, T=20, S=30)

  def loss(scale, impl):
    out = dot_product_attention(q[0], k[0], v[0], scale=scale,
                                implementation=impl, **(
                                    BLOCKS if impl == "chunked" else {}))
    assert out.shape == (20, 4, 8)
    return jnp.sum(out ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  assert_close(grad(jnp.float32(0.3), "chunked"),
               grad(jnp.float32(0.3), "xla"), 1e-4)


def test_registry_spec_options_reach_the_kernel():
  q, k, v = _qkv(B=1, T=33, S=33)
  fn = attn.get_attention("chunked(block_q=8, block_k=16)")
  out = jax.jit(lambda q, k, v: fn(q, k, v, is_causal=True))(q, k, v)
  assert_close(out, reference(q, k, v, is_causal=True), 2e-5)
  with pytest.raises(ValueError, match=r"block_q(=0 is invalid| must be a "
                     "positive int)"):
    attn.get_attention("chunked(block_q=0)")(q, k, v)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_bad_block_sizes_raise(bad):
  q, k, v = _qkv(B=1, T=8, S=8)
  with pytest.raises(ValueError, match="block_k must be a positive int"):
    dot_product_attention(q, k, v, implementation="chunked", block_k=bad)


def test_registry_kernel_falls_back_to_xla_for_weights():
  """``return_weights=True`` (Flax's sow_weights) gets the xla weights."""
  q, k, v = _qkv(B=1, T=8, S=8)
  fn = attn.get_attention("chunked")
  out, weights = fn(q, k, v, is_causal=True, return_weights=True)
  ref_out, ref_weights = dot_product_attention(
      q, k, v, is_causal=True, implementation="xla", return_weights=True)
  assert_close(out, ref_out, 1e-6)
  assert_close(weights, ref_weights, 1e-6)
  assert weights.shape == (1, 4, 8, 8)


def test_block_size_balances_padding():
  assert chunked.block_size(37, 8, 512, "block_q") == (8, 5)
  assert chunked.block_size(600, 512, 512, "block_q") == (304, 2)
  assert chunked.block_size(100, 512, 512, "block_q") == (100, 1)
  assert chunked.block_size(4096, None, 512, "block_q") == (512, 8)
