"""Multi-device and multi-process checks, run in fresh subprocesses.

JAX fixes its device count when it initialises, so tests that need 8
simulated CPU devices (``--xla_force_host_platform_device_count``) or a real
``jax.distributed`` process group run this file as a script; the pytest
process only calls :func:`run_helper` / :func:`run_processes` and reads the
JSON the script prints on its last line. Importing this module does not
import JAX.

Modes (``python -m tests.multidevice_helpers MODE ...`` from the repo root)::

    ring          ring attention vs single-device attention (8 devices)
    memory        XLA memory analysis at T=65536, ring vs chunked (8 devices)
    mesh          attn.parallel on 8 devices (+ initialize_distributed no-op)
    distributed   one process of a 2-process group (--port, --process_id)

Several modes (``ring memory``) run one after another in one process, which
then prints ``{mode: result}``: a test file pays for one 8-device start.
"""
# JAX, attn and NumPy are imported inside the functions that run in the
# child processes. pylint: disable=g-import-not-at-top

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables JAX's cluster auto-detection reads; scrubbed so the children
# behave like a plain single machine.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                "TPU_WORKER_HOSTNAMES")


# XLA's cheapest CPU compilation, for the test session and the children it
# starts (see tests/conftest.py); ATTN_TEST_XLA_FLAGS="" turns it off.
TEST_XLA_FLAGS = os.environ.get(
    "ATTN_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false")


def _env(devices: int) -> Dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV}
  env["XLA_FLAGS"] = " ".join(filter(None, [
      TEST_XLA_FLAGS, f"--xla_force_host_platform_device_count={devices}"]))
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _last_json(stdout: str):
  return json.loads(stdout.strip().splitlines()[-1])


def run_helper(*args: str, devices: int = 8, timeout: int = 600):
  """Runs this script in a fresh process; returns its JSON result."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                        env=_env(devices), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"helper {args} failed (rc={proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return _last_json(proc.stdout)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(num_processes: int = 2, devices_per_process: int = 2,
                  timeout: int = 400) -> List[dict]:
  """Starts a real ``jax.distributed`` group on localhost; one JSON each."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "distributed",
       f"--port={port}", f"--process_id={i}",
       f"--num_processes={num_processes}"],
      env=_env(devices_per_process), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(num_processes)]
  results = []
  try:
    for i, proc in enumerate(procs):
      out, err = proc.communicate(timeout=timeout)
      if proc.returncode:
        raise RuntimeError(f"process {i} failed (rc={proc.returncode}):\n"
                           f"{out[-3000:]}\n{err[-6000:]}")
      results.append(_last_json(out))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return results


# ---------------------------------------------------------------------------
# Everything below runs inside the child processes.


def numpy_attention(q, k, v, bias=None, mask=None):
  """float64 reference: ``q[B,T,N,H]``, ``k/v[B,S,K,*]``, mask ``[B,N,T,S]``.

  Rows with no visible key give zeros.
  """
  import numpy as np
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  K = k.shape[2]
  k = np.repeat(k, N // K, axis=2)
  v = np.repeat(v, N // K, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  if mask is None:
    mask = np.ones(s.shape, bool)
  mask = np.broadcast_to(mask, s.shape)
  s = np.where(mask, s, -np.inf)
  row_max = np.max(s, axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  p = np.where(mask, np.exp(s - row_max), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom == 0, 1.0, denom)
  return np.einsum("bnts,bsnd->btnd", p, v)


def numpy_mask(B, N, T, S, *, is_causal=False, q_lengths=None,
               kv_lengths=None, segment_ids=None, window=None, mask=None):
  """Boolean ``[B, N, T, S]`` mask built with explicit loops over examples."""
  import numpy as np
  out = np.ones((B, N, T, S), bool)
  t = np.arange(T)[:, None]
  s = np.arange(S)[None, :]
  for b in range(B):
    m = np.ones((T, S), bool)
    if is_causal:
      m &= s <= t
    if window is not None:
      m &= (s >= t - window[0]) & (s <= t + window[1])
    if q_lengths is not None:
      m &= t < q_lengths[b]
    if kv_lengths is not None:
      m &= s < kv_lengths[b]
    if segment_ids is not None:
      m &= segment_ids[b][:, None] == segment_ids[b][None, :]
    out[b] &= m
  if mask is not None:
    out &= mask
  return out


def _max_rel_err(a, b) -> float:
  """max |a - b| / max(1, max |b|) over all leaves of two pytrees."""
  import jax
  import numpy as np
  errs = []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    errs.append(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(y)))))
  return float(max(errs))


def _fwd_bwd(fn, *args):
  """``(fn(*args), vjp(cos(3 · out)))`` under one ``jax.jit``."""
  import jax
  import jax.numpy as jnp

  def f(*a):
    out, vjp = jax.vjp(fn, *a)
    ct = jnp.cos(3.0 * out.astype(jnp.float32)).astype(out.dtype)
    return out, vjp(ct)

  return jax.jit(f)(*args)


def _compare(ring_fn, reference, args, names, *, np_out=None):
  """Forward + vjp of ``ring_fn`` on ``args`` vs ``reference = (out, grads)``.

  Returns ``{"out": err, "d<name>": err, ..., "nonfinite": 0 or 1,
  "numpy_out": err}`` with :func:`_max_rel_err` errors.
  """
  import jax
  import jax.numpy as jnp
  out, grads = _fwd_bwd(ring_fn, *args)
  ref, ref_grads = reference
  errs = {"out": _max_rel_err(out, ref)}
  for name, g, rg in zip(names, grads, ref_grads):
    errs["d" + name] = _max_rel_err(g, rg)
  finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  errs["nonfinite"] = 0.0 if finite else 1.0
  if np_out is not None:
    errs["numpy_out"] = _max_rel_err(out, np_out)
  return errs


def check_ring() -> Dict[str, Dict[str, float]]:
  """Ring attention vs ``attn.dot_product_attention`` on 8 CPU devices."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax.linen as nn
  import attn
  from attn.kernels.ring import ring_attention
  from attn.parallel import make_mesh

  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)

  def normal(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)

  results = {}
  # Sequence shards of 2, 4, 8 (rest of the devices on "data"), GQA.
  B, T, N, K, H = 2, 32, 4, 2, 8
  q, k, v = normal(B, T, N, H), normal(B, T, K, H), normal(B, T, K, H)
  for causal in (False, True):
    reference = _fwd_bwd(lambda q, k, v, c=causal: attn.dot_product_attention(
        q, k, v, is_causal=c, implementation="xla"), q, k, v)
    np_out = numpy_attention(q, k, v, mask=numpy_mask(B, N, T, T,
                                                      is_causal=causal))
    for n in (2, 4, 8):
      mesh = make_mesh(data=-1, seq=n)
      ring = lambda q, k, v, m=mesh, c=causal: ring_attention(  # noqa: E731
          q, k, v, mesh=m, is_causal=c, block_q=4, block_k=4)
      results[f"seq{n}_{'causal' if causal else 'full'}"] = _compare(
          ring, reference, (q, k, v), "qkv", np_out=np_out)

  # Padding: lengths, a fully masked example, T not divisible by the ring.
  B, T = 3, 30
  q, k, v = normal(B, T, N, H), normal(B, T, K, H), normal(B, T, K, H)
  ql = jnp.asarray([30, 17, 30], jnp.int32)
  kl = jnp.asarray([30, 11, 0], jnp.int32)
  kw = dict(is_causal=True, query_seq_lengths=ql, key_value_seq_lengths=kl)
  mesh = make_mesh(data=1, seq=4, model=2)
  results["padding_lengths"] = _compare(
      lambda q, k, v: ring_attention(q, k, v, mesh=mesh, block_q=4,
                                     block_k=4, **kw),
      _fwd_bwd(lambda q, k, v: attn.dot_product_attention(
          q, k, v, implementation="xla", **kw), q, k, v),
      (q, k, v), "qkv", np_out=numpy_attention(q, k, v, mask=numpy_mask(
          B, N, T, T, is_causal=True, q_lengths=np.asarray(ql),
          kv_lengths=np.asarray(kl))))

  # One query, three keys: both lengths shorter than the ring (padding).
  q1, k1, v1 = normal(B, 1, N, H), normal(B, 3, K, H), normal(B, 3, K, H)
  results["shorter_than_ring"] = _compare(
      lambda q, k, v: ring_attention(q, k, v, mesh=mesh),
      _fwd_bwd(lambda q, k, v: attn.dot_product_attention(
          q, k, v, implementation="xla"), q1, k1, v1),
      (q1, k1, v1), "qkv", np_out=numpy_attention(q1, k1, v1))

  # Cross attention with a learned bias and a padding mask; heads on "model".
  B, T, S = 2, 24, 40
  q, k, v = normal(B, T, N, H), normal(B, S, K, H), normal(B, S, K, H)
  bias = normal(1, N, T, S)
  mask = jnp.asarray(rng.random((B, 1, 1, S)) > 0.3)
  results["cross_bias_mask"] = _compare(
      lambda q, k, v, bias: ring_attention(q, k, v, bias, mask, mesh=mesh,
                                           block_q=3, block_k=5),
      _fwd_bwd(lambda q, k, v, bias: attn.dot_product_attention(
          q, k, v, bias, mask, implementation="xla"), q, k, v, bias),
      (q, k, v, bias), ("q", "k", "v", "bias"),
      np_out=numpy_attention(q, k, v, bias, numpy_mask(
          B, N, T, S, mask=np.asarray(mask))))

  # Packed segments + local window + a bias broadcast over queries (its
  # gradient is summed over the ring with psum); batch on "data".
  B, T = 2, 32
  q, k, v = normal(B, T, N, H), normal(B, T, K, H), normal(B, T, K, H)
  bias = normal(B, 1, 1, T)
  seg = jnp.asarray(np.repeat(np.asarray([[0, 1, 2, 3], [0, 0, 1, 1]]), 8,
                              axis=1), jnp.int32)
  kw = dict(segment_ids=seg, local_window_size=(5, 3))
  mesh = make_mesh(data=2, seq=4)
  results["segments_window_bias"] = _compare(
      lambda q, k, v, bias: ring_attention(q, k, v, bias, mesh=mesh,
                                           block_q=4, block_k=4, **kw),
      _fwd_bwd(lambda q, k, v, bias: attn.dot_product_attention(
          q, k, v, bias, implementation="xla", **kw), q, k, v, bias),
      (q, k, v, bias), ("q", "k", "v", "bias"),
      np_out=numpy_attention(q, k, v, bias, numpy_mask(
          B, N, T, T, segment_ids=np.asarray(seg), window=(5, 3))))

  # bfloat16 inputs against the float64 reference.
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  mesh = make_mesh(data=1, seq=8)
  results["bf16_causal"] = _compare(
      lambda q, k, v: ring_attention(q, k, v, mesh=mesh, is_causal=True,
                                     block_q=2, block_k=2),
      _fwd_bwd(lambda q, k, v: attn.dot_product_attention(
          q, k, v, is_causal=True, implementation="xla"), q, k, v),
      (q, k, v), "qkv", np_out=numpy_attention(q, k, v, mask=numpy_mask(
          B, N, T, T, is_causal=True)))

  # jax.make_mesh's default Explicit axes, T not divisible by the ring.
  T = 30
  q, k, v = normal(B, T, N, H), normal(B, T, K, H), normal(B, T, K, H)
  explicit = jax.make_mesh((2, 4), ("data", "seq"))
  results["explicit_axes_mesh"] = _compare(
      lambda q, k, v: ring_attention(q, k, v, mesh=explicit, is_causal=True),
      _fwd_bwd(lambda q, k, v: attn.dot_product_attention(
          q, k, v, is_causal=True, implementation="xla"), q, k, v),
      (q, k, v), "qkv")

  # By name in a Flax model, the mesh taken from jax.set_mesh.
  x = normal(2, 32, 16)
  causal_mask = nn.make_causal_mask(jnp.ones((2, 32)), dtype=jnp.bool_)

  def model(spec):
    return nn.MultiHeadDotProductAttention(
        num_heads=4, qkv_features=16, attention_fn=attn.get_attention(spec))

  params = model("xla").init(jax.random.key(0), x)

  def apply(spec):
    return lambda p: model(spec).apply(p, x, mask=causal_mask)

  with jax.set_mesh(make_mesh(data=2, seq=4)):
    results["flax_by_name"] = _compare(
        apply("ring(block_q=4, block_k=4)"), _fwd_bwd(apply("xla"), params),
        (params,), ("params",))
  return results


def _memory(fn, *args) -> Dict[str, float]:
  """XLA's per-device memory analysis of ``jit(fn)``, in MiB."""
  import jax
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  mib = 2.0 ** 20
  total = (m.argument_size_in_bytes + m.output_size_in_bytes
           + m.temp_size_in_bytes - m.alias_size_in_bytes)
  return {"argument": m.argument_size_in_bytes / mib,
          "output": m.output_size_in_bytes / mib,
          "temp": m.temp_size_in_bytes / mib, "total": total / mib}


def check_memory(length: int, dtype: str, backward: bool, heads: int = 8,
                 head_dim: int = 64) -> Dict[str, Dict[str, float]]:
  """Per-device attention memory: ring on 8 devices vs one device.

  ``[1, length, heads, head_dim]`` causal self-attention; compile only,
  nothing is allocated. ``ring_seq1`` is the ring kernel on a one-device
  mesh (a single-device blockwise kernel with the same chunking).
  """
  import jax
  import attn
  from attn.kernels.ring import ring_attention
  from attn.parallel import make_mesh

  x = jax.ShapeDtypeStruct((1, length, heads, head_dim), dtype)
  mesh8 = make_mesh(data=1, seq=8)
  mesh1 = make_mesh(data=1, seq=1, devices=jax.devices()[:1])
  kernels = {
      "ring_seq8": lambda q, k, v: ring_attention(q, k, v, mesh=mesh8,
                                                  is_causal=True),
      "ring_seq1": lambda q, k, v: ring_attention(q, k, v, mesh=mesh1,
                                                  is_causal=True),
      "chunked_1device": lambda q, k, v: attn.dot_product_attention(
          q, k, v, is_causal=True, implementation="chunked"),
  }

  def with_backward(fn):
    def f(q, k, v):
      out, vjp = jax.vjp(fn, q, k, v)
      return vjp(out)
    return f

  return {name: _memory(with_backward(fn) if backward else fn, x, x, x)
          for name, fn in kernels.items()}


def check_mesh() -> Dict[str, object]:
  """attn.parallel on 8 devices; starts with the single-process no-op."""
  from attn import parallel
  results = {"initialize_no_args": parallel.initialize_distributed(),
             "initialize_one_process": parallel.initialize_distributed(
                 num_processes=1)}
  import jax
  import numpy as np
  from ml_collections import ConfigDict
  results["process_count"] = jax.process_count()
  results["device_count"] = jax.device_count()
  shapes = {}
  for name, kw in {"default": {}, "seq2": {"seq": 2},
                   "seq_rest": {"data": 2, "seq": -1},
                   "all3": {"data": 2, "seq": 2, "model": 2},
                   "config": ConfigDict({"data": -1, "seq": 4})}.items():
    shapes[name] = list(parallel.make_mesh(**kw).devices.shape)
  results["shapes"] = shapes
  errors = {}
  for name, kw in {"product": {"data": 3}, "indivisible": {"seq": 3},
                   "two_free": {"data": -1, "seq": -1},
                   "zero": {"data": 0}}.items():
    try:
      parallel.make_mesh(**kw)
      errors[name] = ""
    except ValueError as e:
      errors[name] = str(e)
  results["errors"] = errors

  mesh = parallel.make_mesh(data=4, seq=2)
  x = np.arange(16, dtype=np.float32)              # e.g. labels [B]
  tokens = np.arange(16 * 8, dtype=np.int32).reshape(16, 8)
  batch = parallel.shard_batch({"x": x, "tokens": tokens}, mesh,
                               sequence=True)
  placed = all(np.array_equal(np.asarray(s.data), x[s.index])
               for s in batch["x"].addressable_shards)
  placed &= all(np.array_equal(np.asarray(s.data), tokens[s.index])
                for s in batch["tokens"].addressable_shards)
  results["shard_batch"] = {
      "placed": bool(placed),
      "x_shard": list(batch["x"].addressable_shards[0].data.shape),
      "tokens_shard": list(batch["tokens"].addressable_shards[0].data.shape),
      "x_spec": str(batch["x"].sharding.spec),
      "tokens_spec": str(batch["tokens"].sharding.spec),
  }
  results["host_batch_slice"] = list(parallel.host_batch_slice(16, mesh))
  results["replicated_spec"] = str(parallel.replicated(mesh).spec)
  return results


def check_distributed(port: int, process_id: int,
                      num_processes: int) -> Dict[str, object]:
  """One process of a localhost group: data parallel sums + ring attention."""
  from attn import parallel
  started = parallel.initialize_distributed(f"127.0.0.1:{port}",
                                            num_processes, process_id)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  import attn
  from attn.kernels.ring import ring_attention

  results = {"started": started, "process_index": jax.process_index(),
             "process_count": jax.process_count(),
             "device_count": jax.device_count(),
             "local_device_count": jax.local_device_count()}
  # Data parallelism: each host loads only its rows of the global batch.
  global_x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) / 7.0
  mesh = parallel.make_mesh(data=-1)
  start, size = parallel.host_batch_slice(8, mesh)
  results["slice"] = [start, size]
  x = parallel.shard_batch(global_x[start:start + size], mesh)
  total = jax.jit(lambda a: jnp.sum(a * a))(x)
  psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(jnp.sum(a), "data"),
                               mesh=mesh, in_specs=P("data"),
                               out_specs=P()))(x)
  gathered = multihost_utils.process_allgather(x, tiled=True)
  results["sum_sq_err"] = abs(float(total) - float(np.sum(global_x ** 2)))
  results["psum_err"] = abs(float(psum) - float(np.sum(global_x)))
  results["allgather_equal"] = bool(np.array_equal(gathered, global_x))

  # Ring attention with the sequence split over devices of both processes.
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 16, 4, 8)).astype(np.float32)
             for _ in range(3))
  ring_mesh = parallel.make_mesh(data=1, seq=-1)
  rep = NamedSharding(ring_mesh, P())
  args = [jax.make_array_from_callback(a.shape, rep, lambda i, a=a: a[i])
          for a in (q, k, v)]

  out, grads = _fwd_bwd(lambda q, k, v: ring_attention(
      q, k, v, mesh=ring_mesh, is_causal=True, block_q=2, block_k=2), *args)
  out, grads = multihost_utils.process_allgather((out, grads), tiled=True)
  ref, ref_grads = _fwd_bwd(lambda q, k, v: attn.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"), q, k, v)
  results["ring_out_err"] = _max_rel_err(out, ref)
  results["ring_grad_err"] = max(_max_rel_err(g, r)
                                 for g, r in zip(grads, ref_grads))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("modes", nargs="+", metavar="mode",
                      choices=["ring", "memory", "mesh", "distributed"])
  parser.add_argument("--length", type=int, default=65536)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--backward", action="store_true",
                      help="memory of forward + backward (vjp)")
  parser.add_argument("--port", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--num_processes", type=int, default=2)
  args = parser.parse_args(argv)
  os.environ.setdefault("XLA_FLAGS",
                        "--xla_force_host_platform_device_count=8")
  results = {}
  for mode in args.modes:
    if mode == "ring":
      result = check_ring()
    elif mode == "memory":
      result = check_memory(args.length, args.dtype, args.backward)
      for name, m in result.items():
        print(f"{name:16s} total {m['total']:9.1f} MiB  (arguments "
              f"{m['argument']:.1f}, output {m['output']:.1f}, temp "
              f"{m['temp']:.1f})")
    elif mode == "mesh":
      result = check_mesh()
    else:
      result = check_distributed(args.port, args.process_id,
                                 args.num_processes)
    results[mode] = result
  print(json.dumps(results if len(args.modes) > 1 else result))


if __name__ == "__main__":
  main()
