r"""The pictures of the README's guide to attention, from real code and runs.

    python -m experiments.figures                          # docs/figures/guide_*.png
    python -m experiments.figures --only=masking,variants  # some of them
    python -m experiments.figures --reverse_workdir=runs/reverse
    python -m experiments.figures --fast --output_dir=/tmp/figures   # CI check

Every picture is drawn from the library's own kernels, modules and models:
the kernel pictures (sinusoidal table, √d scaling, masks, efficient variants,
Nadaraya–Watson) call the functions the README describes, and the model
pictures come from short training runs made with
:func:`experiments.train.train_and_evaluate` (reverse, dates, digits ViT and
one glimpse network per score function). A run is trained into
``--workdir_root/<run>`` unless that directory (or the one given with
``--<run>_workdir``) already holds a finished run, whose *best* checkpoint is
then loaded; it must come from the same config file with the same model
sizes. The benchmark picture runs :mod:`experiments.benchmark` in a small
configuration, or plots an existing ``results.json`` (``--benchmark_json``).

The command prints, for each picture, the numbers it shows (variances,
errors, accuracies, timings); the README quotes them.

``--fast`` checks the whole pipeline in seconds: tiny shapes, freshly
initialised models (only one glimpse network is trained, for two steps, so
that training and checkpoint loading run too) and a two-length benchmark.
Its pictures show the layout, not learned behaviour.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np

import attn
from attn import positional
from attn import registry
from attn import scores as scores_lib
from attn.masks import masked_softmax
from attn.models import transformer as tfm
from attn.models import vit as vit_lib
from attn.modules import nadaraya_watson
from configs import benchmark as benchmark_config
from configs import dates as dates_config
from configs import digits_vit as digits_vit_config
from configs import glimpse as glimpse_config
from configs import reverse as reverse_config
from experiments import benchmark
from experiments import config_validation
from experiments import metrics_io
from experiments import problems
from experiments import train
from experiments.checkpoints import Checkpointer

DPI = 80
PREFIX = "guide_"
DEFAULT_OUTPUT_DIR = os.path.join("docs", "figures")
DEFAULT_WORKDIR_ROOT = os.path.join("runs", "figures")

# --------------------------------------------------------------------------
# Training runs the model pictures need


@dataclasses.dataclass(frozen=True)
class Run:
  """A short training run: a config file's ``get_config()`` plus changes.

  Attributes:
    get_config: the config file's ``get_config``.
    steps: training steps in the full mode, evaluated once at the end;
      ``None`` keeps the config's own schedule and evaluations.
    overrides: ``{"model.score": "cosine", ...}`` applied to the config.
  """
  get_config: Callable[[], ml_collections.ConfigDict]
  steps: Optional[int]
  overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)


RUNS: Dict[str, Run] = {
    "reverse": Run(reverse_config.get_config, 300),
    "dates": Run(dates_config.get_config, 800),
    "digits_vit": Run(digits_vit_config.get_config, 600),
    **{f"glimpse_{s}": Run(glimpse_config.get_config, None, {"model.score": s})
       for s in scores_lib.SCORES},
}
# Trained (for two steps) even with --fast, so CI runs train -> load.
FAST_TRAINED = ("glimpse_scaled_dot",)
_FAST_SIZES = dict(num_train_steps=2, eval_every_steps=2,
                   checkpoint_every_steps=2, log_every_steps=1,
                   num_eval_examples=8, eval_batch_size=8)


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  node = config
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def run_config(name: str, fast: bool) -> ml_collections.ConfigDict:
  """The validated config of run ``name`` (shrunk to a tiny model if fast)."""
  run = RUNS[name]
  config = run.get_config()
  for path, value in run.overrides.items():
    _set(config, path, value)
  config.figures.enabled = False
  if fast:
    config.runlocal = True
    config = config_validation.prepare(config)
    config.runlocal = False          # keep the even smaller sizes below
    config.update(_FAST_SIZES)
  elif run.steps is not None:
    config.num_train_steps = run.steps
    config.eval_every_steps = run.steps
    config.checkpoint_every_steps = run.steps
    config.warmup_steps = min(config.warmup_steps, run.steps // 10)
    config.num_eval_examples = 256
  return config_validation.prepare(config)


@dataclasses.dataclass
class Trained:
  """A model ready to draw: its problem (model + task) and parameters.

  Attributes:
    name: key of :data:`RUNS`.
    problem: :class:`experiments.problems.Problem` (``.model``, ``.task``).
    params: the best checkpoint's parameters (or fresh ones when not
      trained).
    init_params: freshly initialised parameters (same seed), for
      before/after comparisons.
    test: test metrics of the best checkpoint (``{}`` when not trained).
  """
  name: str
  problem: Any
  params: Any
  init_params: Any
  test: Dict[str, float]


def final_test_metrics(workdir: str) -> Optional[Dict[str, float]]:
  """The last ``split == "test"`` record of ``workdir/metrics.jsonl``."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return None
  tests = [r for r in metrics_io.read_metrics(workdir)
           if r.get("split") == "test"]
  return tests[-1] if tests else None


def restore_best_params(config, problem, params, workdir: str):
  """Parameters of the best checkpoint in ``workdir`` (``train``'s layout).

  ``params`` gives the structure; raises ``CheckpointError`` if the
  checkpoint does not match it and ``ValueError`` if there is none.
  """
  tx = train.make_optimizer(config)
  target = {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params)}
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints,
                      best_metric=problem.best_metric,
                      best_mode=problem.best_mode)
  try:
    _, state = ckpt.restore_best(target)
  finally:
    ckpt.close()
  if state is None:
    raise ValueError(f"no best checkpoint under {workdir}/checkpoints")
  return state["params"]


# --------------------------------------------------------------------------
# Context shared by the figure functions


@dataclasses.dataclass
class Context:
  """Where pictures go, which runs to use, and the models loaded so far.

  Attributes:
    output_dir: directory of the PNGs.
    fast: tiny shapes, untrained models (see the module docstring).
    workdir_root: where runs are trained (``<root>/<run name>``).
    workdirs: run name -> an existing workdir to load instead.
    benchmark_json: a benchmark ``results.json`` to plot instead of running.
  """
  output_dir: str
  fast: bool = False
  workdir_root: str = DEFAULT_WORKDIR_ROOT
  workdirs: Dict[str, str] = dataclasses.field(default_factory=dict)
  benchmark_json: Optional[str] = None
  _models: Dict[str, Trained] = dataclasses.field(default_factory=dict)

  def path(self, name: str) -> str:
    return os.path.join(self.output_dir, f"{PREFIX}{name}.png")

  def save(self, fig, name: str) -> str:
    """Writes ``fig`` as ``guide_<name>.png`` and closes it."""
    os.makedirs(self.output_dir, exist_ok=True)
    path = self.path(name)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path

  def model(self, name: str) -> Trained:
    """Run ``name`` of :data:`RUNS`, trained (or loaded) once per context."""
    if name not in self._models:
      self._models[name] = self._load(name)
    return self._models[name]

  def _load(self, name: str) -> Trained:
    config = run_config(name, self.fast)
    task = config_validation.make_task(config)
    problem = problems.make_problem(config, task)
    first = task.batch("train", 0, config.batch_size)
    init_params = jax.jit(problem.init)(jax.random.key(config.seed), first)
    if self.fast and name not in FAST_TRAINED:
      return Trained(name, problem, init_params, init_params, {})
    workdir = self.workdirs.get(name) or os.path.join(self.workdir_root, name)
    test = final_test_metrics(workdir)
    if test is None:
      train.train_and_evaluate(config, workdir)
      test = final_test_metrics(workdir)
    params = restore_best_params(config, problem, init_params, workdir)
    return Trained(name, problem, params, init_params, test or {})


# --------------------------------------------------------------------------
# Small drawing helpers


def _heatmap(ax, w, title: str = "", x_labels=None, y_labels=None,
             vmax=None, cmap: str = "viridis", gamma: float = 1.0):
  """``w[rows, cols]`` as an image with optional tick labels.

  ``gamma < 1`` brightens small values (a power-law colour scale).
  """
  norm = matplotlib.colors.PowerNorm(gamma, vmin=0.0, vmax=vmax)
  ax.imshow(np.asarray(w, np.float32), cmap=cmap, norm=norm,
            aspect="auto", interpolation="nearest")
  ax.set_title(title, fontsize=8)
  for labels, set_ticks in ((x_labels, ax.set_xticks),
                            (y_labels, ax.set_yticks)):
    if labels is None:
      set_ticks([])
    else:
      kw = {"rotation": 90} if set_ticks == ax.set_xticks else {}
      set_ticks(range(len(labels)), list(labels), fontsize=6, **kw)


def _tokens(task, ids) -> List[str]:
  """One printable label per id (``·`` for padding, ``␣`` for a space)."""
  return [(task.decode([int(t)]) or "·").replace(" ", "␣") for t in ids]


def _fmt(facts: Dict[str, Any]) -> str:
  parts = []
  for k, v in facts.items():
    if k == "path":
      continue
    parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
  return " ".join(parts)


# --------------------------------------------------------------------------
# Kernel pictures (no training)


def sinusoidal_figure(ctx: Context) -> Dict[str, Any]:
  """The sinusoidal table next to a binary counter, and ``PE·PEᵀ``."""
  positions, dim, bits = (32, 16, 5) if ctx.fast else (64, 32, 6)
  pe_PD = np.asarray(positional.sinusoidal_encoding(positions, dim))
  counter_PB = (np.arange(positions)[:, None] >> np.arange(bits)) & 1
  sim_PP = pe_PD @ pe_PD.T
  # PE[p]·PE[q] = Σ_i cos((p - q) ω_i): constant along each diagonal.
  diagonal_spread = max(float(np.ptp(np.diagonal(sim_PP, k)))
                        for k in range(-positions + 1, positions))
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.6),
                           gridspec_kw={"width_ratios": [1.0, 0.45, 1.0]})
  axes[0].imshow(pe_PD, cmap="RdBu", aspect="auto", interpolation="nearest")
  axes[0].set(title="sinusoidal_encoding(positions, dim)",
              xlabel="dimension (sin, cos pairs; frequency falls →)",
              ylabel="position")
  axes[1].imshow(counter_PB, cmap="Greys", aspect="auto",
                 interpolation="nearest")
  axes[1].set(title="binary counter", xlabel="bit (0 = fastest)",
              xticks=range(bits))
  axes[2].imshow(sim_PP, cmap="viridis", interpolation="nearest")
  axes[2].set(title="PE[p]·PE[q]: depends on p − q only",
              xlabel="position q", ylabel="position p")
  for ax in axes:
    ax.title.set_fontsize(9)
  fig.tight_layout()
  wavelengths = 2 * np.pi * 10000.0 ** (np.arange(0, dim, 2) / dim)
  return {"path": ctx.save(fig, "sinusoidal"),
          "shortest_wavelength": float(wavelengths[0]),
          "longest_wavelength": float(wavelengths[-1]),
          "max_spread_along_diagonals": diagonal_spread}


def scaled_dot_figure(ctx: Context) -> Dict[str, Any]:
  """Why ``1/√d``: var(q·k) grows like d; unscaled softmax saturates."""
  dims = (4, 16, 64, 256) if ctx.fast else (4, 16, 64, 256, 1024)
  T, S = (64, 16) if ctx.fast else (512, 64)
  facts: Dict[str, Any] = {}
  var_raw, var_scaled, top_raw, top_scaled = [], [], [], []
  for i, d in enumerate(dims):
    kq, kk = jax.random.split(jax.random.key(i))
    q_TH = jax.random.normal(kq, (T, d))      # unit-variance components
    k_SH = jax.random.normal(kk, (S, d))
    raw_TS = scores_lib.dot(q_TH, k_SH)
    scaled_TS = scores_lib.scaled_dot(q_TH, k_SH)
    var_raw.append(float(jnp.var(raw_TS)))
    var_scaled.append(float(jnp.var(scaled_TS)))
    top_raw.append(float(jnp.mean(jnp.max(jax.nn.softmax(raw_TS), -1))))
    top_scaled.append(float(jnp.mean(jnp.max(jax.nn.softmax(scaled_TS), -1))))
    facts[f"var_qk_d{d}"] = var_raw[-1]
    facts[f"var_scaled_d{d}"] = var_scaled[-1]
    facts[f"top_weight_d{d}"] = top_raw[-1]
    facts[f"top_weight_scaled_d{d}"] = top_scaled[-1]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  axes[0].loglog(dims, var_raw, "o-", label="q·k")
  axes[0].loglog(dims, var_scaled, "s-", label="q·k / √d")
  axes[0].loglog(dims, dims, ":", color="gray", label="d")
  axes[0].set(xlabel="head dim d", ylabel="variance of the score",
              title="score variance (q, k ~ N(0, I))")
  axes[1].semilogx(dims, top_raw, "o-", label="softmax(q·k)")
  axes[1].semilogx(dims, top_scaled, "s-", label="softmax(q·k / √d)")
  axes[1].axhline(1.0 / S, color="gray", linestyle=":",
                  label=f"uniform 1/{S}")
  axes[1].set(xlabel="head dim d", ylabel="mean largest weight",
              title=f"saturation over {S} keys", ylim=(0, 1.05))
  for ax in axes:
    ax.legend(fontsize=7)
    ax.title.set_fontsize(9)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "scaled_dot")
  return facts


def masking_figure(ctx: Context) -> Dict[str, Any]:
  """Masking before the softmax == zeroing after it and renormalising."""
  T = S = 10
  valid_keys, valid_queries = 7, 8
  scores_TS = 2.0 * jax.random.normal(jax.random.key(0), (T, S))
  t, s = np.arange(T)[:, None], np.arange(S)[None, :]
  mask_TS = (s <= t) & (s < valid_keys) & (t < valid_queries)
  before = np.asarray(masked_softmax(scores_TS, jnp.asarray(mask_TS)))
  zeroed = np.asarray(jax.nn.softmax(scores_TS)) * mask_TS
  with np.errstate(invalid="ignore", divide="ignore"):
    after = zeroed / zeroed.sum(-1, keepdims=True)      # 0/0 = NaN if empty
  rows = mask_TS.any(-1)
  diff = float(np.max(np.abs(before[rows] - after[rows])))
  fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
  shown = np.where(mask_TS, np.asarray(scores_TS), np.nan)
  axes[0].imshow(shown, cmap="coolwarm", interpolation="nearest")
  axes[0].set_title("scores; masked out = blank\n(causal, 7 real keys, "
                    "8 real queries)", fontsize=8)
  _heatmap(axes[1], before, "mask, then softmax\n(masked_softmax)", vmax=1)
  _heatmap(axes[2], np.nan_to_num(after, nan=0.0),
           "softmax, zero masked, renormalise\n(empty rows: 0/0 = NaN, "
           "drawn as 0)", vmax=1)
  _heatmap(axes[3], np.abs(before - np.nan_to_num(after, nan=0.0)),
           f"|difference|: max {diff:.1e}\non rows with a key", cmap="magma")
  for ax in axes:
    ax.set_xlabel("key s", fontsize=7)
  axes[0].set_ylabel("query t", fontsize=7)
  fig.tight_layout()
  return {"path": ctx.save(fig, "masking"), "max_abs_difference": diff,
          "empty_rows_masked_softmax_sum": float(before[~rows].sum()),
          "empty_rows_renormalised_nan": bool(np.isnan(after[~rows]).all())}


def causal_vs_full_figure(ctx: Context) -> Dict[str, Any]:
  """Weights of one head of :func:`attn.dot_product_attention` per mask."""
  T, H = 16, 8
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (1, T, 1, H))
  k = jax.random.normal(kk, (1, T, 1, H))
  v = jax.random.normal(kv, (1, T, 1, H))
  segments = jnp.asarray([[0] * 10 + [1] * 6])
  cases = {
      "full": {},
      "is_causal=True": {"is_causal": True},
      "key_value_seq_lengths=[12]": {
          "key_value_seq_lengths": jnp.asarray([12])},
      "causal + local_window_size=(3, 0)": {
          "is_causal": True, "local_window_size": (3, 0)},
      "causal + segment_ids (10 | 6)": {
          "is_causal": True, "segment_ids": segments},
  }
  fig, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 3.2))
  facts: Dict[str, Any] = {}
  for ax, (title, kwargs) in zip(axes, cases.items()):
    _, w = attn.dot_product_attention(q, k, v, return_weights=True, **kwargs)
    w_TS = np.asarray(w[0, 0])
    _heatmap(ax, w_TS, title, vmax=1)
    ax.set_xlabel("key s", fontsize=7)
    facts[f"nonzero[{title}]"] = int(np.count_nonzero(w_TS))
  axes[0].set_ylabel("query t", fontsize=7)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "causal_vs_full")
  return facts


# Options that make each pattern visible at T = 64.
VARIANT_SPECS = (
    "softmax", "local(window=8)", "longformer(window=6, global_tokens=2)",
    "bigbird(block_size=4, num_window_blocks=3, num_global_blocks=1, "
    "num_random_blocks=2)", "sparse(stride=8)",
    "reformer(n_buckets=8, chunk_size=8)", "topk(k=8)", "hard",
    "local_p(window=8)", "sinkhorn(block_size=8, partners=1)", "linear",
    "performer(num_features=64)", "nystrom(num_landmarks=8)",
    "linformer(k=16, max_length=64)", "synthesizer(kind='random')",
)
_FAST_VARIANT_SPECS = ("softmax", "local(window=4)", "topk(k=4)", "linear",
                       "linformer(k=8, max_length=32)")


def effective_weights(spec: str, q, k, rng=None):
  """The ``[T, S]`` matrix a kernel applies to the values, for head 0.

  Every registered kernel is linear in ``value``, so calling it with the
  identity as values (``v[0, s, 0, :] = e_s``) returns its attention matrix,
  whether or not it ever materialises one. Parameterised variants get fresh
  parameters from their registered initialisers.
  """
  S = k.shape[1]
  value = jnp.broadcast_to(jnp.eye(S)[None, :, None, :],
                           (1, S, k.shape[2], S))
  kwargs = {}
  shapes = registry.attention_param_shapes(spec, q.shape, k.shape)
  if shapes:
    keys = jax.random.split(jax.random.key(7), len(shapes))
    kwargs["params"] = {name: init(key, shape) for key, (name, (shape, init))
                        in zip(keys, shapes.items())}
  if rng is not None:
    kwargs["rng"] = rng
  out = jax.jit(registry.get_attention(spec))(q, k, value, **kwargs)
  return np.asarray(out[0, :, 0, :], np.float32)


def local_queries_keys(T: int, H: int, seed: int = 3):
  """``q, k [1, T, 1, H]``: a shared positional part plus random content.

  ``q_t = 3·PE(t) + n_t``, ``k_s = 3·PE(s) + m_s`` with the sinusoidal table
  ``PE`` and standard normal ``n, m``: exact attention then concentrates
  near the diagonal with content-dependent peaks elsewhere, the situation
  the sparse variants are designed for.
  """
  pe_TH = 3.0 * positional.sinusoidal_encoding(T, H)
  kq, kk = jax.random.split(jax.random.key(seed))
  q = pe_TH + jax.random.normal(kq, (T, H))
  k = pe_TH + jax.random.normal(kk, (T, H))
  return q[None, :, None, :], k[None, :, None, :]


def variants_figure(ctx: Context) -> Dict[str, Any]:
  """What every efficient variant does to the same queries and keys."""
  specs = _FAST_VARIANT_SPECS if ctx.fast else VARIANT_SPECS
  T, H = (32, 8) if ctx.fast else (64, 16)
  q, k = local_queries_keys(T, H)
  exact = effective_weights("softmax", q, k)
  cols = 5
  rows = -(-len(specs) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows),
                           squeeze=False)
  facts: Dict[str, Any] = {}
  for ax, spec in zip(axes.flat, specs):
    w = effective_weights(spec, q, k)
    # Mean over queries of the total-variation distance between the rows.
    tv = float(np.mean(0.5 * np.sum(np.abs(w - exact), axis=-1)))
    name = registry.parse_spec(spec)[0]
    facts[f"tv_distance[{name}]"] = tv
    _heatmap(ax, np.abs(w), f"{name}: TV {tv:.2f}",
             vmax=float(np.abs(exact).max()), gamma=0.5)
  for ax in list(axes.flat)[len(specs):]:
    ax.axis("off")
  fig.suptitle(f"|effective attention matrix| of each variant for the same "
               f"q, k (T = {T}, queries down, keys across); TV = mean over "
               "queries of ½ Σ_s |A − A_softmax|; colour ∝ √|A|", fontsize=9)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "variants")
  return facts


def nadaraya_watson_figure(ctx: Context) -> Dict[str, Any]:
  """Kernel regression as attention, three bandwidths (no training)."""
  from experiments.data import get_task  # pylint: disable=g-import-not-at-top
  task = get_task("nadaraya_watson", seed=0)
  batch = next(iter(task.eval_batches("test", 1, 1)))
  x_S, y_S = batch["keys"][0], batch["values"][0]
  order = np.argsort(batch["queries"][0])
  x_T, truth_T = batch["queries"][0][order], batch["targets"][0][order]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
  axes[0].plot(x_S, y_S, "o", alpha=0.4, markersize=3, label="keys, values")
  axes[0].plot(x_T, truth_T, "k:", label="2 sin x + x")
  facts: Dict[str, Any] = {}
  weights = {}
  for h in (0.05, 0.3, 2.0):
    out, w = nadaraya_watson(x_T[None], x_S[None], y_S[None],
                             kernel="gaussian", bandwidth=h)
    mse = float(np.mean((np.asarray(out[0]) - truth_T) ** 2))
    facts[f"mse_bandwidth_{h}"] = mse
    weights[h] = np.asarray(w[0])
    axes[0].plot(x_T, np.asarray(out[0]), label=f"h = {h}: MSE {mse:.2f}")
  axes[0].set(xlabel="x (query / key)", ylabel="y (value)",
              title="f(x) = Σ softmax(−(x − xᵢ)² / 2h²) yᵢ")
  axes[0].legend(fontsize=7)
  key_order = np.argsort(x_S)
  _heatmap(axes[1], weights[0.3][:, key_order],
           "weights, h = 0.3 (queries × keys, both sorted by x)")
  axes[1].set(xlabel="key xᵢ", ylabel="query x")
  axes[0].title.set_fontsize(9)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "nadaraya_watson")
  return facts


# --------------------------------------------------------------------------
# Model pictures (short training runs)


def apply_jit(model, params, *args, **kwargs):
  """``model.apply`` under ``jax.jit``, returning ``(out, intermediates)``.

  Compiling the whole call is several times cheaper than running a Flax
  model eagerly op by op.
  """
  fn = lambda p, *a, **kw: model.apply({"params": p}, *a,  # pylint: disable=g-long-lambda
                                       mutable=["intermediates"], **kw)
  return jax.jit(fn)(params, *args, **kwargs)


def seq2seq_attention(trained: Trained, inputs, outputs=None):
  """Every sown weight of a seq2seq model on ``inputs``.

  ``outputs[B, T]`` (the decoder's tokens, teacher-forced) default to the
  model's greedy predictions. Returns ``(outputs, {path: weights[B, N, T',
  S']})``.
  """
  problem, params = trained.problem, trained.params
  if outputs is None:
    outputs = jax.jit(problem.greedy)(params, jnp.asarray(inputs))
  _, inter = apply_jit(problem.model, params, inputs,
                       problem._dec_in(jnp.asarray(outputs)),  # pylint: disable=protected-access
                       padding_mask=inputs != 0)
  return np.asarray(outputs), {p: np.asarray(w)
                               for p, w in tfm.attention_weights(inter)}


def _place(path: str) -> str:
  if "cross" in path:
    return "cross"
  return "decoder_self" if path.startswith("decoder") else "encoder_self"


def encoder_decoder_figure(ctx: Context) -> Dict[str, Any]:
  """The three places attention sits, in a trained reverse model."""
  trained = ctx.model("reverse")
  task = trained.problem.task
  batch = next(iter(task.eval_batches("test", 1, 1)))
  inputs = batch["inputs"][:1]
  pred, weights = seq2seq_attention(trained, inputs)
  src, out = _tokens(task, inputs[0]), _tokens(task, pred[0])
  # The first layer of each place, averaged over heads.
  first = {}
  for path, w in weights.items():
    first.setdefault(_place(path), (path, w[0].mean(0)))
  L = int(np.sum(inputs[0] != 0))
  cross = first["cross"][1]
  mirrored = float(np.mean([cross[t, L - 1 - t] for t in range(L)]))
  fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
  for ax, (place, x_lab, y_lab, what) in zip(axes, (
      ("encoder_self", src, src, "encoder self-attention (full)"),
      ("decoder_self", out, out, "decoder self-attention (causal)"),
      ("cross", src, out, "cross-attention (decoder → encoder)"))):
    path, w = first[place]
    _heatmap(ax, w, f"{what}\n{path}, mean of heads", x_lab, y_lab, vmax=1)
    ax.set_xlabel("key (source)" if place != "decoder_self" else
                  "key (output so far)", fontsize=7)
    ax.set_ylabel("query", fontsize=7)
  fig.suptitle(f"reverse: {task.decode(inputs[0])} → {task.decode(pred[0])}",
               fontsize=9)
  fig.tight_layout()
  return {"path": ctx.save(fig, "encoder_decoder"),
          "test_sequence_accuracy": trained.test.get("sequence_accuracy",
                                                     float("nan")),
          "cross_mass_on_mirrored_position": mirrored}


def heads_figure(ctx: Context) -> Dict[str, Any]:
  """Every head of every encoder layer of the trained dates model."""
  trained = ctx.model("dates")
  task = trained.problem.task
  batch = next(iter(task.eval_batches("test", 1, 1)))
  inputs = batch["inputs"][:1]
  # The encoder does not look at the decoder: teacher forcing is enough.
  _, weights = seq2seq_attention(trained, inputs, batch["targets"][:1])
  n = int(np.sum(inputs[0] != 0))
  labels = _tokens(task, inputs[0, :n])
  letters = np.array([c.isalpha() for c in labels])
  enc = [(p, w[0, :, :n, :n]) for p, w in weights.items()
         if _place(p) == "encoder_self"]
  L, N = len(enc), enc[0][1].shape[0]
  fig, axes = plt.subplots(L, N, figsize=(2.9 * N, 3.0 * L), squeeze=False)
  facts: Dict[str, Any] = {}
  for l, (path, w_NTS) in enumerate(enc):
    for h in range(N):
      _heatmap(axes[l, h], w_NTS[h], f"{path} head {h}", labels, labels,
               vmax=1)
      # The key this head attends to most, and its share of all weight.
      share_S = w_NTS[h].sum(0) / n
      top = int(np.argmax(share_S))
      facts[f"top_key[layer{l}/head{h}]"] = (
          f"{top}:{labels[top]}:{share_S[top]:.2f}")
      facts[f"mass_on_letters[layer{l}/head{h}]"] = float(
          share_S[letters].sum())
  fig.suptitle(f"dates encoder self-attention, every head: "
               f"{task.decode(inputs[0])!r}", fontsize=9)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "heads")
  return facts


def dates_alignment_figure(ctx: Context) -> Dict[str, Any]:
  """Cross-attention of the trained dates model on differently formatted
  test dates: the learned alignment."""
  trained = ctx.model("dates")
  task = trained.problem.task
  batch = next(iter(task.eval_batches("test", 32, 32)))
  # Three examples with different source lengths (so different formats).
  chosen, lengths = [], set()
  for i, row in enumerate(batch["inputs"]):
    n = int(np.sum(row != 0))
    if n not in lengths:
      chosen.append(i)
      lengths.add(n)
    if len(chosen) == 3:
      break
  inputs = batch["inputs"][chosen]
  pred, weights = seq2seq_attention(trained, inputs)
  cross = [(p, w) for p, w in weights.items() if _place(p) == "cross"]
  path, w_BNTS = cross[-1]          # the last layer: closest to the output
  fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.6),
                           squeeze=False)
  correct = 0
  for ax, b in zip(axes[0], range(len(chosen))):
    n = int(np.sum(inputs[b] != 0))
    ok = np.array_equal(pred[b], batch["targets"][chosen[b]])
    correct += int(ok)
    _heatmap(ax, w_BNTS[b].mean(0)[:, :n], f"{task.decode(inputs[b])!r} → "
             f"{task.decode(pred[b])!r}", _tokens(task, inputs[b, :n]),
             _tokens(task, pred[b]), vmax=1)
  fig.suptitle(f"dates: cross-attention ({path}, mean of heads)", fontsize=9)
  fig.tight_layout()
  return {"path": ctx.save(fig, "dates_alignment"),
          "test_sequence_accuracy": trained.test.get("sequence_accuracy",
                                                     float("nan")),
          "shown_examples_correct": correct}


def _char_class(ch: str) -> str:
  if ch.isdigit():
    return "digit"
  return "letter" if ch.isalpha() else "punctuation / space"


def _pca_2d(x_VD: np.ndarray) -> tuple:
  """``(coordinates [V, 2], fraction of the variance they explain)``."""
  centred = x_VD - x_VD.mean(0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  return u[:, :2] * s[:2], float(np.sum(s[:2] ** 2) / np.sum(s ** 2))


def _cosine(x_VD: np.ndarray) -> np.ndarray:
  unit = x_VD / np.linalg.norm(x_VD, axis=-1, keepdims=True)
  return unit @ unit.T


def embeddings_figure(ctx: Context) -> Dict[str, Any]:
  """The dates model's source character embeddings before and after
  training: PCA to 2-D, and how similar the two cases of a letter become."""
  trained = ctx.model("dates")
  task = trained.problem.task
  ids = np.arange(3, task.spec()["vocab_size"])        # skip pad/bos/eos
  chars = [task.decode([i]) for i in ids]
  classes = [_char_class(c) for c in chars]
  pairs = [(chars.index(c), chars.index(c.upper())) for c in chars
           if c.islower() and c.upper() in chars]
  table = lambda p: np.asarray(  # pylint: disable=g-long-lambda
      p["source_embedding"]["embed"]["embedding"])[ids]
  facts: Dict[str, Any] = {}
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.4),
                           gridspec_kw={"width_ratios": [1.0, 1.0, 0.9]})
  colours = {"digit": "C0", "letter": "C1", "punctuation / space": "C2"}
  same_case = {}
  for ax, (when, params) in zip(axes, (("initialisation", trained.init_params),
                                       ("after training", trained.params))):
    x = table(params)
    xy, explained = _pca_2d(x)
    cos = _cosine(x)
    same = np.array([cos[a, b] for a, b in pairs])
    other = np.mean([cos[a, b] for a, _ in pairs for _, b in pairs
                     if (a, b) not in pairs])
    same_case[when] = same
    facts[f"cos_same_letter[{when}]"] = float(same.mean())
    facts[f"cos_different_letters[{when}]"] = float(other)
    digits = np.array(classes) == "digit"
    facts[f"digit_norm_over_letter_norm[{when}]"] = float(
        np.linalg.norm(x[digits], axis=-1).mean()
        / np.linalg.norm(x[np.array(classes) == "letter"], axis=-1).mean())
    for a, b in pairs:
      ax.plot(xy[[a, b], 0], xy[[a, b], 1], color="0.8", linewidth=0.6,
              zorder=0)
    for cls, colour in colours.items():
      pts = xy[[c == cls for c in classes]]
      ax.scatter(pts[:, 0], pts[:, 1], s=12, color=colour, label=cls)
    for (px, py), ch in zip(xy, chars):
      ax.annotate(ch if ch != " " else "␣", (px, py), fontsize=7,
                  xytext=(2, 2), textcoords="offset points")
    ax.set_title(f"{when}: PCA to 2-D ({explained:.0%} of the variance)\n"
                 "grey lines join the two cases of a letter", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0].legend(fontsize=7)
  letters = [chars[a] for a, _ in pairs]
  order = np.argsort(same_case["after training"])
  for when, marker in (("initialisation", "x"), ("after training", "o")):
    axes[2].plot(same_case[when][order], range(len(pairs)), marker,
                 label=f"{when} (mean {same_case[when].mean():.2f})")
  axes[2].axvline(facts["cos_different_letters[after training]"],
                  color="gray", linestyle=":",
                  label="different letters, trained")
  axes[2].set_yticks(range(len(pairs)),
                     [f"{letters[i]}/{letters[i].upper()}" for i in order],
                     fontsize=6)
  axes[2].set(xlabel="cosine similarity", title="cos(lower case, upper case)")
  axes[2].title.set_fontsize(9)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "embeddings")
  return facts


def vit_saliency_figure(ctx: Context) -> Dict[str, Any]:
  """Attention rollout of the trained digits ViT on test digits."""
  trained = ctx.model("digits_vit")
  problem, params = trained.problem, trained.params
  count = 6
  batch = next(iter(problem.task.eval_batches("test", count, count)))
  logits, inter = apply_jit(problem.model, params, batch["inputs"])
  pred = np.asarray(jnp.argmax(logits, -1))
  rollout = vit_lib.attention_rollout(
      [w for _, w in tfm.attention_weights(inter)])
  p = problem.model.patch_size
  grid = (batch["inputs"].shape[1] // p, batch["inputs"].shape[2] // p)
  sal = np.asarray(vit_lib.cls_saliency(rollout, grid))
  fig, axes = plt.subplots(2, count, figsize=(1.7 * count, 3.8))
  for b in range(count):
    image = batch["inputs"][b, ..., 0]
    axes[0, b].imshow(image, cmap="gray_r")
    axes[0, b].set_title(f"label {batch['labels'][b]}, pred {pred[b]}",
                         fontsize=7)
    axes[1, b].imshow(np.kron(sal[b], np.ones((p, p))), cmap="inferno")
    axes[1, b].contour(image, levels=[0.5 * float(image.max())],
                       colors="cyan", linewidths=0.8)
    for ax in axes[:, b]:
      ax.axis("off")
  fig.suptitle("ViT on 8×8 digits: attention rollout of the class token "
               f"per {p}×{p} patch (bright = more), digit outlined",
               fontsize=9)
  fig.tight_layout()
  return {"path": ctx.save(fig, "vit_saliency"),
          "test_accuracy": trained.test.get("accuracy", float("nan")),
          "shown_correct": int(np.sum(pred == batch["labels"]))}


def glimpse_figure(ctx: Context) -> Dict[str, Any]:
  """One glimpse network per score function: accuracy, target mass and
  where each one looks on the same example."""
  names = ["scaled_dot", "location"] if ctx.fast else list(scores_lib.SCORES)
  models = {s: ctx.model(f"glimpse_{s}") for s in names}
  task = models[names[0]].problem.task
  batch = next(iter(task.eval_batches("test", 1, 1)))
  facts: Dict[str, Any] = {}
  rows = []
  for s, trained in models.items():
    (_, w), _ = apply_jit(trained.problem.model, trained.params,
                          batch["inputs"], batch["context"])
    rows.append(np.asarray(w[0]))
    facts[f"accuracy[{s}]"] = trained.test.get("accuracy", float("nan"))
    facts[f"target_mass[{s}]"] = trained.test.get("target_mass",
                                                  float("nan"))
  fig, axes = plt.subplots(1, 2, figsize=(12, 3.4),
                           gridspec_kw={"width_ratios": [1.0, 1.6]})
  x = np.arange(len(names))
  axes[0].bar(x - 0.2, [facts[f"accuracy[{s}]"] for s in names], 0.4,
              label="test accuracy")
  axes[0].bar(x + 0.2, [facts[f"target_mass[{s}]"] for s in names], 0.4,
              label="weight on the target")
  classes, length = task.spec()["num_classes"], batch["inputs"].shape[1]
  axes[0].axhline(1.0 / classes, color="C0", linestyle=":",
                  label=f"chance accuracy 1/{classes}")
  axes[0].axhline(1.0 / length, color="C1", linestyle=":",
                  label=f"uniform weight 1/{length}")
  axes[0].set_xticks(x, names, fontsize=7, rotation=20)
  axes[0].set(ylim=(0, 1.05), title="glimpse network per score function")
  axes[0].legend(fontsize=7)
  target = int(batch["target_position"][0])
  _heatmap(axes[1], np.stack(rows), f"glimpse weights on one test example "
           f"(context {task.key_names[batch['context'][0]]}, target at "
           f"position {target}, boxed)", _tokens(task, batch["inputs"][0]),
           names, vmax=1)
  axes[1].add_patch(plt.Rectangle((target - 0.5, -0.5), 1, len(names),
                                  fill=False, edgecolor="red", linewidth=1.5))
  axes[0].title.set_fontsize(9)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "glimpse")
  return facts


# --------------------------------------------------------------------------
# Benchmark


BENCHMARK_VARIANTS = ("xla,chunked,linear,performer(num_features=64),"
                      "local(window=128)")


def benchmark_rows(ctx: Context) -> List[Dict[str, Any]]:
  """Rows of ``experiments.benchmark``: read, or run in a small config."""
  if ctx.benchmark_json:
    import json  # pylint: disable=g-import-not-at-top
    with open(ctx.benchmark_json, encoding="utf-8") as f:
      return json.load(f)["cells"]
  config = benchmark_config.get_config()
  config.update(variants=BENCHMARK_VARIANTS, baselines="jax_nn",
                seq_lens=(256, 512, 1024, 2048, 4096), batch_size=1,
                num_heads=4, head_dims=(64,), causal=(False,),
                modes=("fwd",), repeats=3, check_error=False,
                roofline_max_n=512, progress=False)
  if ctx.fast:
    config.update(variants="xla,linear", seq_lens=(32, 64), num_heads=1,
                  head_dims=(8,), repeats=1, roofline_max_n=64)
  return benchmark.run_benchmark(config)


def _device_name(rows) -> str:
  return str(rows[0].get("device") or "unknown device")


def benchmark_figure(ctx: Context) -> Dict[str, Any]:
  """Time and XLA temporary memory against sequence length, one setting."""
  rows = [r for r in benchmark_rows(ctx) if r["status"] == "ok"]
  if not rows:
    raise ValueError("the benchmark produced no successful cells")
  setting = tuple(rows[0][k] for k in benchmark.SETTING_KEYS)
  rows = [r for r in rows
          if tuple(r[k] for k in benchmark.SETTING_KEYS) == setting]
  names = list(dict.fromkeys(r["variant"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  facts: Dict[str, Any] = {}
  longest = max(r["seq_len"] for r in rows)
  for name in names:
    mine = sorted((r for r in rows if r["variant"] == name),
                  key=lambda r: r["seq_len"])
    ts = [r["seq_len"] for r in mine]
    axes[0].loglog(ts, [r["time_median_s"] * 1e3 for r in mine], "o-",
                   base=2, label=name, markersize=3)
    mem = [(r["seq_len"], r["temp_bytes"] / 2 ** 20) for r in mine
           if r.get("temp_bytes")]
    if mem:
      axes[1].loglog(*zip(*mem), "o-", base=2, label=name, markersize=3)
    last = mine[-1]
    if last["seq_len"] == longest:
      facts[f"ms_at_T{longest}[{name}]"] = last["time_median_s"] * 1e3
      if last.get("temp_bytes") is not None:
        facts[f"temp_MiB_at_T{longest}[{name}]"] = last["temp_bytes"] / 2**20
  s = dict(zip(benchmark.SETTING_KEYS, setting))
  axes[0].set(xlabel="sequence length T", ylabel="median time (ms)",
              title=f"time: {s['dtype']} {s['mode']}, B={s['batch']} "
              f"N={s['heads']} H={s['head_dim']}, {_device_name(rows)}")
  axes[1].set(xlabel="sequence length T",
              ylabel="XLA temporary memory (MiB)",
              title="memory (memory_analysis of the compiled call)")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.title.set_fontsize(8)
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  facts["device"] = _device_name(rows)
  fig.tight_layout()
  facts["path"] = ctx.save(fig, "benchmark")
  return facts


# --------------------------------------------------------------------------
# Driver


FIGURES: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "sinusoidal": sinusoidal_figure,
    "scaled_dot": scaled_dot_figure,
    "masking": masking_figure,
    "causal_vs_full": causal_vs_full_figure,
    "variants": variants_figure,
    "nadaraya_watson": nadaraya_watson_figure,
    "encoder_decoder": encoder_decoder_figure,
    "heads": heads_figure,
    "dates_alignment": dates_alignment_figure,
    "embeddings": embeddings_figure,
    "vit_saliency": vit_saliency_figure,
    "glimpse": glimpse_figure,
    "benchmark": benchmark_figure,
}


def make_figures(output_dir: str = DEFAULT_OUTPUT_DIR, *, fast: bool = False,
                 only: Optional[Sequence[str]] = None,
                 workdir_root: Optional[str] = None,
                 workdirs: Optional[Dict[str, str]] = None,
                 benchmark_json: Optional[str] = None,
                 log: Callable[[str], None] = print
                 ) -> Dict[str, Dict[str, Any]]:
  """Draws the guide's pictures into ``output_dir/guide_<name>.png``.

  Args:
    output_dir: where the PNGs go.
    fast: tiny shapes and untrained models (CI); see the module docstring.
    only: names of :data:`FIGURES` to draw (default: all).
    workdir_root: where training runs live (default ``runs/figures``; with
      ``fast``, a temporary directory that is removed afterwards).
    workdirs: run name (a key of :data:`RUNS`) -> existing workdir to load.
    benchmark_json: plot this benchmark ``results.json`` instead of running.
    log: called with one line of numbers per picture.

  Returns:
    ``{name: facts}``; ``facts["path"]`` is the PNG, the other entries are
    the numbers the picture shows.

  Raises:
    ValueError: an unknown figure or run name.
  """
  names = list(only) if only else list(FIGURES)
  unknown = sorted(set(names) - set(FIGURES))
  if unknown:
    raise ValueError(f"unknown figure(s) {unknown}; figures: {list(FIGURES)}")
  bad_runs = sorted(set(workdirs or {}) - set(RUNS))
  if bad_runs:
    raise ValueError(f"unknown run(s) {bad_runs}; runs: {list(RUNS)}")
  with tempfile.TemporaryDirectory(prefix="attn_figures_") as tmp:
    root = workdir_root or (tmp if fast else DEFAULT_WORKDIR_ROOT)
    ctx = Context(output_dir=output_dir, fast=fast, workdir_root=root,
                  workdirs=dict(workdirs or {}),
                  benchmark_json=benchmark_json)
    results = {}
    for name in names:
      start = time.process_time()
      results[name] = FIGURES[name](ctx)
      log(f"{os.path.basename(results[name]['path'])} "
          f"({time.process_time() - start:.0f} s CPU): {_fmt(results[name])}")
  return results


# --------------------------------------------------------------------------
# Command line


_RUN_FLAGS = ("reverse", "dates", "digits_vit")    # --<run>_workdir


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this command's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_bool("fast", False, "Tiny shapes and untrained models: checks "
                    "the pipeline in seconds (CI).", flag_values=fv)
  flags.DEFINE_string("output_dir", DEFAULT_OUTPUT_DIR,
                      "Where guide_<name>.png go.", flag_values=fv)
  flags.DEFINE_list("only", [], f"Figures to draw: {', '.join(FIGURES)} "
                    "(default all).", flag_values=fv)
  flags.DEFINE_string("workdir_root", None, "Where the training runs go "
                      f"(default {DEFAULT_WORKDIR_ROOT}; a temporary "
                      "directory with --fast).", flag_values=fv)
  for run in _RUN_FLAGS:
    flags.DEFINE_string(f"{run}_workdir", None, f"An existing {run} run "
                        f"(configs/{run}.py) to load instead of "
                        f"<workdir_root>/{run}.", flag_values=fv)
  flags.DEFINE_string("benchmark_json", None, "Plot this experiments."
                      "benchmark results.json instead of running a small "
                      "benchmark.", flag_values=fv)


def config_from_flags(fv: flags.FlagValues) -> ml_collections.ConfigDict:
  """The keyword arguments of :func:`make_figures` given by the flags."""
  return ml_collections.ConfigDict(dict(
      output_dir=fv.output_dir, fast=fv.fast, only=tuple(fv.only),
      workdir_root=fv.workdir_root, benchmark_json=fv.benchmark_json,
      workdirs={run: fv[f"{run}_workdir"].value for run in _RUN_FLAGS
                if fv[f"{run}_workdir"].value}))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for unknown figure names or a missing file."""
  unknown = sorted(set(config.only) - set(FIGURES))
  if unknown:
    raise ValueError(f"unknown figure(s) {unknown}; figures: {list(FIGURES)}")
  if config.benchmark_json and not os.path.exists(config.benchmark_json):
    raise ValueError(f"--benchmark_json={config.benchmark_json}: no such "
                     "file")


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
         ) -> None:
  """Parses nothing itself: ``flag_values`` -> :func:`make_figures`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  logging.set_verbosity(logging.WARNING)      # no Orbax INFO chatter
  config = config_from_flags(flag_values)
  validate_config(config)
  make_figures(**config.to_dict())


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(functools.partial(main, flag_values=flags.FLAGS))
