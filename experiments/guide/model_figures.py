"""Model pictures, from the short training runs of :mod:`.runs`: the three
places attention sits, every head, the learned date alignment, embeddings,
ViT saliency and one glimpse network per score function.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from attn import scores as scores_lib
from attn.models import transformer as tfm
from attn.models import vit as vit_lib
from experiments import plots
from experiments.guide.context import Context, colorbar, heatmap, token_labels
from experiments.guide.runs import Trained


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
  src, out = token_labels(task, inputs[0]), token_labels(task, pred[0])
  # Decoder position t reads BOS + the outputs shifted right and predicts
  # output t: its keys are what it reads, not what it predicts.
  dec_in = ["BOS"] + out[:-1]
  # The first layer of each place, averaged over heads.
  first = {}
  for path, w in weights.items():
    first.setdefault(_place(path), (path, w[0].mean(0)))
  L = int(np.sum(inputs[0] != 0))
  cross = first["cross"][1]
  mirrored = float(np.mean([cross[t, L - 1 - t] for t in range(L)]))
  fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
  for ax, (place, x_lab, y_lab, x_name, y_name, what) in zip(axes, (
      ("encoder_self", src, src, "source position (key)",
       "source position (query)", "encoder self-attention (full)"),
      ("decoder_self", dec_in, out, "decoder input position (key; BOS + "
       "outputs shifted)", "output position (query)",
       "decoder self-attention (causal)"),
      ("cross", src, out, "source position (key)", "output position (query)",
       "cross-attention (decoder → encoder)"))):
    path, w = first[place]
    image = heatmap(ax, w, f"{what}\n{path}, mean of heads", x_lab, y_lab,
                    vmax=1)
    ax.set_xlabel(x_name, fontsize=8)
    ax.set_ylabel(y_name, fontsize=8)
  fig.suptitle(f"{trained.describe()}: {task.decode(inputs[0])} → "
               f"{task.decode(pred[0])}", fontsize=9)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes, image)
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
  labels = token_labels(task, inputs[0, :n])
  letters = np.array([c.isalpha() for c in labels])
  enc = [(p, w[0, :, :n, :n]) for p, w in weights.items()
         if _place(p) == "encoder_self"]
  N = enc[0][1].shape[0]
  facts: Dict[str, Any] = {}
  for l, (path, w_NTS) in enumerate(enc):
    for h in range(N):
      # The key this head attends to most, and its share of all weight.
      share_S = w_NTS[h].sum(0) / n
      top = int(np.argmax(share_S))
      facts[f"top_key[layer{l}/head{h}]"] = (
          f"{top}:{labels[top]}:{share_S[top]:.2f}")
      facts[f"mass_on_letters[layer{l}/head{h}]"] = float(
          share_S[letters].sum())
  facts["path"] = plots.plot_attention_grid(
      np.stack([w for _, w in enc]), ctx.path("heads"), x_labels=labels,
      y_labels=labels, row_names=[p for p, _ in enc],
      title=f"{trained.describe()}: encoder self-attention, every layer "
            f"and head, on {task.decode(inputs[0])!r}")
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
    image = heatmap(ax, w_BNTS[b].mean(0)[:, :n],
                    f"{task.decode(inputs[b])!r} → {task.decode(pred[b])!r}",
                    token_labels(task, inputs[b, :n]),
                    token_labels(task, pred[b]), vmax=1)
    ax.set_xlabel("source position (key)", fontsize=8)
    ax.set_ylabel("output position (query)", fontsize=8)
  fig.suptitle(f"{trained.describe()}: cross-attention ({path}, mean of "
               "heads)", fontsize=9)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes, image)
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
  axes[0].legend(fontsize=7, loc="upper left")
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
  axes[2].legend(fontsize=7, loc="lower right")
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
  fig, axes = plt.subplots(2, count, figsize=(1.8 * count + 1.0, 3.8))
  top = float(sal.max())            # one colour scale for every digit
  for b in range(count):
    image = batch["inputs"][b, ..., 0]
    axes[0, b].imshow(image, cmap="gray_r")
    axes[0, b].set_title(f"label {batch['labels'][b]}, pred {pred[b]}",
                         fontsize=7)
    image_sal = axes[1, b].imshow(np.kron(sal[b], np.ones((p, p))),
                                  cmap="inferno", vmin=0.0, vmax=top)
    axes[1, b].contour(image, levels=[0.5 * float(image.max())],
                       colors="cyan", linewidths=0.8)
    for ax in axes[:, b]:
      ax.axis("off")
  fig.suptitle(f"{trained.describe()}: attention rollout of the class "
               f"token per {p}×{p} patch (one colour scale), digit outlined",
               fontsize=9)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes[1], image_sal, "rollout weight")
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
  axes[0].set(ylim=(0, 1.45), yticks=np.linspace(0, 1, 6),
              title="glimpse network per score function")
  axes[0].legend(fontsize=7, loc="upper center", ncol=2)
  target = int(batch["target_position"][0])
  image = heatmap(axes[1], np.stack(rows), f"glimpse weights on one test "
                  f"example (context {task.key_names[batch['context'][0]]}, "
                  f"target at position {target}, boxed)",
                  token_labels(task, batch["inputs"][0]), None, vmax=1)
  axes[1].set_yticks(range(len(names)), names, fontsize=8)
  axes[1].set_xlabel("input position", fontsize=8)
  axes[1].add_patch(plt.Rectangle((target - 0.5, -0.5), 1, len(names),
                                  fill=False, edgecolor="red", linewidth=1.5))
  axes[0].title.set_fontsize(9)
  fig.set_layout_engine("constrained")  # clear of token axes, bars
  colorbar(fig, axes[1], image)
  facts["path"] = ctx.save(fig, "glimpse")
  return facts
