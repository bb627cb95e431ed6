"""Shared machinery for the built-in tasks: the ``Task`` base class, token
vocabularies, option checks, deterministic randomness and content-based splits.

Every task generates its data from ``(seed, split, i)`` alone (or reads a
package that ships it): example ``i`` of a split's training stream does not
depend on the batch size or the number of hosts, and a run resumed from a
checkpoint sees exactly the batches it would have seen. Nothing here is
downloaded.

Randomness. ``Task.batch(split, step, batch_size)`` is examples
``step * batch_size .. + batch_size - 1`` of the split's stream. The stream
is made in chunks of :data:`TRAIN_CHUNK` examples; chunk ``c`` draws from
``np.random.default_rng([seed, split_id, c])`` with ``split_id`` 0/1/2 for
train/valid/test, and per-example augmentation (``digits_vit``) from
``[seed, 6 + split_id, c]``. The fixed evaluation sets use keys
``[0, 3 + split_id, chunk]`` and therefore do not depend on the seed: runs
with different seeds are scored on the same examples. All keys have exactly
three words: NumPy's ``SeedSequence`` ignores trailing zero words
(``default_rng([s, k, 0])`` equals ``default_rng([s, k])``), so keys of
different lengths could collide.

Splits. Where the example space is large and discrete, an example belongs to
the split chosen by a hash of its content (:func:`content_split`: 80% train,
10% valid, 10% test) and the sampler rejects candidates of the other splits,
so train, valid and test never share an example.

Token ids. Every token vocabulary reserves 0 = PAD, 1 = BOS, 2 = EOS; task
symbols start at id 3 (:class:`Vocabulary`).
"""

from __future__ import annotations

import bisect
import hashlib
import inspect
import numbers
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np

Batch = Dict[str, np.ndarray]

SPLITS = ("train", "valid", "test")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
# Cumulative fractions of the content hash assigned to train / valid / test.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
_SPLIT_EDGES = tuple(int(f * 2**64) for f in np.cumsum(SPLIT_FRACTIONS)[:-1])
# Generated evaluation sets are built in chunks of this many examples, so the
# set for n examples is a prefix of the set for any larger n.
EVAL_CHUNK = 64
# The training streams are generated in chunks of this many examples (example
# i is row i % TRAIN_CHUNK of chunk i // TRAIN_CHUNK), so example i is the
# same whatever batch size asks for it.
TRAIN_CHUNK = 64
_CHUNK_CACHE = 4  # chunks kept per task (consecutive batches share chunks)
# Rejection sampling gives up after this many rounds of proposals.
MAX_REJECTION_ROUNDS = 200
_MAX_WORD = 2**32  # seeds and steps stay single SeedSequence words.


def split_id(split: str) -> int:
  """Index of ``split`` in :data:`SPLITS`; ValueError for unknown names."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
  return SPLITS.index(split)


def batch_rng(seed: int, split: str, step: int) -> np.random.Generator:
  """The generator for training batch ``step`` of ``split``."""
  return np.random.default_rng([seed, split_id(split), step])


def augment_rng(seed: int, split: str, chunk: int) -> np.random.Generator:
  """The generator of per-example augmentation of chunk ``chunk``."""
  return np.random.default_rng([seed, 2 * len(SPLITS) + split_id(split),
                                chunk])


def stream_rows(first: int, count: int, chunk: Callable[[int], Batch],
                cache: Optional[Dict[Any, Batch]] = None,
                key: Any = None) -> Batch:
  """Rows ``first .. first + count - 1`` of a stream made in chunks.

  ``chunk(c)`` returns the :data:`TRAIN_CHUNK` rows of chunk ``c``; ``cache``
  (a dict, keyed ``(key, c)``) keeps the last few chunks. Returns fresh
  arrays (never views into the cache).
  """
  parts = []
  end = first + count
  for c in range(first // TRAIN_CHUNK, -(-end // TRAIN_CHUNK)):
    ck = (key, c)
    data = cache.get(ck) if cache is not None else None
    if data is None:
      data = chunk(c)
      if cache is not None:
        cache[ck] = data
        while len(cache) > _CHUNK_CACHE:
          cache.pop(next(iter(cache)))
    lo = max(first - c * TRAIN_CHUNK, 0)
    hi = min(end - c * TRAIN_CHUNK, TRAIN_CHUNK)
    parts.append({k: v[lo:hi] for k, v in data.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def eval_rng(split: str, chunk: int) -> np.random.Generator:
  """The generator of chunk ``chunk`` of ``split``'s fixed evaluation set
  (seed-free)."""
  return np.random.default_rng([0, len(SPLITS) + split_id(split), chunk])


def check_int(owner: str, name: str, value: Any, minimum: int = 0,
              maximum: Optional[int] = None) -> int:
  """``value`` as an int in ``[minimum, maximum]``, else a ValueError."""
  bad = (isinstance(value, bool) or not isinstance(value, numbers.Integral)
         or value < minimum or (maximum is not None and value > maximum))
  if bad:
    upper = "" if maximum is None else f" and <= {maximum}"
    raise ValueError(f"{owner}: {name}={value!r} must be an integer >= "
                     f"{minimum}{upper}")
  return int(value)


def check_float(owner: str, name: str, value: Any,
                minimum: float = 0.0) -> float:
  """``value`` as a finite float >= ``minimum``, else a ValueError."""
  bad = (isinstance(value, bool) or not isinstance(value, numbers.Real)
         or not np.isfinite(value) or value < minimum)
  if bad:
    raise ValueError(f"{owner}: {name}={value!r} must be a finite number >= "
                     f"{minimum}")
  return float(value)


def sequence_split(seq: Sequence[int]) -> int:
  """Split index (0 train, 1 valid, 2 test) of one unpadded integer sequence:
  a BLAKE2b hash of its int64 bytes (not Python's salted ``hash``) mapped to
  :data:`SPLIT_FRACTIONS`."""
  data = np.asarray(seq, dtype=np.int64).tobytes()
  digest = hashlib.blake2b(data, digest_size=8).digest()
  return bisect.bisect_right(_SPLIT_EDGES, int.from_bytes(digest, "little"))


def content_split(rows: np.ndarray) -> np.ndarray:
  """:func:`sequence_split` of each row of ``rows`` (int ``[N, L]``).

  Trailing zeros (padding) are ignored, so an example keeps its split when
  the padded width changes. Returns int64 ``[N]`` with values in {0, 1, 2}.
  """
  rows = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
  lengths = rows.shape[1] - np.argmax(rows[:, ::-1] != 0, axis=1)
  lengths[(rows == 0).all(axis=1)] = 0
  return np.array([sequence_split(row[:n]) for row, n in zip(rows, lengths)],
                  dtype=np.int64)


def sample_in_split(rng: np.random.Generator, split: str, n: int,
                    propose: Callable[[np.random.Generator, int],
                                      tuple[Batch, np.ndarray]],
                    owner: str) -> Batch:
  """``n`` examples of ``split`` by rejection on :func:`content_split`.

  Args:
    rng: the random stream (consumed deterministically).
    split: one of :data:`SPLITS`.
    n: number of examples wanted.
    propose: ``propose(rng, m) -> (batch, content)`` draws ``m`` candidates;
      ``batch`` maps names to arrays with leading dim ``m`` and ``content``
      ``[m, L]`` is the integer content that decides the split.
    owner: task name for the error message.

  Returns:
    ``batch`` with leading dimension ``n``, all examples in ``split``.
  """
  want = split_id(split)
  fraction = SPLIT_FRACTIONS[want]
  kept: list[Batch] = []
  have = 0
  for _ in range(MAX_REJECTION_ROUNDS):
    if have >= n:
      break
    m = int(np.ceil((n - have) / fraction * 1.25)) + 4
    batch, content = propose(rng, m)
    keep = content_split(content) == want
    kept.append({k: v[keep] for k, v in batch.items()})
    have += int(keep.sum())
  if have < n:
    raise ValueError(f"{owner}: could not draw {n} examples of split "
                     f"{split!r}; the example space is too small for "
                     f"disjoint splits (enlarge the length or vocabulary)")
  return {k: np.concatenate([b[k] for b in kept])[:n] for k in kept[0]}


def epoch_indices(seed: int, split: str, step: int, batch_size: int,
                  size: int) -> np.ndarray:
  """Indices into a finite split of ``size`` examples for training ``step``.

  Example ``step * batch_size + j`` of the stream is element ``(.) % size`` of
  the permutation of epoch ``(.) // size``; each epoch is a fresh permutation
  drawn from ``[seed, split_id, epoch]``. Every example is seen once per epoch.
  """
  flat = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(flat, size)
  out = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, split_id(split), int(epoch)]
                                 ).permutation(size)
    sel = epochs == epoch
    out[sel] = perm[offsets[sel]]
  return out


def pad_rows(rows: Sequence[Sequence[int]], width: int, owner: str
             ) -> np.ndarray:
  """int32 ``[len(rows), width]``, each row left-aligned and padded with 0."""
  out = np.zeros((len(rows), width), dtype=np.int32)
  for i, row in enumerate(rows):
    if len(row) > width:
      raise ValueError(f"{owner}: sequence of length {len(row)} does not fit "
                       f"the padded width {width}")
    out[i, :len(row)] = row
  return out


class Vocabulary:
  """Token ids: 0 PAD, 1 BOS, 2 EOS, then ``symbols[i]`` -> ``i + 3``.

  ``separator=""`` makes a character vocabulary (``encode`` iterates the
  characters of a string); any other separator makes a symbol vocabulary
  (``encode`` splits the string on whitespace and ``decode`` joins with the
  separator).
  """

  def __init__(self, symbols: Sequence[str], separator: str = " "):
    if len(set(symbols)) != len(symbols):
      raise ValueError(f"duplicate symbols in vocabulary: {list(symbols)}")
    self.symbols = tuple(symbols)
    self.separator = separator
    self._ids = {s: i + NUM_SPECIAL for i, s in enumerate(self.symbols)}
    self._names = ("<pad>", "<bos>", "<eos>") + self.symbols

  @property
  def size(self) -> int:
    """Number of ids, specials included."""
    return len(self._names)

  def encode(self, text: str) -> np.ndarray:
    """int32 ``[L]`` ids of ``text``; ValueError naming unknown symbols."""
    pieces = list(text) if self.separator == "" else text.split()
    unknown = sorted({p for p in pieces if p not in self._ids})
    if unknown:
      raise ValueError(f"symbols {unknown} are not in the vocabulary "
                       f"{list(self.symbols)}")
    return np.array([self._ids[p] for p in pieces], dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Readable string of ``ids``: PAD dropped, BOS/EOS shown as tags."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise ValueError(f"token ids must lie in [0, {self.size}), got "
                       f"min {ids.min()} max {ids.max()}")
    return self.separator.join(self._names[i] for i in ids if i != PAD_ID)


def symbol_names(count: int, alphabet: str, prefix: str) -> list[str]:
  """``count`` printable names: one character each if ``alphabet`` is long
  enough, else ``prefix0 .. prefix{count-1}``."""
  if count <= len(alphabet):
    return list(alphabet[:count])
  return [f"{prefix}{i}" for i in range(count)]


class Task:
  """A built-in task: a deterministic source of batches.

  Subclasses set ``name`` and ``kind`` (a key of
  :data:`experiments.problems.PROBLEMS`, which says what is learned from the
  examples: model, loss, metrics, pictures), take their options as keyword
  parameters of ``__init__(self, seed=0, *, <options>)`` and implement
  :meth:`_sample` (``n`` examples of a split from a generator) and
  :meth:`spec`. Tasks over a finite data set override :meth:`_batch` and
  :meth:`_eval_set` instead.
  """

  name: str = ""
  kind: str = ""

  def __init__(self, seed: int = 0):
    self.seed = check_int(self.name, "seed", seed, 0, _MAX_WORD - 1)
    self._eval_cache: Dict[tuple[str, int], Batch] = {}
    self._chunk_cache: Dict[Any, Batch] = {}

  @classmethod
  def options(cls) -> Dict[str, Any]:
    """Option names and defaults (the keyword parameters of ``__init__``)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items()
            if k != "self" and p.kind is not p.VAR_KEYWORD}

  def batch(self, split: str, step: int, batch_size: int) -> Batch:
    """Training/validation batch ``step`` of ``split`` (leading dim
    ``batch_size``); the same arguments always give identical arrays."""
    split_id(split)
    step = check_int(self.name, "step", step, 0, _MAX_WORD - 1)
    batch_size = check_int(self.name, "batch_size", batch_size, 1)
    return self._batch(split, step, batch_size)

  def _batch(self, split: str, step: int, batch_size: int) -> Batch:
    return stream_rows(
        step * batch_size, batch_size,
        lambda c: self._sample(batch_rng(self.seed, split, c), split,
                               TRAIN_CHUNK),
        self._chunk_cache, split)

  def eval_batches(self, split: str, batch_size: int,
                   num_examples: int) -> Iterator[Batch]:
    """The fixed evaluation set of ``split`` in batches of ``batch_size``.

    Yields the first ``num_examples`` examples of the split's evaluation
    sequence (capped at the split's size for finite data sets); the last
    batch is smaller when ``batch_size`` does not divide the count. The
    examples depend on neither ``batch_size`` nor the seed, and a smaller
    ``num_examples`` gives a prefix of a larger one. Arguments are checked
    and the set is built when called; the set is cached on the task and
    read-only.
    """
    split_id(split)
    batch_size = check_int(self.name, "batch_size", batch_size, 1)
    num_examples = check_int(self.name, "num_examples", num_examples, 1)
    key = (split, num_examples)
    if key not in self._eval_cache:  # generated once, reused at every eval
      data = self._eval_set(split, num_examples)
      for array in data.values():
        array.flags.writeable = False  # the cache must not be edited
      self._eval_cache[key] = data
    data = self._eval_cache[key]
    total = len(next(iter(data.values())))
    return ({k: v[start:start + batch_size] for k, v in data.items()}
            for start in range(0, total, batch_size))

  def _eval_set(self, split: str, num_examples: int) -> Batch:
    chunks = [self._sample(eval_rng(split, c), split, EVAL_CHUNK)
              for c in range(-(-num_examples // EVAL_CHUNK))]
    return {k: np.concatenate([c[k] for c in chunks])[:num_examples]
            for k in chunks[0]}

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    raise NotImplementedError(f"{type(self).__name__} must implement _sample")

  def spec(self) -> Dict[str, Any]:
    """Static shapes and vocabulary facts the model builder needs."""
    raise NotImplementedError(f"{type(self).__name__} must implement spec")

  def decode(self, ids: Sequence[int]) -> str:
    """Human-readable rendering of token ids (token tasks only)."""
    raise ValueError(f"task {self.name!r} ({self.kind}) has no token "
                     f"vocabulary to decode")

  def __repr__(self) -> str:
    opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options()
                     if hasattr(self, k))
    return f"{type(self).__name__}({opts})"

