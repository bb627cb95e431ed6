r"""Samples text from a trained language-model run.

    python -m experiments.sample --workdir=runs/text_lm --prompt="Two plus" \
        --max_new_tokens=64 --temperature=0.8 --top_k=10 --seed=0

Works for any run whose task is a language model (kind ``lm``: ``text_lm``,
``associative_recall``). It reads what the run recorded: the config in
``workdir/config.json`` (:mod:`experiments.provenance`) and the BEST
checkpoint (:func:`experiments.checkpoints.restore_best`), rebuilds the
model with the code training used (:func:`experiments.problems.make_problem`,
:func:`experiments.config_validation.make_task`,
:func:`experiments.train.init_state`), samples, and prints each sample
(prompt + continuation) decoded with the task's own vocabulary on stdout;
what was sampled from goes to stderr.

Sampling (:func:`sample_tokens`): ``temperature=0`` is greedy, otherwise
``softmax(logits / temperature)`` over the ``top_k`` most likely tokens, with
the PRNG key ``jax.random.key(seed)`` (token ``i`` uses ``fold_in(key, i)``),
so the same seed gives the same sample, through :func:`attn.models.generate`:
attention variants that can decode with a KV cache (registry ``decode``
support) use it; the others recompute the whole prefix at every step,
which is exact and fine for short samples.

Without ``--prompt`` the prompt is the start of the first test example (for
``associative_recall``, everything up to the query key, so the one new token
is the model's answer). A workdir that is not an LM run, has no recorded
config or no best checkpoint, and a prompt with symbols outside the
vocabulary, give one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import checkpoints
from experiments import config_validation
from experiments import data as tasks_lib
from experiments import metrics_io
from experiments import problems
from experiments import provenance
from experiments import train

logging = metrics_io.get_logger()


class SampleError(Exception):
  """Why a run cannot be sampled from; the message is one line."""


@dataclasses.dataclass
class Run:
  """A trained LM run, rebuilt: what :func:`sample_tokens` needs."""
  workdir: str
  config: ml_collections.ConfigDict
  task: Any              # experiments.data.Task (kind "lm")
  model: Any             # attn.models.TransformerLM
  params: Any
  step: int              # the best checkpoint's step
  best_metric: str

  @property
  def max_len(self) -> int:
    """The model's context: prompt + new tokens must fit in it."""
    return self.model.config.max_len

  @property
  def uses_cache(self) -> bool:
    return problems.can_decode(self.config.model.attention)


def lm_task_names() -> list[str]:
  return sorted(n for n, cls in tasks_lib.TASKS.items() if cls.kind == "lm")


def load_run(workdir: str) -> Run:
  """The run in ``workdir``: its recorded config and its BEST checkpoint.

  Raises:
    SampleError: no ``config.json``, not a language-model run, an invalid
      config, no best checkpoint, or one that does not fit the model.
  """
  try:
    raw = provenance.read_config(workdir) if os.path.isdir(workdir) else None
  except ValueError as e:  # a damaged config.json (ConfigError)
    raise SampleError(str(e)) from e
  if raw is None:
    raise SampleError(
        f"{workdir} has no recorded config ({provenance.config_path(workdir)}"
        " is missing): not a run directory of python -m experiments.main")
  name = raw.get("task", {}).get("name")
  cls = tasks_lib.TASKS.get(name)
  if cls is None or cls.kind != "lm":
    kind = f", kind {cls.kind!r}" if cls is not None else ""
    raise SampleError(
        f"{workdir} is a run of task {name!r}{kind}, not a language model; "
        f"sampling needs a run of an lm task ({', '.join(lm_task_names())})")
  config = ml_collections.ConfigDict(raw)
  try:
    config_validation.validate(config)
    task = config_validation.make_task(config)
  except ValueError as e:  # ConfigError is a ValueError
    raise SampleError(f"cannot rebuild the run recorded in "
                      f"{provenance.config_path(workdir)}: {e}") from e
  if not os.path.isdir(checkpoints.best_dir(workdir)):
    raise SampleError(f"{workdir} has no best checkpoint (no "
                      f"{checkpoints.best_dir(workdir)}): the run has not "
                      "been evaluated yet")
  problem = problems.make_problem(config, task)
  example = {k: v[:1] for k, v in task.batch("train", 0, 1).items()}
  # Shapes only: nothing is initialised or compiled to build the target.
  target = jax.eval_shape(lambda: train.init_state(
      config, problem.init(jax.random.key(0), example)))
  try:
    step, state = checkpoints.restore_best(
        workdir, target, best_metric=problem.best_metric,
        best_mode=problem.best_mode)
  except checkpoints.CheckpointError as e:
    raise SampleError(str(e)) from e
  if step is None:
    raise SampleError(f"{workdir} has no best checkpoint (nothing in "
                      f"{checkpoints.best_dir(workdir)}): the run has not "
                      "been evaluated yet")
  return Run(workdir, config, task, problem.model, state["params"], int(step),
             problem.best_metric)


def default_prompt(task) -> np.ndarray:
  """The start of the first test example, int32 ``[P]``.

  Everything before the first token whose prediction counts (``loss_mask``),
  and that token, but at least ``min(16, length // 2)`` tokens: for
  ``associative_recall`` the pairs and the query key (the answer is the
  next token), for ``text_lm`` the first 16 characters.
  """
  batch = next(iter(task.eval_batches("test", 1, 1)))
  inputs, mask = np.asarray(batch["inputs"][0]), np.asarray(
      batch["loss_mask"][0])
  first = int(np.argmax(mask > 0)) if np.any(mask > 0) else 0
  length = max(first + 1, min(16, len(inputs) // 2))
  return inputs[:length].astype(np.int32)


def encode_prompt(task, text: str) -> np.ndarray:
  """``text`` as the task's token ids (``task.encode``); SampleError for an
  empty prompt or symbols outside the vocabulary."""
  try:
    ids = np.asarray(task.encode(text), np.int32).reshape(-1)
  except ValueError as e:
    raise SampleError(f"--prompt={text!r}: {e}") from e
  if ids.size == 0:
    raise SampleError("--prompt is empty; give at least one token")
  return ids


def check_arguments(prompt_length: int, max_new_tokens: int, max_len: int,
                    vocab_size: int, temperature: float,
                    top_k: Optional[int]) -> None:
  """SampleError for lengths, temperature or top_k no sample can have."""
  if max_new_tokens < 1:
    raise SampleError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  if prompt_length + max_new_tokens > max_len:
    raise SampleError(
        f"the prompt ({prompt_length} tokens) + max_new_tokens "
        f"({max_new_tokens}) exceeds the model's context of {max_len} "
        f"tokens; use --max_new_tokens<={max_len - prompt_length} or a "
        "shorter prompt")
  if not temperature >= 0:
    raise SampleError(f"--temperature={temperature} must be >= 0 "
                      "(0 = greedy)")
  if top_k is not None and not 1 <= top_k <= vocab_size:
    raise SampleError(f"--top_k={top_k} must be in [1, {vocab_size}] "
                      "(the vocabulary size)")


def sample_tokens(run: Run, prompt, max_new_tokens: int, *,
                  temperature: float = 0.8, top_k: Optional[int] = None,
                  seed: int = 0, num_samples: int = 1,
                  use_cache: Optional[bool] = None) -> np.ndarray:
  """``num_samples`` continuations of ``prompt`` (int ``[P]``), int32
  ``[num_samples, P + max_new_tokens]`` (the prompt included).

  ``use_cache``: the KV-cache path (default: when the attention variant can
  decode) or the full-prefix one.
  """
  prompt = np.asarray(prompt, np.int32).reshape(-1)
  check_arguments(len(prompt), max_new_tokens, run.max_len,
                  run.model.config.vocab_size, temperature, top_k)
  if num_samples < 1:
    raise SampleError(f"--num_samples={num_samples} must be >= 1")
  batch = jnp.asarray(np.tile(prompt[None], (num_samples, 1)))
  rng = jax.random.key(seed)
  out = run.model.generate(run.params, batch, max_new_tokens, rng,
                           temperature=temperature, top_k=top_k,
                           use_cache=run.uses_cache if use_cache is None
                           else use_cache)
  return np.asarray(out)


def sample(workdir: str, prompt: Optional[str] = None,
           max_new_tokens: Optional[int] = None, *, temperature: float = 0.8,
           top_k: Optional[int] = None, seed: int = 0, num_samples: int = 1,
           run: Optional[Run] = None) -> list[str]:
  """The decoded samples (prompt + continuation) of the run in ``workdir``.

  ``prompt=None``: :func:`default_prompt`; ``max_new_tokens=None``: fill the
  model's context. Raises :class:`SampleError` (one line).
  """
  run = load_run(workdir) if run is None else run
  ids = (default_prompt(run.task) if prompt is None
         else encode_prompt(run.task, prompt))
  if max_new_tokens is None:
    if len(ids) >= run.max_len:
      raise SampleError(f"the prompt ({len(ids)} tokens) leaves no room in "
                        f"the model's context of {run.max_len} tokens; use "
                        "a shorter prompt")
    max_new_tokens = run.max_len - len(ids)
  check_arguments(len(ids), max_new_tokens, run.max_len,
                  run.model.config.vocab_size, temperature, top_k)
  if num_samples < 1:
    raise SampleError(f"--num_samples={num_samples} must be >= 1")
  logging.info(
      "sampling from the BEST checkpoint (step %d, by valid %s) of %s: "
      "%d prompt tokens + %d new, temperature %g, top_k %s, seed %d, %s",
      run.step, run.best_metric, workdir, len(ids), max_new_tokens,
      temperature, top_k or "all", seed,
      "KV cache" if run.uses_cache else "full prefix per token")
  tokens = sample_tokens(run, ids, max_new_tokens, temperature=temperature,
                         top_k=top_k, seed=seed, num_samples=num_samples)
  return [run.task.decode(row) for row in tokens]


def main(argv, flags_values=None):
  """The command line (``absl``); see the module docstring."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags_values or _FLAGS
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not f.workdir:
    sys.exit("error: --workdir is required (the run directory to sample "
             "from)")
  try:
    texts = sample(f.workdir, f.prompt, f.max_new_tokens,
                   temperature=f.temperature, top_k=f.top_k or None,
                   seed=f.seed, num_samples=f.num_samples)
  except SampleError as e:
    sys.exit(f"error: {metrics_io.one_line(e)}")
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f"--- sample {i} ---")
    print(text)


_FLAGS = None


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Run directory of a language-model "
                      "run (text_lm, associative_recall).")
  flags.DEFINE_string("prompt", None, "Text to continue, in the task's "
                      "vocabulary (symbols separated by spaces for "
                      "associative_recall). Default: the start of the first "
                      "test example.")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to add. Default: up "
                       "to the model's context (the task's length).")
  flags.DEFINE_float("temperature", 0.8, "0 = greedy; otherwise sample from "
                     "softmax(logits / temperature).")
  flags.DEFINE_integer("top_k", None, "Sample among the top_k most likely "
                       "tokens (default or 0: all).")
  flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same "
                       "sample.")
  flags.DEFINE_integer("num_samples", 1, "How many samples (one batch).")
  return flags.FLAGS


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _FLAGS = _define_flags()
  _app.run(main)
