r"""The accelerator check: correctness of every exact implementation, then speed.

  python -m experiments.gpu_check --output_dir=runs/gpu_check   # on a GPU
  python -m experiments.gpu_check --dry_run                     # anywhere

Part 1 runs every implementation (xla, chunked, cudnn, pallas, tokamax, auto)
against ``implementation="xla"`` in fp32 and bf16, forward and gradients,
over causal / segment ids / lengths / GQA, and writes ``correctness.csv``
(``status`` = ok / mismatch / unsupported: <the ValueError>). Part 2 is the
benchmark table (jax.nn cuDNN, attn auto, chunked, pallas, tokamax; T = 2048,
8192, 32768; H = 128; bf16; causal and not; fwd and fwd+bwd) through
:mod:`experiments.bench`, written to ``<output_dir>/bench/``. Sized for
< 8 minutes on one H100/H200; ``--budget_s`` (default 420 s from the start)
guards that: part 2 runs the shortest T first and starts no cell after it.
``--dry_run`` uses tiny shapes and, off an accelerator, runs the Pallas GPU
kernel interpreted.
"""

from __future__ import annotations

import csv
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import attn
from attn.kernels import pallas as pallas_kernels
from configs import benchmark as benchmark_config
from experiments.bench import BASELINES, Variant, report, run_benchmark, write_outputs

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/gpu_check", "where results go")
flags.DEFINE_bool("dry_run", False, "tiny shapes, a few seconds on CPU")
flags.DEFINE_bool("plots", True, "also draw the benchmark's PNG plots")
flags.DEFINE_float("budget_s", 420.0, "seconds from the start after which "
                   "part 2 starts no more cells (they are recorded as "
                   "'skipped: time budget'); 0 = no limit")
flags.register_validator("budget_s", lambda s: s >= 0,
                         message="--budget_s must be >= 0 (0 = no limit)")
flags.DEFINE_list("impls", None, "implementations part 1 checks against xla "
                  "(default: all; with --dry_run: xla,pallas; 'auto' = None)")

IMPLS = ("xla", "chunked", "cudnn", "pallas", "tokamax", None)
TOL = {"fp32": 2e-3, "bf16": 3e-2}


def _cases(dry: bool):
  T = 32 if dry else 512
  B, N, K, H = (1, 2, 1, 8) if dry else (2, 8, 2, 128)
  rng = np.random.default_rng(0)
  seg = np.sort(rng.integers(0, 3, size=(B, T)), axis=1)
  lens = np.array([T - 5] + [T] * (B - 1), np.int32)
  if not dry:
    yield "plain", (B, T, N, K, H), {}
  yield "causal", (B, T, N, K, H), {"is_causal": True}
  if not dry:
    yield "segments+causal", (B, T, N, K, H), {
        "segment_ids": jnp.asarray(seg), "is_causal": True}
    yield "lengths", (B, T, N, K, H), {
        "query_seq_lengths": jnp.asarray(lens),
        "key_value_seq_lengths": jnp.asarray(lens)}


# --dry_run compiles with XLA's backend optimisations off (faster to compile,
# same numbers); the real check compiles as users do.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _loss_and_grad(impl, kw):
  def loss(q, k, v):
    out = attn.dot_product_attention(q, k, v, implementation=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) ** 2), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                 compiler_options=_FAST_COMPILE if FLAGS.dry_run else None)


def correctness(dry: bool, out_dir: str):
  rows = []
  dtypes = ("fp32",) if dry else ("fp32", "bf16")
  impls = ("xla", "pallas") if dry else IMPLS
  if FLAGS.impls:
    impls = [None if i == "auto" else i for i in FLAGS.impls]
  for case, (B, T, N, K, H), kw in _cases(dry):
    rng = np.random.default_rng(1)
    base = [rng.normal(size=s).astype(np.float32)
            for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H))]
    for dt in dtypes:
      dtype = jnp.float32 if dt == "fp32" else jnp.bfloat16
      args = [jnp.asarray(x, dtype) for x in base]
      (_, ref), ref_g = _loss_and_grad("xla", kw)(*args)
      for impl in impls:
        row = {"case": case, "dtype": dt, "impl": str(impl)}
        try:
          (_, out), g = _loss_and_grad(impl, kw)(*args)
          err_f = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                        - ref.astype(jnp.float32))))
          err_g = max(float(jnp.max(jnp.abs(a.astype(jnp.float32)
                                            - b.astype(jnp.float32)))
                          / (1.0 + float(jnp.max(jnp.abs(b.astype(
                              jnp.float32))))))
                      for a, b in zip(g, ref_g))
          ok = err_f < TOL[dt] * 4 and err_g < TOL[dt]
          row.update(fwd_err=err_f, grad_rel_err=err_g,
                     status="ok" if ok else "mismatch")
        except ValueError as e:
          row.update(fwd_err="", grad_rel_err="",
                     status=f"unsupported: {str(e)[:160]}")
        rows.append(row)
        print(row, flush=True)
  path = os.path.join(out_dir, "correctness.csv")
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, ["case", "dtype", "impl", "fwd_err",
                           "grad_rel_err", "status"])
    w.writeheader()
    w.writerows(rows)
  return rows


def _variant(name, impl):
  def fn(q, k, v, *, is_causal, rng, params):
    del rng, params
    return attn.dot_product_attention(q, k, v, is_causal=is_causal,
                                      implementation=impl)
  return Variant(name=name, fn=fn, exact=True)


def bench(dry: bool, out_dir: str, budget_s: float = 0.0):
  c = benchmark_config.get_config("quick" if dry else "")
  c.variants = ""
  c.baselines = ""
  c.seq_lens = (64,) if dry else (2048, 8192, 32768)
  c.head_dims = (16,) if dry else (128,)
  c.num_heads = 2 if dry else 8
  c.dtypes = ("fp32",) if dry else ("bf16",)
  c.causal = (False, True)
  c.modes = ("fwd", "fwd_bwd")
  c.repeats = 1 if dry else 5
  c.check_error = False           # part 1 checks accuracy
  c.max_memory_gib = 40.0
  c.time_budget_s = budget_s      # shortest T first; the rest is skipped
  c.progress = False
  c.output_dir = os.path.join(out_dir, "bench")
  variants = [BASELINES["jax_nn_cudnn"], _variant("attn_auto", None),
              _variant("chunked", "chunked"), _variant("pallas", "pallas"),
              _variant("tokamax", "tokamax")]
  if dry:
    # Part 1 ran pallas already; interpreted kernels are too slow to time.
    variants = [_variant("attn_auto", None), _variant("chunked", "chunked")]
    c.modes = ("fwd",)
    c.causal = (True,)
  rows = run_benchmark(c, variants)
  if FLAGS.plots:
    return write_outputs(rows, c, sys.argv)
  os.makedirs(c.output_dir, exist_ok=True)
  path = os.path.join(c.output_dir, "results.csv")
  report.write_csv(rows, path)
  return {"csv": path}


def _part2_budget(start: float) -> float:
  """Seconds left of ``--budget_s`` for part 2 (0 = no limit; once spent,
  a tiny positive budget, so that every cell is skipped)."""
  if not FLAGS.budget_s:
    return 0.0
  return max(1e-9, FLAGS.budget_s - (time.monotonic() - start))


def main(argv):
  del argv
  start = time.monotonic()
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  platform = jax.devices()[0].platform
  print(f"device: {jax.devices()[0].device_kind} ({platform})", flush=True)
  if FLAGS.dry_run and platform not in ("gpu", "tpu"):
    with pallas_kernels.interpret("gpu"):
      correctness(True, FLAGS.output_dir)
      paths = bench(True, FLAGS.output_dir, _part2_budget(start))
  else:
    correctness(FLAGS.dry_run, FLAGS.output_dir)
    paths = bench(FLAGS.dry_run, FLAGS.output_dir, _part2_budget(start))
  print("wrote", os.path.join(FLAGS.output_dir, "correctness.csv"), paths)


if __name__ == "__main__":
  app.run(main)
