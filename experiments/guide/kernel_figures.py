"""Kernel pictures (no training): the sinusoidal table, √d scaling,
masking, mask kinds, efficient variants and Nadaraya–Watson pooling.

Each one calls the library function the README describes.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import attn
from attn import positional
from attn import registry
from attn import scores as scores_lib
from attn.masks import masked_softmax
from attn.modules import nadaraya_watson
from experiments import plots
from experiments.guide.context import Context, colorbar, heatmap


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
  pe_image = axes[0].imshow(pe_PD, cmap="RdBu", aspect="auto",
                            interpolation="nearest", vmin=-1, vmax=1)
  axes[0].set(title="sinusoidal_encoding(positions, dim)",
              xlabel="dimension (sin, cos pairs; frequency falls →)",
              ylabel="position")
  axes[1].imshow(counter_PB, cmap="Greys", aspect="auto",
                 interpolation="nearest")
  axes[1].set(title="binary counter", xlabel="bit (0 = fastest)",
              xticks=range(bits))
  sim_image = axes[2].imshow(sim_PP, cmap="viridis", interpolation="nearest")
  axes[2].set(title="PE[p]·PE[q]: depends on p − q only",
              xlabel="position q", ylabel="position p")
  for ax in axes:
    ax.title.set_fontsize(9)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes[0], pe_image, "PE value")
  colorbar(fig, axes[2], sim_image, "dot product")
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
  score_image = axes[0].imshow(shown, cmap="coolwarm",
                               interpolation="nearest")
  plots.position_ticks(axes[0], S, None, "x")
  plots.position_ticks(axes[0], T, None, "y")
  axes[0].set_title("scores; masked out = blank\n(causal, 7 real keys, "
                    "8 real queries)", fontsize=8)
  weight_image = heatmap(axes[1], before,
                         "mask, then softmax\n(masked_softmax)", vmax=1)
  heatmap(axes[2], np.nan_to_num(after, nan=0.0),
           "softmax, zero masked, renormalise\n(empty rows: 0/0 = NaN, "
           "drawn as 0)", vmax=1)
  diff_image = heatmap(axes[3], np.abs(before - np.nan_to_num(after, nan=0.0)),
           f"|difference|: max {diff:.1e}\non rows with a key", cmap="magma")
  for ax in axes:
    ax.set_xlabel("key s", fontsize=7)
  axes[0].set_ylabel("query t", fontsize=7)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes[0], score_image, "score")
  colorbar(fig, axes[1:3], weight_image)
  colorbar(fig, axes[3], diff_image, "|difference|")
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
    image = heatmap(ax, w_TS, title, vmax=1)
    ax.set_xlabel("key s", fontsize=7)
    facts[f"nonzero[{title}]"] = int(np.count_nonzero(w_TS))
  axes[0].set_ylabel("query t", fontsize=7)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes, image)
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
  fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows),
                           squeeze=False)
  facts: Dict[str, Any] = {}
  for ax, spec in zip(axes.flat, specs):
    w = effective_weights(spec, q, k)
    # Mean over queries of the total-variation distance between the rows.
    tv = float(np.mean(0.5 * np.sum(np.abs(w - exact), axis=-1)))
    name = registry.parse_spec(spec)[0]
    facts[f"tv_distance[{name}]"] = tv
    image = heatmap(ax, np.abs(w), f"{name}: TV {tv:.2f}",
                    vmax=float(np.abs(exact).max()), gamma=0.5)
  for ax in list(axes.flat)[len(specs):]:
    ax.axis("off")
  fig.suptitle(f"implied weights |A| of each variant (its output for "
               f"one-hot values) for the same q, k (T = {T}, queries down, "
               "keys across)\nTV = mean over queries of ½ Σ_s |A − "
               "A_softmax|; power-law colour scale (√)", fontsize=9)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes, image, "|implied weight|")
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
  image = heatmap(axes[1], weights[0.3][:, key_order],
                  "weights, h = 0.3 (queries × keys, both sorted by x)")
  axes[1].set(xlabel="key index (sorted by xᵢ)",
              ylabel="query index (sorted by x)")
  axes[0].title.set_fontsize(9)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes[1], image)
  facts["path"] = ctx.save(fig, "nadaraya_watson")
  return facts
