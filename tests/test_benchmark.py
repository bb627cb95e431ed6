"""Tests for the kernel benchmark: experiments/bench/ and its command line
(experiments/benchmark.py)."""

import csv
import importlib.util
import json
import os

from absl import flags
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kernels import chunked
from configs import benchmark as benchmark_config
from experiments import benchmark
from experiments import config_validation
from experiments.bench import floor
from experiments.bench import measure
from experiments.bench import report
from experiments.bench import sweep
from experiments.bench import variants
from tests.jaxprs import equations
from tests.reference import reference_attention as np_reference_attention
from tests.reference import reference_mask

CONFIG_PATH = os.path.abspath(benchmark_config.__file__)


def _config(**overrides):
  config = benchmark_config.get_config("quick")
  config.update(dict(progress=False, seq_lens=(32,), causal=(False,),
                     output_dir="unused"))
  config.update(overrides)
  return config


def _first_half_keys(q, k, v, *, is_causal, rng, params):
  """An 'approximation': exact softmax attention over the first S/2 keys."""
  del rng, params
  S = k.shape[1]
  mask = jnp.arange(S) < S // 2
  if is_causal:
    mask = mask[None, :] & (jnp.arange(S)[None, :]
                            <= jnp.arange(q.shape[1])[:, None])
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _gain_times_exact(q, k, v, *, is_causal, rng, params):
  """Exact attention times a per-head gain parameter; needs an rng key."""
  if rng is None:
    raise ValueError("needs rng")
  out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
  return out * params["gain"][:, None]   # gain [N] over [B, T, N, Dv]


def _gain_shapes(query_shape, key_shape):
  del key_shape
  return {"gain": ((query_shape[2],), jax.nn.initializers.ones)}


FIRST_HALF = variants.Variant("first_half", _first_half_keys, exact=False)
GAIN = variants.Variant("gain", _gain_times_exact, exact=True,
                         param_shapes=_gain_shapes)


# ---------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("kwargs,expected", [
    # 1 head, T=S=2, H=Dv=1: 4 pairs x (2 FLOPs q.k + 2 FLOPs p.v) = 16.
    (dict(batch=1, heads=1, q_len=2, kv_len=2, head_dim=1, value_dim=1,
          causal=False), 16),
    # causal T=S=2: pairs (0,0), (1,0), (1,1) -> 3 x 4 = 12.
    (dict(batch=1, heads=1, q_len=2, kv_len=2, head_dim=1, value_dim=1,
          causal=True), 12),
    # causal T=3, S=2: rows see 1, 2, 2 keys -> 5 pairs x 2 x (1 + 1) = 20.
    (dict(batch=1, heads=1, q_len=3, kv_len=2, head_dim=1, value_dim=1,
          causal=True), 20),
    # B=2, N=3, T=S=4, H=8, Dv=16, causal: 10 pairs; 2*2*3*10*(8+16).
    (dict(batch=2, heads=3, q_len=4, kv_len=4, head_dim=8, value_dim=16,
          causal=True), 2880),
    # The README shape at T=1024: 4 * 8 * 1024^2 * 64.
    (dict(batch=1, heads=8, q_len=1024, kv_len=1024, head_dim=64,
          value_dim=64, causal=False), 2147483648),
])
def test_attention_flops_hand_computed(kwargs, expected):
  assert measure.attention_flops(mode="fwd", **kwargs) == expected
  assert measure.attention_flops(mode="fwd_bwd", **kwargs) == (
      3.5 * expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40))
def test_causal_pairs_counts_the_causal_mask(t, s):
  assert measure.causal_pairs(t, s) == int(
      reference_mask(1, t, s, is_causal=True).sum())


def test_attention_flops_rejects_unknown_mode():
  with pytest.raises(ValueError, match="fwd_bwd"):
    measure.attention_flops(batch=1, heads=1, q_len=1, kv_len=1,
                              head_dim=1, value_dim=1, causal=False,
                              mode="bwd")


def test_matmul_size_matches_work_and_clamps():
  n = measure.matmul_size(2 * 1024 ** 3, 4096)
  assert n == 1024
  assert measure.matmul_size(2 * 10000 ** 3, 4096) == 4096
  assert measure.matmul_size(10, 4096) == 64


# ---------------------------------------------------------------- variants


def test_split_specs_respects_parentheses():
  assert variants.split_specs(
      "softmax, performer(num_features=8, redraw=False),jax_nn,") == [
          "softmax", "performer(num_features=8, redraw=False)", "jax_nn"]


def test_resolve_variants_baselines_first_without_duplicates():
  names = [v.name for v in variants.resolve_variants(
      "xla,jax_nn,xla", "jax_nn,flax_linen")]
  assert names == ["jax_nn", "flax_linen", "xla"]
  everything = [v.name for v in variants.resolve_variants("all", "jax_nn")]
  assert set(variants.BASELINES) <= set(everything)
  assert "softmax" in everything


def test_resolve_variants_unknown_name_lists_what_exists():
  with pytest.raises(ValueError, match="(?s)registered.*flax_linen"):
    variants.resolve_variants("no_such_attention", "jax_nn")


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_float64_loops(causal):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 12, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 12, 2, 8)).astype(np.float32)
  got = measure.reference_attention(q, k, v, causal=causal, block=4)
  mask = reference_mask(2, 12, 12, is_causal=causal)
  want, _ = np_reference_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_reference_gradient_matches_jax_nn():
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(kk, (1, 16, 2, 8)) for kk in keys)

  def grads(attention):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v) * ct)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  got = grads(lambda q, k, v: measure.reference_attention(
      q, k, v, causal=True, block=4))
  want = grads(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- sweeps


def test_quick_mode_writes_parseable_outputs(tmp_path):
  out = tmp_path / "quick"
  benchmark.main(["benchmark", f"--config={CONFIG_PATH}:quick",
                  "--config.progress=false", f"--config.output_dir={out}"])
  measured = variants.resolve_variants("all", benchmark_config.get_config(
  ).baselines)
  seq_lens = benchmark_config.QUICK["seq_lens"]

  with open(out / "results.csv") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == sweep.COLUMNS
    rows = list(reader)
  assert len(rows) == len(measured) * len(seq_lens)
  by_name = {(r["variant"], int(r["seq_len"])): r for r in rows}
  for t in seq_lens:
    assert by_name[("jax_nn", t)]["status"] == "ok"
    assert float(by_name[("jax_nn", t)]["speedup_vs_jax_nn"]) == 1.0
    assert by_name[("flax_linen", t)]["status"] == "ok"
    if jax.devices()[0].platform != "gpu":
      assert by_name[("jax_nn_cudnn", t)]["status"].startswith(
          "unsupported")
    for peer, module in (("torch_sdpa", "torch"), ("tokamax", "tokamax"),
                         ("tokamax_xla_chunked", "tokamax")):
      status = by_name[(peer, t)]["status"]
      if importlib.util.find_spec(module) is None:
        assert status == (f"not installed: {module} is not installed; "
                          "pip install -e '.[bench]'")
      else:
        assert status == "ok"

  data = json.loads((out / "results.json").read_text())
  assert data["meta"]["config"]["seq_lens"] == list(seq_lens)
  cells = data["cells"]
  assert len(cells) == len(rows)
  for c in cells:
    if c["status"] != "ok":
      continue
    assert c["time_min_s"] <= c["time_median_s"] <= c["time_max_s"]
    if c["variant"] == "block_matmuls":     # a timing floor, not attention
      assert c["max_abs_err"] is None and c["flops_source"] == "analytic"
      continue
    assert c["max_abs_err"] is not None and np.isfinite(c["max_abs_err"])
    if c["exact"]:
      assert c["max_abs_err"] < 1e-4, c
      assert c["flops"] == measure.attention_flops(
          batch=1, heads=2, q_len=c["seq_len"], kv_len=c["seq_len"],
          head_dim=16, value_dim=16, causal=False, mode="fwd")
    else:
      # An approximation may be far from softmax attention (hard attention
      # picks one value) but stays on the scale of the values; garbage
      # (overflow, unnormalised sums, wrong axes) does not.
      setting = {k: c[k] for k in sweep.SETTING_KEYS}
      v = sweep.make_inputs(setting, c["seq_len"], 0)["v"]
      assert c["max_abs_err"] < 10 * float(jnp.max(jnp.abs(v))), c
  # Quick cells are too short to time: no slopes, no roofline fractions.
  for s_row in data["slopes"]:
    assert all(c["time_median_s"] >= sweep.MIN_CELL_SECONDS for c in cells
               if c["variant"] == s_row["variant"] and c["status"] == "ok")
  for c in cells:
    assert (c["roofline_frac"] is not None) == (
        c["status"] == "ok" and sweep.meaningful(c))

  summary = (out / "summary.md").read_text()
  assert "| variant | T | status |" in summary
  assert "× jax.nn" in summary and "Log-log slopes" in summary
  for png in ("time_vs_T.png", "memory_vs_T.png", "roofline_fraction.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_error_column_exact_zeroish_approximation_bounded():
  rows = sweep.run_benchmark(
      _config(causal=(True,), modes=("fwd", "fwd_bwd")),
      variants=[variants.BASELINES["jax_nn"], GAIN, FIRST_HALF])
  assert len(rows) == 3 * 2
  for r in rows:
    assert r["status"] == "ok", r
    if r["variant"] == "first_half":
      # Outputs are convex combinations of values |v| <~ 4, so the error is
      # real but bounded (for gradients too).
      assert 1e-3 < r["max_abs_err"] < 20.0, r
      assert r["flops_source"] == "xla"
    else:
      assert r["max_abs_err"] < 1e-4, r
      assert r["flops_source"] == "analytic"
      assert r["flops"] == measure.attention_flops(
          batch=1, heads=2, q_len=32, kv_len=32, head_dim=16, value_dim=16,
          causal=r["causal"], mode=r["mode"])
    assert r["flops_per_s"] == pytest.approx(r["flops"]
                                             / r["time_median_s"])
    assert r["roofline_flops_per_s"] > 0
    if sweep.meaningful(r):
      assert r["roofline_frac"] == pytest.approx(
          r["flops_per_s"] / r["roofline_flops_per_s"])
    else:  # too short, or a matmul too small, to compare with
      assert r["roofline_frac"] is None


def test_failing_cells_are_recorded_and_the_sweep_continues():
  def unsupported(q, k, v, **_):
    raise ValueError("cannot do this shape")

  def out_of_memory(q, k, v, **_):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1TiB")

  def broken(q, k, v, **_):
    raise TypeError("bug in kernel")

  failing = [
      variants.Variant("unsupported", unsupported, exact=True),
      variants.Variant("oom", out_of_memory, exact=True),
      variants.Variant("broken", broken, exact=True),
      variants.Variant("no_causal", variants.BASELINES["jax_nn"].fn,
                       exact=True, supports_causal=False),
      variants.BASELINES["flax_linen"],     # needs K == N
      variants.BASELINES["jax_nn"],
  ]
  rows = sweep.run_benchmark(
      _config(causal=(True,), num_heads=4, num_kv_heads=2),
      variants=failing)
  status = {r["variant"]: r["status"] for r in rows}
  assert status["unsupported"] == "unsupported: cannot do this shape"
  assert status["oom"].startswith("oom: RESOURCE_EXHAUSTED")
  assert status["broken"] == "error: TypeError: bug in kernel"
  assert status["no_causal"].startswith("unsupported")
  assert "key/value heads" in status["flax_linen"]
  assert status["jax_nn"] == "ok"
  for r in rows:
    if r["status"] != "ok":
      assert r["time_median_s"] is None and r["speedup_vs_jax_nn"] is None


def _float64_host(inputs, *, mode, causal):
  """A kernel outside JAX: NumPy float64 attention (forward only)."""
  assert mode == "fwd"
  q, k, v = (np.asarray(inputs[n], np.float64) for n in ("q", "k", "v"))
  T, S = q.shape[1], k.shape[1]
  mask = np.tril(np.ones((T, S), bool)) if causal else None
  return (lambda: np_reference_attention(q, k, v, mask=mask)[0]), np.asarray


def test_kernels_outside_jax_are_timed_and_checked():
  host = variants.Variant("numpy64", None, exact=True, host=_float64_host)
  absent = variants.Variant(
      "absent", None, exact=True, host=_float64_host,
      missing=lambda: "absentlib is not installed; pip install absentlib")
  rows = sweep.run_benchmark(
      _config(causal=(False, True), num_heads=4, num_kv_heads=2),
      variants=[variants.BASELINES["jax_nn"], host, absent])
  by = {(r["variant"], r["causal"]): r for r in rows}
  for causal in (False, True):
    r = by[("numpy64", causal)]
    assert r["status"] == "ok", r
    assert r["max_abs_err"] < 1e-5        # float64 vs the float32 reference
    assert r["compile_s"] is None and r["temp_bytes"] is None
    assert r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"]
    assert r["speedup_vs_jax_nn"] > 0
    assert by[("absent", causal)]["status"] == (
        "not installed: absentlib is not installed; pip install absentlib")
    assert by[("absent", causal)]["time_median_s"] is None


def test_missing_optional_peers_name_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  for name in ("torch_sdpa", "tokamax", "tokamax_xla_chunked"):
    why = variants.BASELINES[name].missing()
    assert why.endswith("is not installed; pip install -e '.[bench]'"), why


@pytest.mark.parametrize("name,module", [
    ("torch_sdpa", "torch"), ("tokamax", "tokamax"),
    ("tokamax_xla_chunked", "tokamax")])
def test_peers_compute_attention_and_its_gradient(name, module):
  pytest.importorskip(module)
  rows = sweep.run_benchmark(
      _config(causal=(False, True), modes=("fwd", "fwd_bwd"),
              dtypes=("fp32", "bf16"), num_heads=4, num_kv_heads=2),
      variants=[variants.BASELINES[name]])
  assert len(rows) == 8
  for r in rows:
    assert r["status"] == "ok", r
    # fp32: round-off; bf16: inputs, outputs and gradients rounded to 8 bits.
    assert r["max_abs_err"] < (1e-4 if r["dtype"] == "fp32" else 0.1), r
  assert max(r["max_abs_err"] for r in rows if r["dtype"] == "bf16") > 1e-4


def test_cells_over_the_memory_limit_are_skipped_not_run():
  rows = sweep.run_benchmark(
      _config(max_memory_gib=1e-6),
      variants=[variants.BASELINES["jax_nn"]])
  (row,) = rows
  assert row["status"].startswith("skipped: too large")
  assert row["time_median_s"] is None
  assert row["argument_bytes"] == 3 * 32 * 2 * 16 * 4   # q, k, v in fp32


def test_bad_config_values_raise_naming_the_field():
  with pytest.raises(ValueError, match="fp8"):
    sweep.run_benchmark(_config(dtypes=("fp8",)))
  with pytest.raises(ValueError, match="num_kv_heads"):
    sweep.run_benchmark(_config(num_heads=4, num_kv_heads=3))
  with pytest.raises(ValueError, match="time_budget_s must be >= 0"):
    sweep.run_benchmark(_config(time_budget_s=-1.0))


def test_time_budget_runs_shortest_first_and_skips_what_is_left(
    monkeypatch, tmp_path):
  # A clock that advances 1 s per reading: the start, then the check
  # before the T=32 group (1 s) and before each of its cells (2 s, 3 s).
  clock = iter(range(100))
  monkeypatch.setattr(sweep, "_clock", lambda: next(clock))
  config = _config(variants="", baselines="jax_nn,flax_linen",
                   seq_lens=(48, 32), time_budget_s=2.5,
                   output_dir=str(tmp_path))
  rows = sweep.run_benchmark(config)
  assert [(r["seq_len"], r["variant"], r["status"]) for r in rows] == [
      (32, "jax_nn", "ok"),
      (32, "flax_linen", "skipped: time budget of 2.5 s spent"),
      (48, "jax_nn", "skipped: time budget of 2.5 s spent"),
      (48, "flax_linen", "skipped: time budget of 2.5 s spent")]
  assert rows[0]["time_median_s"] > 0 and rows[1]["time_median_s"] is None
  paths = report.write_outputs(rows, config)   # skipped cells are reported
  with open(paths["markdown"]) as f:
    assert "time budget" in f.read()
  # Without a budget the order is the config's and nothing is skipped.
  rows = sweep.run_benchmark(_config(variants="", baselines="jax_nn",
                                     seq_lens=(48, 32)))
  assert [(r["seq_len"], r["status"]) for r in rows] == [(48, "ok"),
                                                          (32, "ok")]


# ---------------------------------------------------------------- summaries


def _row(variant, t, seconds, temp, status="ok"):
  return dict(variant=variant, seq_len=t, time_median_s=seconds,
              temp_bytes=temp, status=status, dtype="fp32", mode="fwd",
              causal=False, batch=1, heads=8, kv_heads=8, head_dim=64,
              speedup_vs_jax_nn=None, temp_ratio_vs_jax_nn=None)


def test_ratios_and_loglog_slopes():
  rows = []
  for t in (1024, 2048, 4096):
    rows.append(_row("jax_nn", t, 1e-9 * t ** 2, 4 * t ** 2))
    rows.append(_row("linear", t, 3e-6 * t, 100 * t))
  rows.append(_row("linear", 8192, None, None, status="oom: x"))
  rows.append(_row("single", 1024, 1.0, 1))
  sweep.add_ratios(rows)
  assert rows[1]["speedup_vs_jax_nn"] == pytest.approx(1024 / 3e3)
  assert rows[1]["temp_ratio_vs_jax_nn"] == pytest.approx(25 / 1024)
  assert rows[-2]["status"] == "oom: x"
  assert rows[-2]["speedup_vs_jax_nn"] is None
  by_name = {s["variant"]: s for s in report.slopes(rows)}
  assert by_name["jax_nn"]["time_slope"] == pytest.approx(2.0)
  assert by_name["jax_nn"]["temp_memory_slope"] == pytest.approx(2.0)
  assert by_name["linear"]["time_slope"] == pytest.approx(1.0)
  assert by_name["linear"]["seq_lens"] == [1024, 2048, 4096]
  assert "single" not in by_name          # one T: no slope
  assert report.loglog_slope([1, 2], [0, 5]) is None
  assert report.loglog_slope([4, 4], [1, 2]) is None


def test_cells_too_short_to_time_get_no_slope_or_roofline():
  rows = [_row("fast", t, 1e-5 * t / 64, 4 * t) for t in (64, 128, 256)]
  rows += [_row("mixed", 64, 1e-5, 1), _row("mixed", 4096, 2e-3, 1),
           _row("mixed", 8192, 4e-3, 1)]
  by_name = {s["variant"]: s for s in report.slopes(rows)}
  assert "fast" not in by_name                     # every cell < 1 ms
  assert by_name["mixed"]["seq_lens"] == [4096, 8192]
  assert by_name["mixed"]["time_slope"] == pytest.approx(1.0)
  assert not sweep.meaningful(dict(time_median_s=5e-4, matmul_n=4096))
  assert not sweep.meaningful(dict(time_median_s=1.0, matmul_n=128))
  assert sweep.meaningful(dict(time_median_s=1e-3, matmul_n=512))
  row = dict(exact=True, time_median_s=1e-4, matmul_n=4096,
             roofline_flops_per_s=1e9)
  sweep.add_throughput(row, analytic_flops=1e6)
  assert row["flops_per_s"] == pytest.approx(1e10)
  assert "roofline_frac" not in row               # 1000 % would be noise
  summary = report.markdown_summary(
      [dict(rows[0], roofline_frac=None, compile_s=0.1, flops_per_s=1.0,
            temp_ratio_vs_jax_nn=None, max_abs_err=0.0)], [],
      dict(device="cpu", platform="cpu", cpu_count=2, jax="x", flax="y",
           date="today"))
  assert "| — |" in summary and "faster than 1 ms" in summary


def test_peer_ratios_and_their_geometric_mean():
  def cell(variant, t, seconds, frac=None):
    return dict(_row(variant, t, seconds, 1), matmul_n=4096,
                roofline_frac=frac)
  rows = [cell("softmax", 4096, 2e-3, 0.5), cell("jax_nn", 4096, 6e-3),
          cell("torch_sdpa", 4096, 3e-3, 0.4), cell("tokamax", 4096, 8e-3),
          cell("tokamax_xla_chunked", 4096, 4e-3),
          cell("softmax", 8192, 4e-3), cell("torch_sdpa", 8192, 2e-3),
          cell("tokamax", 8192, None), cell("jax_nn", 8192, 5e-4),
          dict(cell("tokamax_xla_chunked", 8192, None), status="oom: x"),
          cell("softmax", 64, 1e-5), cell("torch_sdpa", 64, 1e-5)]
  rows[7]["status"] = "not installed: tokamax is not installed; ..."
  by_t = {r["seq_len"]: r for r in report.peer_ratios(rows)}
  assert by_t[4096]["vs_jax_nn"] == pytest.approx(3.0)
  assert by_t[4096]["vs_torch_sdpa"] == pytest.approx(1.5)
  assert by_t[4096]["vs_tokamax"] == pytest.approx(2.0)   # the faster one
  assert by_t[4096]["attn_matmul_share"] == 0.5
  assert by_t[4096]["torch_matmul_share"] == 0.4
  assert by_t[8192]["vs_torch_sdpa"] == pytest.approx(0.5)
  assert by_t[8192]["vs_tokamax"] is None       # neither tokamax cell ran
  assert by_t[8192]["vs_jax_nn"] is None        # jax_nn cell under 1 ms
  assert by_t[64]["vs_torch_sdpa"] is None      # too short to time
  lines = report.peer_summary(report.peer_ratios(rows))
  # geometric means over the cells that have the ratio: sqrt(1.5 * 0.5).
  assert lines[-2] == "| geometric mean | | 3.00 | 0.87 | 2.00 | | |"
  assert report.peer_summary(report.peer_ratios(rows[1:5])) == []


def test_every_line_of_a_plot_has_its_own_colour():
  for n in (3, 10, 19, 25):
    colours = report.line_colors(n)
    assert len(colours) == n
    assert len({tuple(np.round(c, 3)) for c in colours}) == n


def test_classify_error():
  assert measure.classify_error(MemoryError()).startswith("oom")
  assert measure.classify_error(
      NotImplementedError("no")).startswith("unsupported")
  assert measure.classify_error(KeyError("x")).startswith("error: KeyError")


# ---------------------------------------------------------------- flags


def _parse(*args):
  fv = flags.FlagValues()
  argv = ["benchmark", *args]
  benchmark.define_flags(fv, argv)
  fv(argv)
  return benchmark.config_from_flags(fv)


def test_config_overrides_on_top_of_the_quick_preset():
  config = _parse(f"--config={CONFIG_PATH}:quick", "--config.seq_lens=(32,48)",
                  "--config.causal=(False,True)", "--config.repeats=3",
                  "--config.variants=xla, chunked")
  assert config.seq_lens == (32, 48)
  assert config.causal == (False, True)
  assert config.repeats == 3
  assert config.variants == "xla, chunked"
  assert config.head_dims == benchmark_config.QUICK["head_dims"]
  assert config.max_memory_gib == benchmark_config.get_config().max_memory_gib
  with pytest.raises(ValueError, match="quick.*peers"):
    benchmark_config.get_config("slow")
  peers = _parse(f"--config={CONFIG_PATH}:peers")
  assert peers.variants == "softmax" and peers.seq_lens == (1024, 4096, 16384)
  assert "torch_sdpa" in peers.baselines


def test_without_config_the_defaults_take_overrides():
  config = _parse("--config.repeats=4", "--config.dtypes=('bf16',)")
  want = benchmark_config.get_config()
  want.update(repeats=4, dtypes=("bf16",))
  assert config.to_dict() == want.to_dict()


def test_only_config_flags_exist():
  # The former plain flags (--quick, --seq_lens, ...) shadowed --config.*.
  for old in ("--quick", "--seq_lens=32", "--repeats=3"):
    with pytest.raises(flags.UnrecognizedFlagError):
      _parse(old)


# ---------------------------------------------------------------- training

TINY_LM = ("model.num_layers=1,model.emb_dim=16,model.mlp_dim=32,"
           "model.num_heads=2,eval_batch_size=4,num_eval_examples=4")


def _training_config(**overrides):
  config = benchmark_config.get_config("training")
  config.update(dict(progress=False, seq_lens=(32,), repeats=1,
                     variants="softmax,linformer"))
  config.training.update(dict(tokens_per_step=64, steps=2,
                              overrides=TINY_LM, matmul_n=256))
  config.update(overrides)
  return config


def test_training_benchmark_cells(tmp_path):
  from experiments.bench import training  # pylint: disable=g-import-not-at-top
  rows = training.run_training_benchmark(_training_config())
  by = {r["variant"]: r for r in rows}
  assert set(by) == {"softmax", "linformer"}
  assert by["linformer"]["status"].startswith("unsupported")   # no causal
  assert "causal" in by["linformer"]["status"]
  vocab = config_validation_vocab()
  # Dense weights by hand: q, k, v, out (4 x 16 x 16), fc1 + fc2 (2 x 16 x
  # 32), logits (16 x vocab).
  dense = 4 * 16 * 16 + 2 * 16 * 32 + 16 * vocab
  for name in ("softmax",):
    r = by[name]
    assert r["status"] == "ok", r
    assert r["batch"] == 2 and r["tokens_per_step"] == 64
    assert r["params_dense"] == dense
    assert r["tokens_per_s"] == pytest.approx(64 / r["loop_step_s"])
    assert r["loop_overhead"] == pytest.approx(
        r["loop_step_s"] / r["step_s"] - 1)
    assert r["mfu"] == pytest.approx(
        r["model_flops"] / r["loop_step_s"] / r["matmul_flops_per_s"])
  # Causal pairs of T=32: 528; q·k and p·v over H=8, x3.5 for fwd + bwd.
  attention = 3.5 * 2 * 2 * 2 * 528 * (8 + 8)
  assert by["softmax"]["model_flops"] == pytest.approx(
      6 * dense * 64 + attention)
  assert by["softmax"]["flops_note"] == "dense + attention"
  linear_config = training.experiment_config(_training_config().training,
                                             "linear", 32)
  linear = training.model_flops(
      linear_config, config_validation.make_task(linear_config))
  assert linear["params_dense"] == dense
  assert linear["model_flops"] == pytest.approx(6 * dense * 64)
  assert linear["flops_note"].startswith("dense only")

  config = _training_config(output_dir=str(tmp_path))
  paths = report.write_training_outputs(rows, config, ["cmd"])
  summary = open(paths["markdown"]).read()
  assert "| softmax | 32 | 2 | ok |" in summary
  with open(paths["csv"]) as f:
    assert len(list(csv.DictReader(f))) == 2
  assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def config_validation_vocab():
  from configs import text_lm  # pylint: disable=g-import-not-at-top
  return config_validation.make_task(text_lm.get_config()).spec()[
      "vocab_size"]


@pytest.mark.parametrize("field,value,message", [
    ("variants", "all", "explicit variants"),
    ("variants", "nope", "unknown attention 'nope'"),
    ("training.experiment", "reverse", "not a TransformerLM"),
    ("training.experiment", "nonexist", "no configs/nonexist.py"),
    ("training.overrides", "model.nmlayers=2", "did you mean"),
    ("training.overrides", "model.num_layers", "not path=value"),
    ("training.steps", 0, "training.steps must be >= 1"),
])
def test_training_benchmark_bad_config_is_one_line(capsys, field, value,
                                                   message):
  argv = ["benchmark", f"--config={CONFIG_PATH}:training",
          f"--config.{field}={value}"]
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(argv)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: invalid benchmark")
  assert message in err[0]


def test_long_windows_get_a_longer_builtin_text():
  from experiments.bench import training  # pylint: disable=g-import-not-at-top
  c = training.experiment_config(_training_config().training, "softmax",
                                 8192)
  assert c.task.options.length == 8192 and c.batch_size == 1
  task = config_validation.make_task(c)
  assert task.batch("valid", 0, 1)["inputs"].shape == (1, 8192)
  from experiments.data import text  # pylint: disable=g-import-not-at-top
  assert len(text.TextLM(paragraphs=1200).ids) > 1.9 * len(text.TextLM().ids)
  with pytest.raises(ValueError, match="paragraphs sizes the built-in"):
    text.TextLM(path=__file__, paragraphs=700)
  with pytest.raises(ValueError, match="paragraphs=0"):
    text.TextLM(paragraphs=0)


@pytest.mark.parametrize("flags,want", [
    (frozenset({"avx2", "fma"}), jnp.float32),
    (frozenset({"avx512f", "avx512_bf16"}), jnp.bfloat16),
])
def test_roofline_matmul_runs_in_the_kernels_block_dtype(flags, want,
                                                         monkeypatch):
  """A bf16 cell's square matmul is float32 on a CPU without bf16
  instructions (XLA's bf16 matmul there is float32 work plus conversions)
  and bf16 where the CPU has them; float32 cells are float32 either way."""
  monkeypatch.setattr(measure.chunked, "_cpu_flags", lambda: flags)
  for dtype, expected in ((jnp.bfloat16, want), (jnp.float32, jnp.float32)):
    roofline = measure.make_roofline(64, dtype)
    assert [a.dtype for a in roofline.args] == [jnp.dtype(expected)] * 2
    assert roofline.flops == 2.0 * 64 ** 3


@pytest.mark.parametrize("settings_count,panel_rows", [(1, 1), (4, 1),
                                                      (8, 2), (9, 3)])
def test_plots_wrap_settings_into_rows_of_four_panels(settings_count,
                                                      panel_rows, tmp_path):
  """One panel per setting, at most four a row (the peers preset's 8
  settings side by side were 3735 x 360 pixels, too narrow to read)."""
  import matplotlib.image
  rows = []
  for s in range(settings_count):
    for t in (1024, 4096):
      rows.append(dict(variant="softmax", seq_len=t, dtype="fp32",
                       mode="fwd", causal=bool(s % 2), batch=1 + s, heads=8,
                       kv_heads=8, head_dim=64, median_ms=float(t) / 100))
  path = str(tmp_path / "time.png")
  report.plot_vs_t(rows, path, value="median_ms", ylabel="ms")
  height, width = matplotlib.image.imread(path).shape[:2]
  cols = min(report.PLOT_COLUMNS, settings_count)
  # Each panel is about 4.6 x 3.6 inches at 90 dpi, plus the legend.
  assert abs(height / 90 - 3.6 * panel_rows) < 0.5, (height, width)
  assert abs(width / 90 - (4.6 * cols + 1.5)) < 1.0, (height, width)


# --------------------------------------------------------------------------
# block_matmuls: the chunked kernel's matmuls alone (experiments/bench/floor)


def _visited_pairs(T, S, causal):
  """Float64 ``[T, S]``: 1 where the chunked kernel's default causal blocks
  (DEFAULT_BLOCK_Q x DEFAULT_BLOCK_K) visit the pair (the whole diagonal
  block, unmasked), everywhere without causal."""
  if not causal:
    return np.ones((T, S))
  bq, _ = chunked.block_size(T, None, chunked.DEFAULT_BLOCK_Q, "q")
  bk, _ = chunked.block_size(S, None, chunked.DEFAULT_BLOCK_K, "k")
  t, s = np.arange(T)[:, None], np.arange(S)[None, :]
  return (s // bk <= ((t // bq + 1) * bq - 1) // bk).astype(np.float64)


def _matmuls_reference(q, k, v, causal):
  """Float64 ``Σ_s [(t, s) visited] (q_t · k_s) v_s`` per head (GQA by
  repeating key/value heads)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k)
  s = s * _visited_pairs(q.shape[1], k.shape[1], causal)
  return np.einsum("bnts,bsnd->btnd", s, v)


def _floor_inputs(T, S):
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (2, T, 4, 16))
  k = jax.random.normal(ks[1], (2, S, 2, 16))
  v = jax.random.normal(ks[2], (2, S, 2, 8))
  return q, k, v, jax.random.normal(ks[3], (2, T, 4, 8))


@pytest.mark.parametrize("T,S,causal", [(1100, 700, False),
                                        (1100, 1100, True)])
def test_block_matmuls_computes_the_visited_blocks_matmuls(T, S, causal):
  """Output and gradients equal a float64 brute force over the pairs the
  kernel's blocks visit (T=1100 and S=700 pad their last blocks; GQA)."""
  q, k, v, do = _floor_inputs(T, S)
  out = floor.block_matmuls(q, k, v, is_causal=causal)
  want = _matmuls_reference(q, k, v, causal)
  np.testing.assert_allclose(out, want, atol=1e-5 * np.abs(want).max())
  grads = jax.grad(lambda q, k, v: jnp.sum(
      floor.block_matmuls(q, k, v, is_causal=causal) * do),
                   argnums=(0, 1, 2))(q, k, v)
  q64, k64, v64, do64 = (np.asarray(x, np.float64) for x in (q, k, v, do))
  G = q.shape[2] // k.shape[2]
  ke, ve = np.repeat(k64, G, axis=2), np.repeat(v64, G, axis=2)
  dp = np.einsum("btnd,bsnd->bnts", do64, ve) * _visited_pairs(T, S, causal)
  s = np.einsum("btnh,bsnh->bnts", q64, ke) * _visited_pairs(T, S, causal)
  fold = lambda x: x.reshape(x.shape[:2] + (k.shape[2], G, -1)).sum(3)  # noqa: E731
  want_grads = (np.einsum("bnts,bsnh->btnh", dp, ke),
                fold(np.einsum("bnts,btnh->bsnh", dp, q64)),
                fold(np.einsum("bnts,btnd->bsnd", s, do64)))
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def _dots_and_scans(fn, args):
  traced = jax.make_jaxpr(fn)(*args)
  dots = {tuple(tuple(x.aval.shape) for x in eqn.invars)
          for eqn in equations(traced.jaxpr)
          if eqn.primitive.name == "dot_general"}
  scans = sorted(eqn.params["length"] for eqn in equations(traced.jaxpr)
                 if eqn.primitive.name == "scan")
  return dots, scans


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_block_matmuls_runs_the_kernels_matmuls(mode, causal):
  """From the jaxprs: block_matmuls's dots have the operand shapes of the
  chunked kernel's dots and its loops the kernel's trip counts, forward
  (query blocks of 552 rows at T=1100, or 256 when causal) and backward."""
  q, k, v, do = _floor_inputs(1100, 1100 if causal else 700)
  kernel = lambda q, k, v: attn.dot_product_attention(  # noqa: E731
      q, k, v, is_causal=causal, implementation="chunked")
  matmuls = lambda q, k, v: floor.block_matmuls(  # noqa: E731
      q, k, v, is_causal=causal)
  if mode == "fwd_bwd":
    grad = lambda f: jax.grad(  # noqa: E731
        lambda q, k, v: jnp.sum(f(q, k, v) * do), argnums=(0, 1, 2))
    kernel, matmuls = grad(kernel), grad(matmuls)
  want = _dots_and_scans(kernel, (q, k, v))
  got = _dots_and_scans(matmuls, (q, k, v))
  assert got == want
  assert len(want[0]) == (2 if mode == "fwd" else 7)   # 2 + 5 matmuls


def test_block_matmuls_cells_skip_the_error_check_and_count_exact_flops():
  """A block_matmuls cell runs, has no error (its output is not attention)
  and its FLOP/s uses exact attention's analytic count."""
  config = _config(variants="softmax", baselines="jax_nn,block_matmuls",
                   seq_lens=(64,), repeats=1, warmup=1)
  rows = {r["variant"]: r for r in sweep.run_benchmark(config)}
  floor_row, exact = rows["block_matmuls"], rows["softmax"]
  assert floor_row["status"] == "ok" and floor_row["max_abs_err"] is None
  assert exact["max_abs_err"] is not None
  assert floor_row["flops_source"] == "analytic"
  assert floor_row["flops"] == exact["flops"]


def test_peer_table_gains_the_matmul_floor_columns():
  def cell(variant, seconds):
    return dict(_row(variant, 4096, seconds, 1), matmul_n=4096,
                roofline_frac=None)
  rows = [cell("softmax", 4e-3), cell("torch_sdpa", 3e-3),
          cell("block_matmuls", 2.5e-3)]
  (ratios,) = report.peer_ratios(rows)
  assert ratios["vs_block_matmuls"] == pytest.approx(2.5 / 4)
  assert ratios["torch_vs_block_matmuls"] == pytest.approx(3 / 2.5)
  lines = report.peer_summary([ratios])
  assert lines[-5].endswith("÷ matmuls alone | torch ÷ matmuls alone |")
  assert lines[-2] == ("| geometric mean | | — | 0.75 | — | | | 0.62 | "
                       "1.20 |")
  without = report.peer_summary(report.peer_ratios(rows[:2]))
  assert "matmuls alone" not in "".join(without)


def test_block_matmuls_gradient_step_keeps_its_forward():
  """Compiled, a block_matmuls gradient step keeps its forward loops (XLA
  drops a forward whose output only feeds the discarded loss unless the
  backward uses it, as the kernel's does): as many while loops as the
  kernel's gradient step."""
  q, k, v, do = _floor_inputs(1100, 700)

  def loops(f):
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * do),
                            argnums=(0, 1, 2)))
    return step.lower(q, k, v).compile().as_text().count(" while(")

  kernel = loops(lambda q, k, v: attn.dot_product_attention(
      q, k, v, implementation="chunked"))
  assert kernel == 4        # forward: query blocks, key blocks; backward too
  assert loops(floor.block_matmuls) == kernel
