"""Algorithmic sequence tasks: ``reverse``, ``copy``, ``sort`` (seq2seq) and
``associative_recall`` (language modelling).

Seq2seq batches: ``inputs`` int32 ``[B, length]`` (symbols, padded with 0 for
shorter sequences) and ``targets`` int32 ``[B, length + 1]``: the transformed
sequence followed by EOS (id 2), padded with 0, without BOS (the trainer
shifts right with ``bos_id`` 1). Train/valid/test are disjoint by a hash of
the input sequence.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from experiments.data.base import (BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, Batch,
                                    Task, Vocabulary, check_int,
                                    sample_in_split, symbol_names)

_ALPHANUMERIC = "0123456789abcdefghijklmnopqrstuvwxyz"


class _Transduction(Task):
  """Map a random symbol sequence to a function of it (subclasses pick it).

  Options:
    length: maximum (and default) input length.
    vocab_size: number of symbols, specials excluded.
    min_length: shortest input; None means every input has ``length``
      symbols, otherwise lengths are uniform in ``[min_length, length]``.
  """

  kind = "seq2seq"

  def __init__(self, seed: int = 0, *, length: int = 16, vocab_size: int = 10,
               min_length: Optional[int] = None):
    super().__init__(seed)
    self.length = check_int(self.name, "length", length, 1)
    self.vocab_size = check_int(self.name, "vocab_size", vocab_size, 1)
    self.min_length = (self.length if min_length is None else
                       check_int(self.name, "min_length", min_length, 1,
                                 self.length))
    self.vocab = Vocabulary(symbol_names(self.vocab_size, _ALPHANUMERIC, "s"))

  def transform(self, seq_L: np.ndarray) -> np.ndarray:
    """The target symbols for one unpadded input sequence."""
    raise NotImplementedError

  def _propose(self, rng: np.random.Generator, m: int):
    lengths_B = rng.integers(self.min_length, self.length + 1, size=m)
    symbols_BL = rng.integers(NUM_SPECIAL, NUM_SPECIAL + self.vocab_size,
                              size=(m, self.length))
    inputs_BL = np.where(np.arange(self.length) < lengths_B[:, None],
                         symbols_BL, PAD_ID).astype(np.int32)
    targets_BT = np.zeros((m, self.length + 1), dtype=np.int32)
    for i, n in enumerate(lengths_B):
      targets_BT[i, :n] = self.transform(inputs_BL[i, :n])
      targets_BT[i, n] = EOS_ID
    return {"inputs": inputs_BL, "targets": targets_BT}, inputs_BL

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    return sample_in_split(rng, split, n, self._propose, self.name)

  def spec(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": self.kind,
            "vocab_size": self.vocab.size, "input_length": self.length,
            "target_length": self.length + 1, "pad_id": PAD_ID,
            "bos_id": BOS_ID, "eos_id": EOS_ID}

  def decode(self, ids: Sequence[int]) -> str:
    return self.vocab.decode(ids)


class Reverse(_Transduction):
  """Output the input sequence reversed."""

  name = "reverse"

  def transform(self, seq_L: np.ndarray) -> np.ndarray:
    return seq_L[::-1]


class Copy(_Transduction):
  """Output the input sequence unchanged."""

  name = "copy"

  def transform(self, seq_L: np.ndarray) -> np.ndarray:
    return seq_L


class Sort(_Transduction):
  """Output the input symbols in ascending order (duplicates kept)."""

  name = "sort"

  def transform(self, seq_L: np.ndarray) -> np.ndarray:
    return np.sort(seq_L)


class AssociativeRecall(Task):
  """Key-value pairs, then a query key: predict the value stored under it.

  ``inputs`` int32 ``[B, 2 * num_pairs + 2]`` is ``k1 v1 k2 v2 ... kn vn q
  v(q)`` with distinct keys and values drawn with replacement;
  ``loss_mask`` float32 ``[B, T]`` is 1 only at the query position
  ``T - 2``, whose next token is the answer. Keys print as letters, values
  as digits (when there are few enough).

  Options:
    num_pairs: pairs per sequence.
    num_keys: size of the key alphabet (>= num_pairs).
    num_values: size of the value alphabet.
  """

  name = "associative_recall"
  kind = "lm"

  def __init__(self, seed: int = 0, *, num_pairs: int = 8,
               num_keys: int = 16, num_values: int = 10):
    super().__init__(seed)
    self.num_pairs = check_int(self.name, "num_pairs", num_pairs, 1)
    self.num_keys = check_int(self.name, "num_keys", num_keys,
                              self.num_pairs)
    self.num_values = check_int(self.name, "num_values", num_values, 1)
    self.vocab = Vocabulary(
        symbol_names(self.num_keys, "abcdefghijklmnopqrstuvwxyz", "k")
        + symbol_names(self.num_values, "0123456789", "v"))

  @property
  def length(self) -> int:
    """Sequence length ``2 * num_pairs + 2``."""
    return 2 * self.num_pairs + 2

  def _propose(self, rng: np.random.Generator, m: int):
    n = self.num_pairs
    keys_BN = np.argsort(rng.random((m, self.num_keys)), axis=1)[:, :n]
    values_BN = rng.integers(0, self.num_values, size=(m, n))
    which_B = rng.integers(0, n, size=m)
    key_ids_BN = keys_BN + NUM_SPECIAL
    value_ids_BN = values_BN + NUM_SPECIAL + self.num_keys
    rows = np.arange(m)
    inputs_BT = np.empty((m, self.length), dtype=np.int32)
    inputs_BT[:, 0:2 * n:2] = key_ids_BN
    inputs_BT[:, 1:2 * n:2] = value_ids_BN
    inputs_BT[:, -2] = key_ids_BN[rows, which_B]
    inputs_BT[:, -1] = value_ids_BN[rows, which_B]
    loss_mask_BT = np.zeros((m, self.length), dtype=np.float32)
    loss_mask_BT[:, -2] = 1.0
    return {"inputs": inputs_BT, "loss_mask": loss_mask_BT}, inputs_BT

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    return sample_in_split(rng, split, n, self._propose, self.name)

  def spec(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": self.kind,
            "vocab_size": self.vocab.size, "input_length": self.length,
            "pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of whitespace-separated symbols (``"a 1 b 2 a"``);
    ValueError for symbols not in the vocabulary."""
    return self.vocab.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.vocab.decode(ids)
