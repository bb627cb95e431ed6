r"""Training benchmark: TransformerLM training steps for attention variants.

For every (variant, T) cell, the language-model experiment
``config.training.experiment`` (``configs/<name>.py``, default ``text_lm``)
is set to ``model.attention=<variant>``, windows of ``T`` tokens and
``batch = max(1, tokens_per_step // T)``, and measured with
:func:`experiments.bench.loop.measure`: the bare jitted train step on
pre-made device batches and the same step inside ``train_and_evaluate``
(the loop overhead). Reported per cell:

* ``step_s`` (bare) and ``loop_step_s`` (in the loop), medians of
  ``repeats`` interleaved timings of ``training.steps`` steps each;
* ``tokens_per_s = batch·T / loop_step_s``;
* ``model_flops`` per step: ``6·P·tokens`` for the ``P`` weights of the
  dense layers (every ``kernel``: projections, MLP, logits; embedding
  lookups are gathers), plus, for exact variants, each attention layer's
  ``q·kᵀ`` and ``p·v`` over the causal pairs, forward + backward
  (:func:`experiments.bench.measure.attention_flops`, 3.5x the forward).
  An approximation's attention work is not counted (``flops_note``):
  its MFU is a lower bound on the dense part's;
* ``mfu = model_flops / loop_step_s / matmul FLOP/s``, the matmul FLOP/s
  of a square float32 matmul measured before and after the cell (the
  median of both), so both see the same machine.

Cells that cannot run (a variant without causal masking, a bad option)
are recorded with their status; the sweep continues.
"""

from __future__ import annotations

import ast
import importlib
import statistics
from typing import Any, Dict, List

import jax
import ml_collections
import numpy as np
import tqdm

from attn import registry
from experiments import config_validation
from experiments import metrics_io
from experiments import problems
from experiments.bench import loop
from experiments.bench.measure import (attention_flops, make_roofline,
                                       time_calls)
from experiments.bench.variants import split_specs

LM_ARCH = "transformer"
TRAINING_COLUMNS = (
    "variant", "exact", "seq_len", "batch", "tokens_per_step", "status",
    "step_s", "loop_step_s", "loop_overhead", "tokens_per_s", "model_flops",
    "flops_note", "matmul_flops_per_s", "mfu", "params_dense", "device")


def experiment_config(training: ml_collections.ConfigDict, variant: str,
                      seq_len: int) -> ml_collections.ConfigDict:
  """The experiment config of one cell (validated; ``ConfigError`` if bad)."""
  try:
    module = importlib.import_module(f"configs.{training.experiment}")
  except ImportError:
    raise ValueError(f"training.experiment={training.experiment!r}: no "
                     f"configs/{training.experiment}.py; use text_lm"
                     ) from None
  c = module.get_config()
  if c.model.arch != LM_ARCH or c.task.name not in ("text_lm",
                                                    "associative_recall"):
    raise ValueError(
        f"training.experiment={training.experiment!r} is not a TransformerLM "
        "language-model config; use text_lm")
  c.model.attention = variant
  c.batch_size = max(1, training.tokens_per_step // seq_len)
  if c.task.name == "text_lm":
    c.task.options.length = seq_len
    # The built-in text's 5% valid/test regions must hold one window.
    c.task.options.paragraphs = max(600, seq_len * 25 * 600 // 150_000 + 1)
  for path, value in parse_overrides(training.overrides).items():
    try:
      config_validation.set_field(c, path, value)
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f"training.overrides: {path!r} is not a field of "
                       f"configs/{training.experiment}.py") from None
  return config_validation.prepare(c)


def parse_overrides(text: str) -> Dict[str, Any]:
  """``"a.b=4,c='x'"`` -> ``{"a.b": 4, "c": "x"}`` (Python literals, else
  strings); ``ValueError`` for an item without ``=``."""
  out = {}
  for item in split_specs(text or ""):
    path, sep, value = item.partition("=")
    if not sep or not path.strip():
      raise ValueError(f"training.overrides: {item!r} is not path=value")
    try:
      out[path.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[path.strip()] = value.strip()
  return out


def model_flops(config, task) -> Dict[str, Any]:
  """``{"params_dense", "model_flops", "flops_note"}`` of one training step
  of ``config`` (see the module docstring)."""
  problem = problems.make_problem(config, task)
  batch = task.batch("train", 0, config.batch_size)
  shapes = jax.eval_shape(problem.init, jax.random.key(0), batch)
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  dense = sum(int(np.prod(x.shape)) for path, x in leaves
              if jax.tree_util.keystr(path).endswith("['kernel']"))
  B, T = batch["inputs"].shape
  flops = 6.0 * dense * B * T
  exact = _is_exact(config.model.attention)
  if exact:
    for path, x in leaves:
      name = jax.tree_util.keystr(path)
      if name.endswith("['attention']['query']['kernel']"):
        _, heads, head_dim = x.shape
        flops += attention_flops(batch=B, heads=heads, q_len=T, kv_len=T,
                                 head_dim=head_dim, value_dim=head_dim,
                                 causal=True, mode="fwd_bwd")
  return {"params_dense": dense, "model_flops": flops,
          "flops_note": "dense + attention" if exact else
                        "dense only (approximate attention not counted)"}


def _is_exact(spec: str) -> bool:
  name, _ = registry.parse_spec(spec)
  return registry.get_entry(name).exact


def _matmul_flops_per_s(roofline, repeats: int = 5) -> float:
  _, times, _ = time_calls(roofline.compiled, roofline.args, warmup=1,
                           repeats=repeats)
  return roofline.flops / statistics.median(times)


def measure_training_cell(training, variant: str, seq_len: int, *,
                          repeats: int, roofline) -> Dict[str, Any]:
  """One cell's row (:data:`TRAINING_COLUMNS`); never raises for a
  variant that cannot run."""
  row: Dict[str, Any] = {"variant": variant, "seq_len": seq_len,
                         "status": "ok",
                         "device": jax.devices()[0].device_kind}
  try:
    row["exact"] = _is_exact(variant)
    config = experiment_config(training, variant, seq_len)
    row["batch"] = config.batch_size
    row["tokens_per_step"] = config.batch_size * seq_len
    task = config_validation.make_task(config)
    row.update(model_flops(config, task))
    before = _matmul_flops_per_s(roofline)
    timing = loop.measure(config, training.steps, repeats)
    after = _matmul_flops_per_s(roofline)
  except Exception as e:  # pylint: disable=broad-except
    # A variant that cannot train here is data about that variant.
    text = metrics_io.one_line(e)
    kind = "unsupported" if isinstance(e, ValueError) else "error"
    row["status"] = f"{kind}: {text[:240]}"
    return row
  row["step_s"] = timing["bare_ms"] / 1e3
  row["loop_step_s"] = timing["loop_ms"] / 1e3
  row["loop_overhead"] = timing["overhead"]
  row["tokens_per_s"] = row["tokens_per_step"] / row["loop_step_s"]
  row["matmul_flops_per_s"] = statistics.median([before, after])
  row["mfu"] = (row["model_flops"] / row["loop_step_s"]
                / row["matmul_flops_per_s"])
  return row


def validate_training(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming a bad field of a training benchmark."""
  t = config.training
  for name in ("tokens_per_step", "steps"):
    if int(t[name]) < 1:
      raise ValueError(f"training.{name} must be >= 1, got {t[name]}")
  if not config.seq_lens or any(int(s) < 2 for s in config.seq_lens):
    raise ValueError(f"seq_lens must be >= 2, got {config.seq_lens}")
  if config.repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {config.repeats}")
  specs = split_specs(config.variants)
  if not specs or "all" in specs:
    raise ValueError("the training benchmark needs explicit variants "
                     "(registry specs such as softmax,linear), not "
                     f"{config.variants!r}")
  for spec in specs:
    registry.get_attention(spec)         # unknown names and options
  # The experiment, its kind and the overrides, once, before any cell.
  experiment_config(t, "softmax", int(config.seq_lens[0]))


def run_training_benchmark(config: ml_collections.ConfigDict
                           ) -> List[Dict[str, Any]]:
  """Every (variant, T) cell of ``config`` (``config.kind == "training"``)."""
  validate_training(config)
  specs = split_specs(config.variants)
  roofline = make_roofline(config.training.matmul_n, jax.numpy.float32)
  cells = [(v, int(t)) for t in config.seq_lens for v in specs]
  rows = []
  for variant, seq_len in tqdm.tqdm(cells, unit="cell", desc="training",
                                    disable=not config.progress):
    row = measure_training_cell(config.training, variant, seq_len,
                                repeats=config.repeats, roofline=roofline)
    rows.append({c: row.get(c) for c in TRAINING_COLUMNS})
  return rows
