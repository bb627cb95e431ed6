"""ListOps (Nangia & Bowman 2018) as specified by Long Range Arena.

Follows google-research/long-range-arena:

* generator ``lra_benchmarks/data/listops.py``: operators ``[MIN``, ``[MAX``,
  ``[MED``, ``[SM`` (sum modulo 10), values 0-9, closing ``]``; a node at
  depth < ``max_depth`` is an operator with probability ``VALUE_P`` = 0.25
  (else a value), an operator takes ``randint(2, max_args)`` arguments, the
  root is at depth 1, and a tree is kept when
  ``min_length < length < max_length`` (length = number of tokens). ``[MED``
  is ``int(np.median(args))``. Defaults there: max_depth 10, max_args 10,
  max_length 2000, min_length 500 (:data:`LRA_OPTIONS`).
* TSV files: header ``Source<TAB>Target``, ``Source`` written by LRA's
  ``to_string``: every operator application is a nest of parentheses,
  ``[MAX 2 9 ]`` is written ``( ( ( [MAX 2 ) 9 ) ] )``.
* input pipeline ``lra_benchmarks/listops/input_pipeline.py`` (the version
  with ``rename_close_brackets``): parentheses are deleted, the rest is split
  on whitespace, so the tokens are the 4 operators, ``]`` (renamed ``X``
  there only because its tokenizer drops non-alphanumerics) and the 10
  digits; sequences are truncated to ``max_length`` and padded with 0.

Differences, none of which changes the distribution of examples: our ids are
a fixed order (LRA's come from iterating a Python set, so they change between
processes); ids 1 and 2 are reserved (BOS/EOS, unused here); a draw is
abandoned as soon as it is certain to be rejected; and examples are assigned
to train/valid/test by a hash of their first 16 tokens (LRA de-duplicates one
pool and slices it), so the splits never share an expression.
"""

from __future__ import annotations

import csv
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments.data.base import (PAD_ID, Batch, Task, Vocabulary,
                                    check_int, epoch_indices, pad_rows,
                                    sequence_split, split_id)

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
DIGITS = tuple("0123456789")
VALUE_P = 0.25
VOCAB = Vocabulary(OPERATORS + (END,) + DIGITS)
LRA_OPTIONS = {"max_depth": 10, "max_args": 10, "max_length": 2000,
               "min_length": 500}
# LRA's file names: <data_dir>/basic_{train,val,test}.tsv.
LRA_FILES = {"train": "basic_train.tsv", "valid": "basic_val.tsv",
             "test": "basic_test.tsv"}
_MAX_ATTEMPTS_PER_EXAMPLE = 100_000
# An example's split is decided by a hash of its first SPLIT_PREFIX tokens, so
# a draw of the wrong split is abandoned early; no test expression shares its
# first 16 tokens with any training expression.
SPLIT_PREFIX = 16
_OP_IDS = tuple(int(VOCAB.encode(op)[0]) for op in OPERATORS)
_END_ID = int(VOCAB.encode(END)[0])
_DIGIT_IDS = tuple(int(i) for i in VOCAB.encode(" ".join(DIGITS)))
_OP_BY_ID = dict(zip(_OP_IDS, OPERATORS))
_VALUE_BY_ID = {i: value for value, i in enumerate(_DIGIT_IDS)}


def apply_operator(op: str, args: Sequence[int]) -> int:
  """Value of ``op`` (one of :data:`OPERATORS`) on digit arguments."""
  if op == MIN:
    return min(args)
  if op == MAX:
    return max(args)
  if op == MED:  # int(np.median(args)): the mean of the middle pair, floored
    ordered = sorted(args)
    half = len(ordered) // 2
    if len(ordered) % 2:
      return ordered[half]
    return (ordered[half - 1] + ordered[half]) // 2
  if op == SUM_MOD:
    return int(sum(args)) % 10
  raise ValueError(f"unknown ListOps operator {op!r}; known: {OPERATORS}")


def example_split(ids: Sequence[int]) -> int:
  """Split index (0 train, 1 valid, 2 test) of a generated example: a hash
  of its first :data:`SPLIT_PREFIX` token ids."""
  return sequence_split(ids[:SPLIT_PREFIX])


def _value_of(ids: Sequence[int]) -> int:
  """Value of a complete expression given as token ids (stack evaluation)."""
  stack: List[List[int]] = [[]]
  ops: List[str] = []
  for i in ids:
    if i == _END_ID:
      args = stack.pop()
      stack[-1].append(apply_operator(ops.pop(), args))
    elif i in _OP_BY_ID:
      ops.append(_OP_BY_ID[i])
      stack.append([])
    else:
      stack[-1].append(_VALUE_BY_ID[i])
  (value,) = stack[0]
  return value


class _TreeSampler:
  """LRA's ``generate_tree`` plus its length filter, producing token ids.

  The tree is drawn depth first with an explicit stack (the random draws are
  those of the recursive definition, in the same order). A draw is
  abandoned as soon as it is known to be rejected: when it reaches
  ``max_length - 1`` tokens, or when its first :data:`SPLIT_PREFIX` tokens
  hash to another split. The accepted trees are the ones full generation
  followed by both checks would accept, drawn with the same probabilities;
  only an accepted tree's value is computed.
  """

  def __init__(self, rand: random.Random, max_depth: int, max_args: int,
               min_length: int, max_length: int, split: Optional[int]):
    self.rand = rand
    self.max_depth, self.max_args = max_depth, max_args
    self.min_length, self.max_length = min_length, max_length
    self.split = split

  def sample(self) -> Tuple[List[int], int]:
    """One accepted ``(token_ids, value)``."""
    for _ in range(_MAX_ATTEMPTS_PER_EXAMPLE):
      ids = self._draw()
      if ids is not None:
        return ids, _value_of(ids)
    raise ValueError(f"listops: no tree with {self.min_length} < length < "
                     f"{self.max_length} in {_MAX_ATTEMPTS_PER_EXAMPLE} "
                     f"attempts (max_depth={self.max_depth}, "
                     f"max_args={self.max_args})")

  def _wrong_split(self, ids: List[int]) -> bool:
    return self.split is not None and example_split(ids) != self.split

  def _draw(self) -> Optional[List[int]]:
    """One tree's token ids, or None once it is certain to be rejected."""
    rand = self.rand.random
    limit, max_depth, spread = (self.max_length - 1, self.max_depth,
                                self.max_args - 1)
    num_ops = len(OPERATORS)
    ids: List[int] = []
    append = ids.append
    open_args: List[int] = []   # arguments still to draw, per open operator
    checked, depth = False, 1   # depth = len(open_args) + 1
    while True:                 # enter a node at ``depth``
      if len(ids) >= limit:
        return None
      if not checked and len(ids) >= SPLIT_PREFIX:
        if self._wrong_split(ids):
          return None
        checked = True
      if depth < max_depth and rand() <= VALUE_P:
        num_args = 2 + int(rand() * spread)        # randint(2, max_args)
        append(_OP_IDS[int(rand() * num_ops)])
        open_args.append(num_args)
        depth += 1
        continue
      append(_DIGIT_IDS[int(rand() * 10)])
      while depth > 1:          # close every operator this value completes
        open_args[-1] -= 1
        if open_args[-1]:
          break
        open_args.pop()
        append(_END_ID)
        depth -= 1
      else:
        break
    if not self.min_length < len(ids) < self.max_length:
      return None
    if not checked and self._wrong_split(ids):
      return None
    return ids


def generate_expression(rand: random.Random, max_depth: int, max_args: int,
                        min_length: int, max_length: int,
                        split: Optional[int] = None) -> Tuple[List[int], int]:
  """One LRA ListOps example: ``(token_ids, value)`` with
  ``min_length < len(token_ids) < max_length`` (ids of :data:`VOCAB`).

  With ``split`` (0/1/2) only examples of that split are returned
  (:func:`example_split`).
  """
  return _TreeSampler(rand, max_depth, max_args, min_length, max_length,
                      split).sample()


def max_tree_length(max_depth: int, max_args: int) -> int:
  """Longest expression the generator can produce."""
  length = 1
  for _ in range(max_depth - 1):
    length = 2 + max_args * length
  return length


def to_lra_string(tokens: Sequence[str]) -> str:
  """LRA's parenthesised ``Source`` text for a token sequence.

  ``["[MAX", "2", "9", "]"]`` -> ``"( ( ( [MAX 2 ) 9 ) ] )"``.
  """
  open_ops: List[str] = []
  done: Optional[str] = None
  for tok in tokens:
    if tok in OPERATORS:
      open_ops.append(tok)
      continue
    if tok == END:
      if not open_ops:
        raise ValueError("listops: ']' without an open operator")
      tok = "( " + open_ops.pop() + " ] )"
    elif tok not in DIGITS:
      raise ValueError(f"listops: unknown token {tok!r}")
    if open_ops:
      open_ops[-1] = "( " + open_ops[-1] + " " + tok + " )"
    elif done is None:
      done = tok
    else:
      raise ValueError("listops: tokens continue after a complete expression")
  if open_ops or done is None:
    raise ValueError("listops: incomplete expression")
  return done


def lra_tokens(source: str) -> List[str]:
  """Tokens of an LRA ``Source`` string: parentheses dropped, whitespace
  split (LRA's input pipeline)."""
  return source.replace("(", " ").replace(")", " ").split()


def read_lra_tsv(path: str) -> Tuple[List[str], np.ndarray]:
  """Reads an LRA-format ListOps TSV file.

  Args:
    path: file with the header line ``Source<TAB>Target`` and one example
      per line (as LRA's ``basic_train.tsv``, ``basic_val.tsv``,
      ``basic_test.tsv``).

  Returns:
    ``(sources, targets)``: the ``Source`` strings as written, and int32
    ``[N]`` targets (each in 0..9).
  """
  sources: List[str] = []
  targets: List[int] = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    if header != ["Source", "Target"]:
      raise ValueError(f"{path}: expected the header 'Source<TAB>Target', got "
                       f"{header!r}")
    for line, row in enumerate(reader, start=2):
      if len(row) != 2 or not row[1].strip().isdigit():
        raise ValueError(f"{path}:{line}: expected 'source<TAB>digit', got "
                         f"{row!r}")
      target = int(row[1])
      if target > 9:
        raise ValueError(f"{path}:{line}: target {target} is not in 0..9")
      sources.append(row[0])
      targets.append(target)
  return sources, np.array(targets, dtype=np.int32)


def write_lra_tsv(path: str, sources: Sequence[str],
                  targets: Sequence[int]) -> None:
  """Writes examples in LRA's TSV format (the inverse of
  :func:`read_lra_tsv`), e.g. to export generated data."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(["Source", "Target"])
    writer.writerows(zip(sources, (int(t) for t in targets)))


class ListOps(Task):
  """Classify a ListOps expression by its value (0-9).

  Batches: ``inputs`` int32 ``[B, max_length]`` token ids padded with 0,
  ``labels`` int32 ``[B]``. Generated by default; with ``data_dir`` the
  examples come from LRA's ``basic_{train,val,test}.tsv`` in that directory
  (training batches walk seeded per-epoch permutations of the file,
  evaluation uses the file order; sequences are truncated to ``max_length``
  as in LRA).

  Options:
    max_depth, max_args, max_length, min_length: LRA's generator options
      (its published values are :data:`LRA_OPTIONS`); the defaults here are
      CPU-sized (lengths 129-511). With ``data_dir`` only ``max_length``
      (truncation and padded width) applies.
    data_dir: directory of LRA TSV files, or None to generate.
  """

  name = "listops"
  kind = "classification"

  def __init__(self, seed: int = 0, *, max_depth: int = 10, max_args: int = 10,
               max_length: int = 512, min_length: int = 128,
               data_dir: Optional[str] = None):
    super().__init__(seed)
    self.max_depth = check_int(self.name, "max_depth", max_depth, 1)
    self.max_args = check_int(self.name, "max_args", max_args, 2)
    self.max_length = check_int(self.name, "max_length", max_length, 2)
    self.min_length = check_int(self.name, "min_length", min_length, 0)
    self.data_dir = data_dir
    if data_dir is None:
      check_int(self.name, "min_length", min_length, 0, self.max_length - 2)
      longest = max_tree_length(self.max_depth, self.max_args)
      if longest <= self.min_length:
        raise ValueError(f"listops: min_length={self.min_length} is not "
                         f"reachable: max_depth={self.max_depth} and "
                         f"max_args={self.max_args} give at most {longest} "
                         f"tokens")
    else:
      for file in LRA_FILES.values():
        if not os.path.isfile(os.path.join(data_dir, file)):
          raise ValueError(f"listops: data_dir={data_dir!r} has no {file} "
                           f"(expected {sorted(LRA_FILES.values())})")
    self._files: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    rand = random.Random(int(rng.integers(2**63)))
    rows, labels = [], []
    for _ in range(n):
      ids, value = generate_expression(rand, self.max_depth, self.max_args,
                                       self.min_length, self.max_length,
                                       split_id(split))
      rows.append(ids)
      labels.append(value)
    return {"inputs": pad_rows(rows, self.max_length, self.name),
            "labels": np.array(labels, dtype=np.int32)}

  def _file(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids (uint8 ``[N, max_length]``) and labels of a TSV split."""
    if split not in self._files:
      path = os.path.join(self.data_dir, LRA_FILES[split])
      sources, labels = read_lra_tsv(path)
      if not sources:
        raise ValueError(f"listops: {path} has no examples")
      ids = np.zeros((len(sources), self.max_length), dtype=np.uint8)
      for i, source in enumerate(sources):
        try:
          row = VOCAB.encode(" ".join(lra_tokens(source)))[:self.max_length]
        except ValueError as e:
          raise ValueError(f"listops: {path}:{i + 2}: {e}") from e
        ids[i, :len(row)] = row
      self._files[split] = (ids, labels)
    return self._files[split]

  def _batch(self, split: str, step: int, batch_size: int) -> Batch:
    if self.data_dir is None:
      return super()._batch(split, step, batch_size)
    ids, labels = self._file(split)
    idx = epoch_indices(self.seed, split, step, batch_size, len(labels))
    return {"inputs": ids[idx].astype(np.int32), "labels": labels[idx]}

  def _eval_set(self, split: str, num_examples: int) -> Batch:
    if self.data_dir is None:
      return super()._eval_set(split, num_examples)
    ids, labels = self._file(split)
    return {"inputs": ids[:num_examples].astype(np.int32),
            "labels": labels[:num_examples]}

  def spec(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": self.kind, "vocab_size": VOCAB.size,
            "input_length": self.max_length, "num_classes": 10,
            "pad_id": PAD_ID}

  def decode(self, ids: Sequence[int]) -> str:
    return VOCAB.decode(ids)
