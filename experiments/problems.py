"""Problems: model + loss + metrics + pictures, one per task kind.

:mod:`experiments.data` makes the examples; this module decides what is
learned from them. Two tables decide everything:

* :data:`PROBLEMS` maps a task kind (``task.kind``) to its :class:`Problem`:
  ``init``, a differentiable ``loss``, a jitted ``eval_step`` returning
  batch-mean metrics, the metric that ranks checkpoints, and ``draw`` for
  the pictures in ``workdir/figures``. It is the list of task kinds: every
  task in :data:`experiments.data.TASKS` declares a kind found here.
* :data:`ARCHS` maps ``config.model.arch`` and the task kind to the function
  that builds the model (:func:`build_model`). Config validation accepts an
  arch only where this table has a builder for the task's kind.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attn import models
from attn.models import vit as vit_lib
from attn.modules import AttentionPooling
from experiments import pictures
from experiments import plots

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _rngs(rng):
  d, a = jax.random.split(rng)
  return {"dropout": d, "attention": a}


def cross_entropy(logits, labels, weights=None):
  """Mean token cross-entropy and accuracy (weighted)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if weights is None:
    return jnp.mean(losses), jnp.mean(correct)
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.sum(losses * weights) / denom, jnp.sum(correct * weights) / denom


def _figdir(workdir, step):
  sub = "figures" if step is None else os.path.join("figures", f"step_{step}")
  return os.path.join(workdir, sub)


def _apply_maps(fn, *args, **kwargs):
  """``fn(*args)`` jitted with implied weights on: ``(out, [AttentionMap])``.

  ``fn`` returns ``(out, intermediates)`` (``model.apply(...,
  mutable=["intermediates"])``); modules whose kernel forms no weights get
  their implied ones (:func:`experiments.pictures.implied_weights`).
  """
  with pictures.implied_weights():
    out, inter = jax.jit(fn)(*args, **kwargs)
  return out, pictures.attention_maps(inter)


def _tokens(task, ids):
  return [task.decode([int(t)]) or "·" for t in ids]


class Problem:
  """Base: ``model`` comes from :data:`ARCHS`; subclasses implement the
  hooks."""
  best_metric = "accuracy"
  best_mode = "max"

  def __init__(self, config, task):
    self.config, self.task, self.spec = config, task, task.spec()
    self.model = build_model(config, self.spec)
    self.eval_step = jax.jit(self.evaluate)

  def init(self, rng, batch):
    raise NotImplementedError

  def loss(self, params, batch, rng, train: bool):
    raise NotImplementedError

  def evaluate(self, params, batch) -> dict:
    _, metrics = self.loss(params, batch, jax.random.key(0), False)
    return metrics

  # Test examples the attention summary averages over.
  summary_examples = 32

  def draw(self, params, task, workdir, step=None, best_step=None
           ) -> list[str]:
    """Every picture of the run into ``workdir/figures[/step_N]``.

    ``step``: a mid-run drawing at that step; ``None``: the final pictures
    of the best checkpoint (``best_step``, named in the titles).

    Sets :attr:`attention_summary` (``{"<module>/head_<n>/<stat>": value}``,
    empty if the model has no attention maps), for the caller to record as
    split ``attention``.
    """
    self.caption = (f"{type(self.model).__name__}, attention="
                    f"{self._variant()}, "
                    + (f"step {step}" if step is not None else
                       "best checkpoint" + ("" if best_step is None
                                            else f" (step {best_step})")))
    self.attention_summary = {}
    paths = []
    if step is None:
      p = plots.plot_curves(workdir, os.path.join(workdir, "figures",
                                                  "training_curves.png"))
      if p:
        paths.append(p)
    n = self.config.figures.num_examples
    batch = next(iter(task.eval_batches("test", n, n)))
    figdir = _figdir(workdir, step)
    paths.extend(self.draw_examples(params, batch, figdir))
    m = self.summary_examples
    big = next(iter(task.eval_batches("test", m, m)))
    summaries, note = self.summaries(params, big)
    if summaries:
      self.attention_summary = pictures.flat_metrics(summaries)
      paths.append(plots.plot_attention_summary(
          summaries, os.path.join(figdir, "attention_summary.png"),
          title=f"attention summary over {len(next(iter(big.values())))} "
          f"test examples: {self.caption}", note=note))
    return paths

  def _variant(self) -> str:
    m = self.config.model
    return m.attention if self.config.model.arch in ("transformer", "vit") \
        else m.get("score", m.attention)

  def draw_examples(self, params, batch, figdir) -> list[str]:
    return []

  def summaries(self, params, batch):
    """``({module: {stat: [N]}}, note)`` over ``batch``; empty if none."""
    return {}, ""


# --------------------------------------------------------------------------
# seq2seq: reverse, copy, sort, dates


class Seq2SeqProblem(Problem):
  """Teacher-forced training, greedy decoding for sequence accuracy."""
  best_metric = "sequence_accuracy"

  def __init__(self, config, task):
    super().__init__(config, task)
    self.target_length = self.spec["target_length"]
    self.bos = self.spec.get("bos_id", 1)

  def _dec_in(self, targets):
    bos = jnp.full((targets.shape[0], 1), self.bos, targets.dtype)
    return jnp.concatenate([bos, targets[:, :-1]], axis=1)

  def init(self, rng, batch):
    return self.model.init(
        {"params": rng, **_rngs(rng)}, batch["inputs"],
        self._dec_in(batch["targets"]), padding_mask=batch["inputs"] != 0)[
            "params"]

  def loss(self, params, batch, rng, train):
    logits = self.model.apply(
        {"params": params}, batch["inputs"], self._dec_in(batch["targets"]),
        padding_mask=batch["inputs"] != 0, train=train, rngs=_rngs(rng))
    weights = (batch["targets"] != 0).astype(jnp.float32)
    loss, acc = cross_entropy(logits, batch["targets"], weights)
    return loss, {"token_accuracy": acc}

  def greedy(self, params, inputs):
    """Greedy decoding: ``[B, target_length]`` predicted ids."""
    B, T = inputs.shape[0], self.target_length
    dec = jnp.zeros((B, T), jnp.int32).at[:, 0].set(self.bos)
    pad = inputs != 0

    def body(i, state):
      dec, out = state
      logits = self.model.apply({"params": params}, inputs, dec,
                                padding_mask=pad)
      nxt = jnp.argmax(logits[:, i], -1).astype(jnp.int32)
      out = out.at[:, i].set(nxt)
      dec = jnp.where(i + 1 < T, dec.at[:, jnp.minimum(i + 1, T - 1)].set(nxt),
                      dec)
      return dec, out

    _, out = jax.lax.fori_loop(0, T, body, (dec, jnp.zeros((B, T), jnp.int32)))
    return out

  def evaluate(self, params, batch):
    loss, metrics = self.loss(params, batch, jax.random.key(0), False)
    pred = self.greedy(params, batch["inputs"])
    tgt = batch["targets"]
    ok = (pred == tgt) | (tgt == 0)
    return dict(metrics, loss=loss,
                sequence_accuracy=jnp.mean(jnp.all(ok, -1).astype(jnp.float32)))

  def _maps(self, params, inputs, outputs):
    """Every attention map with the decoder fed BOS + ``outputs`` shifted."""
    fn = lambda p, x, d: self.model.apply(  # pylint: disable=g-long-lambda
        {"params": p}, x, d, padding_mask=x != 0, mutable=["intermediates"])
    _, maps = _apply_maps(fn, params, jnp.asarray(inputs),
                          self._dec_in(jnp.asarray(outputs)))
    out = []
    for m in maps:
      w = m.weights
      if isinstance(self.model, models.RNNSeq2Seq):
        kind = "cross"
        # Luong: [B, T, S]. Bahdanau: nn.scan stacks each step's
        # [B, 1, S] on axis 1 -> [B, T, 1, S]. Both become [B, 1, T, S].
        w = w[:, None] if w.ndim == 3 else np.swapaxes(w, 1, 2)
      elif "cross" in m.path:
        kind = "cross"
      elif m.path.startswith("decoder") or "/decoder" in m.path:
        kind = "decoder_self"
      else:
        kind = "encoder_self"
      out.append((kind, pictures.AttentionMap(m.path, w, m.implied,
                                              m.residual)))
    return out

  def draw_examples(self, params, batch, figdir):
    pred = np.asarray(jax.jit(self.greedy)(params, batch["inputs"]))
    maps = self._maps(params, batch["inputs"], pred)
    note = pictures.note([m for _, m in maps])
    paths = []
    for b in range(len(batch["inputs"])):
      src = _tokens(self.task, batch["inputs"][b])
      out = _tokens(self.task, pred[b])
      dec_in = ["BOS"] + out[:-1]    # what decoder position t reads
      groups = {}
      for kind, m in maps:
        groups.setdefault(kind, []).append(m)
      for kind, items in groups.items():
        x_labels, y_labels = {"cross": (src, out),
                              "decoder_self": (dec_in, out),
                              "encoder_self": (src, src)}[kind]
        axes = {"cross": ("source position", "output position"),
                "decoder_self": (("decoder input position\n(BOS + outputs "
                                  "shifted right)"), "output position"),
                "encoder_self": ("source position", "source position")}[kind]
        paths.append(plots.plot_attention_grid(
            np.stack([m.weights[b] for m in items]),
            os.path.join(figdir, f"{kind}_attention_example{b}.png"),
            x_labels=x_labels, y_labels=y_labels,
            row_names=[m.path for m in items], xlabel=axes[0],
            ylabel=axes[1], note=note,
            title=f"{kind.replace('_', ' ')} attention, {self.caption}\n"
            f"{self.task.decode(batch['inputs'][b])} -> "
            f"{self.task.decode(pred[b])}"))
    return paths

  def summaries(self, params, batch):
    """Teacher-forced on the true targets (so that the alignment is the
    true one); queries = target positions that are not padding."""
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(
        batch["targets"])
    maps = self._maps(params, inputs, targets)
    align = pictures.alignment(self.task.name, inputs, targets)
    out = {}
    for kind, m in maps:
      keys = inputs != 0 if kind in ("cross", "encoder_self") else None
      queries = inputs != 0 if kind == "encoder_self" else targets != 0
      out[m.path] = pictures.summarise(
          m.weights, queries, keys, align if kind == "cross" else None)
    return out, pictures.note([m for _, m in maps])


# --------------------------------------------------------------------------
# lm: associative_recall, text_lm


class LMProblem(Problem):
  """Next-token prediction on ``inputs``, weighted by ``loss_mask``."""

  def init(self, rng, batch):
    return self.model.init({"params": rng, **_rngs(rng)},
                           batch["inputs"])["params"]

  def loss(self, params, batch, rng, train):
    logits = self.model.apply({"params": params}, batch["inputs"],
                              train=train, rngs=_rngs(rng))
    loss, acc = cross_entropy(logits[:, :-1], batch["inputs"][:, 1:],
                              batch["loss_mask"][:, :-1])
    return loss, {"accuracy": acc}

  def evaluate(self, params, batch):
    loss, metrics = self.loss(params, batch, jax.random.key(0), False)
    return dict(metrics, loss=loss)

  def _maps(self, params, inputs):
    fn = lambda p, x: self.model.apply({"params": p}, x,  # pylint: disable=g-long-lambda
                                       mutable=["intermediates"])
    return _apply_maps(fn, params, jnp.asarray(inputs))[1]

  def summaries(self, params, batch):
    maps = self._maps(params, batch["inputs"])
    valid = np.asarray(batch["inputs"]) != 0
    return ({m.path: pictures.summarise(m.weights, valid, valid)
             for m in maps}, pictures.note(maps))

  def draw_examples(self, params, batch, figdir):
    maps = self._maps(params, batch["inputs"][:1])
    toks = _tokens(self.task, batch["inputs"][0])
    n = min(len(toks), 48)
    paths = []
    if maps:
      paths.append(plots.plot_attention_grid(
          np.stack([m.weights[0, :, :n, :n] for m in maps]),
          os.path.join(figdir, "causal_attention_example0.png"),
          x_labels=toks[:n], y_labels=toks[:n],
          row_names=[m.path for m in maps], note=pictures.note(maps),
          title=f"causal self-attention (first {n} tokens), {self.caption}"))
    if (self.task.name == "text_lm"
        and can_decode(self.config.model.attention)):
      prompt = jnp.asarray(batch["inputs"][:1, :16])
      sample = self.model.generate(
          params, prompt, max_new_tokens=min(64, self.spec["input_length"]
                                             - 16), rng=jax.random.key(0),
          temperature=0.8, top_k=10)
      path = os.path.join(figdir, "samples.txt")
      os.makedirs(figdir, exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write(self.task.decode(np.asarray(sample[0])) + "\n")
      paths.append(path)
    return paths


# --------------------------------------------------------------------------
# classification: listops (tokens), digits_vit (images)


class ClassificationProblem(Problem):
  """Sequence classifier for tokens (arch ``transformer``), ViT for images
  (arch ``vit``)."""

  def __init__(self, config, task):
    super().__init__(config, task)
    self.images = isinstance(self.model, vit_lib.ViT)

  def _apply(self, params, batch, train=False, rng=None, **kw):
    extra = {} if self.images else {"padding_mask": batch["inputs"] != 0}
    return self.model.apply({"params": params}, batch["inputs"], train=train,
                            rngs=_rngs(rng) if rng is not None else None,
                            **extra, **kw)

  def init(self, rng, batch):
    extra = {} if self.images else {"padding_mask": batch["inputs"] != 0}
    return self.model.init({"params": rng, **_rngs(rng)}, batch["inputs"],
                           **extra)["params"]

  def loss(self, params, batch, rng, train):
    logits = self._apply(params, batch, train, rng)
    loss, acc = cross_entropy(logits, batch["labels"])
    return loss, {"accuracy": acc}

  def evaluate(self, params, batch):
    loss, metrics = self.loss(params, batch, jax.random.key(0), False)
    return dict(metrics, loss=loss)

  def _maps(self, params, batch):
    fn = lambda p, b: self._apply(p, b, mutable=["intermediates"])
    return _apply_maps(fn, params, batch)

  def summaries(self, params, batch):
    _, maps = self._maps(params, batch)
    valid = None
    if not self.images:
      valid = np.asarray(batch["inputs"]) != 0
      T = maps[0].weights.shape[-1] if maps else valid.shape[1]
      if T == valid.shape[1] + 1:      # a class token in front
        valid = np.concatenate([np.ones_like(valid[:, :1]), valid], 1)
    return ({m.path: pictures.summarise(m.weights, valid, valid)
             for m in maps}, pictures.note(maps))

  def draw_examples(self, params, batch, figdir):
    logits, maps = self._maps(params, batch)
    pred = np.asarray(jnp.argmax(logits, -1))
    weights = [m.weights for m in maps]
    paths = []
    if not weights:  # a model without attention modules
      return paths
    note = pictures.note(maps)
    if self.images:
      rollout = vit_lib.attention_rollout(weights)
      h = batch["inputs"].shape[1] // self.model.patch_size
      w = batch["inputs"].shape[2] // self.model.patch_size
      sal = np.asarray(vit_lib.cls_saliency(rollout, (h, w)))
      for b in range(len(pred)):
        up = np.kron(sal[b], np.ones((self.model.patch_size,) * 2))
        paths.append(plots.plot_saliency(
            batch["inputs"][b, ..., 0], up,
            os.path.join(figdir, f"saliency_example{b}.png"),
            title=f"label {batch['labels'][b]}, predicted {pred[b]}, "
            f"{self.caption}" + (f"\n{note}" if note else "")))
      paths.append(plots.plot_attention_grid(
          np.stack([x[0] for x in weights]),
          os.path.join(figdir, "vit_attention_example0.png"),
          row_names=[m.path for m in maps], note=note,
          xlabel="key token (0 = class token, then patches row by row)",
          ylabel="query token",
          title=f"ViT self-attention, {self.caption}"))
    else:
      n = int(min(64, np.sum(batch["inputs"][0] != 0)))
      toks = _tokens(self.task, batch["inputs"][0, :n])
      paths.append(plots.plot_attention_grid(
          np.stack([x[0, :, :n, :n] for x in weights]),
          os.path.join(figdir, "encoder_attention_example0.png"),
          x_labels=toks, y_labels=toks, row_names=[m.path for m in maps],
          note=note, title=f"encoder self-attention, {self.caption}\n"
          f"label {batch['labels'][0]}, predicted {pred[0]} "
          f"(first {n} tokens)"))
    return paths


# --------------------------------------------------------------------------
# regression: nadaraya_watson


class RegressionProblem(Problem):
  """Nadaraya–Watson attention pooling; metric: test MSE."""
  best_metric = "mse"
  best_mode = "min"

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["queries"], batch["keys"],
                                batch["values"])
    return variables.get("params", {})

  def loss(self, params, batch, rng, train):
    out, _ = self.model.apply({"params": params}, batch["queries"],
                              batch["keys"], batch["values"])
    mse = jnp.mean(jnp.square(out - batch["targets"]))
    metrics = {"mse": mse}
    if "log_bandwidth" in params:  # the learned kernel width, logged
      metrics["bandwidth"] = jnp.exp(params["log_bandwidth"])
    return mse, metrics

  def summaries(self, params, batch):
    """Entropy of the pooling weights and their mean reach in input units,
    ``Σ_s A[t,s]·|x_t − x_s|`` (positions mean nothing here: keys are
    random training inputs)."""
    _, w = jax.jit(self.model.apply)({"params": params}, batch["queries"],
                                     batch["keys"], batch["values"])
    w = np.asarray(w, np.float64)[:, None]           # [B, 1, T, S]
    s = pictures.summarise(w)
    del s["distance"]
    gap = np.abs(np.asarray(batch["queries"], np.float64)[:, :, None]
                 - np.asarray(batch["keys"], np.float64)[:, None, :])
    p = w[:, 0] / np.maximum(w[:, 0].sum(-1, keepdims=True), 1e-30)
    s["input_distance"] = np.array([np.mean(np.sum(p * gap, -1))])
    return {"pooling": s}, ""

  def draw_examples(self, params, batch, figdir):
    out, w = self.model.apply({"params": params}, batch["queries"][:1],
                              batch["keys"][:1], batch["values"][:1])
    order = np.argsort(batch["queries"][0])
    paths = [plots.plot_regression(
        batch["keys"][0], batch["values"][0], batch["queries"][0][order],
        {"truth (noise-free)": batch["targets"][0][order],
         f"{self.model.kernel} kernel": np.asarray(out[0])[order]},
        os.path.join(figdir, "regression_fit.png"),
        title=f"Nadaraya–Watson attention pooling, {self.caption}")]
    paths.append(plots.plot_attention_grid(
        np.asarray(w[0])[None, None], os.path.join(figdir,
                                                   "pooling_weights.png"),
        xlabel="training input", ylabel="query",
        title=f"pooling weights (queries x training inputs), "
        f"{self.caption}"))
    return paths


# --------------------------------------------------------------------------
# glimpse


class GlimpseProblem(Problem):
  """Accuracy plus the attention mass the glimpse puts on the target."""

  def init(self, rng, batch):
    return self.model.init(rng, batch["inputs"], batch["context"])["params"]

  def loss(self, params, batch, rng, train):
    logits, w = self.model.apply({"params": params}, batch["inputs"],
                                 batch["context"])
    loss, acc = cross_entropy(logits, batch["labels"])
    mass = jnp.take_along_axis(w, batch["target_position"][:, None], 1)
    return loss, {"accuracy": acc, "target_mass": jnp.mean(mass)}

  def summaries(self, params, batch):
    _, w = jax.jit(self.model.apply)({"params": params}, batch["inputs"],
                                     batch["context"])
    w = np.asarray(w, np.float32)
    pos = np.asarray(batch["target_position"])
    aligned = (np.arange(w.shape[1])[None] == pos[:, None])[:, None]
    s = pictures.summarise(w[:, None, None], aligned_BTS=aligned)
    del s["distance"]                # one query: no query position
    return {"glimpse": s}, ""

  def draw_examples(self, params, batch, figdir):
    _, w = self.model.apply({"params": params}, batch["inputs"],
                            batch["context"])
    toks = [_tokens(self.task, row) for row in batch["inputs"]]
    return [plots.plot_attention_grid(
        np.asarray(w)[:, None, None, :],
        os.path.join(figdir, "glimpse_weights.png"),
        x_labels=toks[0], row_names=[f"example {i} (target at "
                                     f"{batch['target_position'][i]})"
                                     for i in range(len(toks))],
        title=f"glimpse weights (tokens of example 0 on top), "
        f"{self.caption}", xlabel="input position", ylabel="")]


# --------------------------------------------------------------------------
# set_anomaly: digits_set_anomaly


class SetAnomalyProblem(Problem):
  """Which element of the set is the odd one out."""

  def init(self, rng, batch):
    return self.model.init({"params": rng, **_rngs(rng)},
                           batch["inputs"])["params"]

  def loss(self, params, batch, rng, train):
    logits = self.model.apply({"params": params}, batch["inputs"],
                              train=train, rngs=_rngs(rng))
    loss, acc = cross_entropy(logits, batch["labels"])
    return loss, {"accuracy": acc}

  def evaluate(self, params, batch):
    """Accuracy, loss and ``permutation_error``: the largest change of an
    element's logit when the set is shuffled (a fixed permutation), averaged
    over examples; 0 up to float rounding for an equivariant model."""
    x = batch["inputs"]
    logits = self.model.apply({"params": params}, x)
    loss, acc = cross_entropy(logits, batch["labels"])
    perm = np.random.default_rng(0).permutation(x.shape[1])
    shuffled = self.model.apply({"params": params}, x[:, perm])
    error = jnp.max(jnp.abs(shuffled - logits[:, perm]), axis=-1)
    return {"accuracy": acc, "loss": loss,
            "permutation_error": jnp.mean(error)}

  def _maps(self, params, inputs):
    fn = lambda p, x: self.model.apply({"params": p}, x,  # pylint: disable=g-long-lambda
                                       mutable=["intermediates"])
    return _apply_maps(fn, params, jnp.asarray(inputs))[1]

  def summaries(self, params, batch):
    maps = self._maps(params, batch["inputs"])
    return ({m.path: pictures.summarise(m.weights) for m in maps},
            pictures.note(maps))

  def draw_examples(self, params, batch, figdir):
    maps = self._maps(params, batch["inputs"][:1])
    if not maps:
      return []
    return [plots.plot_attention_grid(
        np.stack([m.weights[0] for m in maps]),
        os.path.join(figdir, "set_attention_example0.png"),
        row_names=[m.path for m in maps], note=pictures.note(maps),
        title=f"set self-attention (odd one: element {batch['labels'][0]}), "
        f"{self.caption}", xlabel="set element", ylabel="set element")]


# --------------------------------------------------------------------------
# The two tables: task kind -> Problem, arch -> task kind -> model builder.

PROBLEMS: Mapping[str, type] = {
    "seq2seq": Seq2SeqProblem, "lm": LMProblem,
    "classification": ClassificationProblem, "regression": RegressionProblem,
    "glimpse": GlimpseProblem, "set_anomaly": SetAnomalyProblem}


def can_decode(attention) -> bool:
  """Whether ``attention`` can decode with a KV cache
  (:func:`attn.models.can_decode`)."""
  return models.can_decode(attention)


def transformer_config(config, **fields) -> models.TransformerConfig:
  """The :class:`~attn.models.TransformerConfig` of ``config.model`` (+
  task-given ``fields`` such as ``vocab_size`` and ``max_len``)."""
  m = config.model
  return models.TransformerConfig(
      emb_dim=m.emb_dim, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads or None, num_layers=m.num_layers,
      mlp_dim=m.mlp_dim, attention=m.attention, positional=m.positional,
      pre_ln=m.pre_ln, dropout_rate=m.dropout_rate,
      attention_dropout_rate=m.attention_dropout_rate,
      logits_soft_cap=m.get("logits_soft_cap", 0.0) or None,
      dtype=DTYPES[config.dtype], **fields)


def _options(config, model: str, **defaults) -> dict:
  """``config.model.options`` over ``defaults``, the options ``model``
  takes; ``ValueError`` for any other name (nothing is silently ignored)."""
  given = config.model.options.to_dict()
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    known = ", ".join(sorted(defaults)) or "none"
    raise ValueError(f"{model} has no option(s) {unknown} in "
                     f"config.model.options; its options: {known}")
  return {**defaults, **given}


def _seq2seq_max_len(spec) -> int:
  return max(spec["input_length"], spec["target_length"]) + 1


def _seq2seq_transformer(config, spec):
  _options(config, "Seq2SeqTransformer")
  return models.Seq2SeqTransformer(transformer_config(
      config, vocab_size=spec["vocab_size"], max_len=_seq2seq_max_len(spec)))


def _rnn_seq2seq(config, spec):
  m = config.model
  opts = _options(config, "RNNSeq2Seq", style="bahdanau")
  return models.RNNSeq2Seq(models.RNNConfig(
      vocab_size=spec["vocab_size"], emb_dim=m.emb_dim, hidden_dim=m.emb_dim,
      style=opts["style"], attention=m.score,
      positional="none", max_len=_seq2seq_max_len(spec),
      dropout_rate=m.dropout_rate, dtype=DTYPES[config.dtype]))


def _transformer_lm(config, spec):
  _options(config, "TransformerLM")
  return models.TransformerLM(transformer_config(
      config, vocab_size=spec["vocab_size"], max_len=spec["input_length"]))


def _encoder_classifier(config, spec):
  if "image_shape" in spec:
    raise ValueError(f"task {spec['name']!r} has image inputs; "
                     f"use arch 'vit'")
  return models.EncoderClassifier(
      transformer_config(config, vocab_size=spec["vocab_size"],
                         max_len=spec["input_length"] + 1),
      num_classes=spec["num_classes"],
      pooling=_options(config, "EncoderClassifier", pooling="mean")[
          "pooling"])


def _vit(config, spec):
  if "image_shape" not in spec:
    raise ValueError(f"arch 'vit' needs image inputs; task "
                     f"{spec['name']!r} has tokens")
  opts = _options(config, "ViT", patch_size=2, pooling="cls")
  return models.ViT(transformer_config(config),
                    num_classes=spec["num_classes"],
                    patch_size=opts["patch_size"], pooling=opts["pooling"])


def _set_encoder(config, spec):
  del spec  # the set size comes with the inputs
  _options(config, "SetEncoder")
  return models.SetEncoder(transformer_config(config))


def _glimpse(config, spec):
  _options(config, "GlimpseNet")
  return models.GlimpseNet(models.GlimpseConfig(
      vocab_size=spec["vocab_size"], num_contexts=spec["num_contexts"],
      num_classes=spec["num_classes"], emb_dim=config.model.emb_dim,
      score=config.model.score, max_len=spec["input_length"],
      dtype=DTYPES[config.dtype]))


def _nadaraya_watson(config, spec):
  del spec
  opts = _options(config, "AttentionPooling", kernel="gaussian",
                  bandwidth=1.0, learn_bandwidth=False)
  return AttentionPooling(**opts)


# config.model.arch -> task kind -> builder(config, spec) -> flax Module.
ARCHS: Mapping[str, Mapping[str, Callable]] = {
    "transformer": {"seq2seq": _seq2seq_transformer, "lm": _transformer_lm,
                    "classification": _encoder_classifier,
                    "set_anomaly": _set_encoder},
    "vit": {"classification": _vit},
    "rnn": {"seq2seq": _rnn_seq2seq},
    "glimpse": {"glimpse": _glimpse},
    "nadaraya_watson": {"regression": _nadaraya_watson},
}


def archs_for(kind: str) -> list[str]:
  """The arch values that build a model for tasks of ``kind``."""
  return sorted(arch for arch, kinds in ARCHS.items() if kind in kinds)


def build_model(config, spec):
  """The model ``config.model.arch`` builds for a task with ``spec``.

  Raises:
    ValueError: unknown arch (listing them), or an arch with no builder for
      the task's kind (listing those that have one), or a builder's refusal.
  """
  arch, kind = config.model.arch, spec["kind"]
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
  if kind not in ARCHS[arch]:
    raise ValueError(f"arch {arch!r} builds no model for task "
                     f"{spec['name']!r} (kind {kind!r}); archs for this "
                     f"kind: {archs_for(kind)}")
  return ARCHS[arch][kind](config, spec)


def make_problem(config, task) -> Problem:
  """The :class:`Problem` for ``task.kind``."""
  if task.kind not in PROBLEMS:
    raise ValueError(f"task {task.name!r} has kind {task.kind!r}, which no "
                     f"problem handles; kinds: {sorted(PROBLEMS)}")
  return PROBLEMS[task.kind](config, task)
