"""``glimpse``: retrieve the item stored under a queried key.

Each of the ``length`` positions holds one token that encodes a (key, item)
pair, id ``3 + key * num_items + item``. Keys are distinct and items are
distinct within a sequence, both in random order; the context is the key of a
position chosen uniformly at random, and the label is that position's item.

Why content beats location. A content-based score compares the context (the
query) with each token's key and can put all attention on the one token
whose key matches; reading the item from it answers every example. A
location-only score sees the context but not the keys, so its weights
``w(context, position)`` cannot follow the target, whose position is uniform
and independent of the context: the expected attention mass on the target is
exactly ``1 / length`` whatever the weights. What it reads is a mixture of
tokens chosen without regard to where the answer is; with
``num_items == length`` (the default) every sequence holds every item, so not
even the bag of items present says anything about the label, and a readout
of the glimpse is left near chance, ``1 / num_items``.

Batches: ``inputs`` int32 ``[B, length]``, ``context`` int32 ``[B]`` (a key,
0..num_keys-1), ``labels`` int32 ``[B]`` (an item, 0..num_items-1),
``target_position`` int32 ``[B]`` (where the answer is). Splits are disjoint
by a hash of (inputs, context).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

from experiments.data.base import (NUM_SPECIAL, PAD_ID, Batch, Task,
                                    Vocabulary, check_int, sample_in_split,
                                    symbol_names)


class Glimpse(Task):
  """Find the token whose key is the context and return its item.

  Options:
    length: tokens per sequence.
    num_keys: key alphabet (>= length); keys print as upper-case letters.
    num_items: item alphabet (>= length); items print as lower-case letters.
  """

  name = "glimpse"
  kind = "glimpse"

  def __init__(self, seed: int = 0, *, length: int = 16, num_keys: int = 16,
               num_items: int = 16):
    super().__init__(seed)
    self.length = check_int(self.name, "length", length, 1)
    self.num_keys = check_int(self.name, "num_keys", num_keys, self.length)
    self.num_items = check_int(self.name, "num_items", num_items, self.length)
    keys = symbol_names(self.num_keys, "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "K")
    items = symbol_names(self.num_items, "abcdefghijklmnopqrstuvwxyz", "i")
    self.key_names, self.item_names = keys, items
    self.vocab = Vocabulary([f"{k}{i}" if len(k) == len(i) == 1 else
                             f"{k}:{i}" for k in keys for i in items])

  def _propose(self, rng: np.random.Generator, m: int):
    n = self.length
    keys_BN = np.argsort(rng.random((m, self.num_keys)), axis=1)[:, :n]
    items_BN = np.argsort(rng.random((m, self.num_items)), axis=1)[:, :n]
    target_B = rng.integers(0, n, size=m)
    rows = np.arange(m)
    inputs_BN = (NUM_SPECIAL + keys_BN * self.num_items + items_BN
                 ).astype(np.int32)
    batch = {"inputs": inputs_BN,
             "context": keys_BN[rows, target_B].astype(np.int32),
             "labels": items_BN[rows, target_B].astype(np.int32),
             "target_position": target_B.astype(np.int32)}
    content = np.concatenate([inputs_BN, batch["context"][:, None]], axis=1)
    return batch, content

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    return sample_in_split(rng, split, n, self._propose, self.name)

  def spec(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": self.kind,
            "vocab_size": self.vocab.size, "input_length": self.length,
            "num_contexts": self.num_keys, "num_classes": self.num_items,
            "pad_id": PAD_ID}

  def decode(self, ids: Sequence[int]) -> str:
    return self.vocab.decode(ids)
