"""Tasks on scikit-learn's ``load_digits`` images (1797 8x8 grey-level digits,
shipped inside the scikit-learn package; nothing is downloaded).

The split is fixed (it does not depend on the task seed) and stratified: in
each class a permutation drawn from ``default_rng(SPLIT_SEED)`` puts 20% of
the images in test, 10% in valid and the rest in train, so the three splits
share no image. Pixel values 0..16 are scaled to [0, 1].

* ``digits_vit``: classify one image; ``inputs`` float32 ``[B, 8, 8, 1]``,
  ``labels`` int32 ``[B]``.
* ``digits_set_anomaly``: a set of ``set_size`` images, all of one class but
  one of another; ``inputs`` float32 ``[B, set_size, 64]`` (flattened
  images), ``labels`` int32 ``[B]`` = index of the odd one. Sets are built
  from the split's own images only.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import numpy as np

from experiments.data.base import (SPLITS, TRAIN_CHUNK, Batch, Task,
                                    augment_rng, check_int, epoch_indices,
                                    stream_rows)

SPLIT_SEED = 0
TEST_FRACTION, VALID_FRACTION = 0.2, 0.1
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


@functools.lru_cache(maxsize=1)
def digits_splits() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """``{split: (images float32 [N, 8, 8, 1] in [0, 1], labels int32 [N])}``.

  Within a split the images keep scikit-learn's order. Arrays are read-only.
  """
  from sklearn.datasets import load_digits  # deferred: slow import
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  rng = np.random.default_rng(SPLIT_SEED)
  assignment = np.zeros(len(labels), dtype=np.int64)  # 0 train 1 valid 2 test
  for c in range(NUM_CLASSES):
    members = rng.permutation(np.flatnonzero(labels == c))
    num_test = round(TEST_FRACTION * len(members))
    num_valid = round(VALID_FRACTION * len(members))
    assignment[members[:num_test]] = 2
    assignment[members[num_test:num_test + num_valid]] = 1
  out = {}
  for i, split in enumerate(SPLITS):
    keep = assignment == i
    split_images, split_labels = images[keep], labels[keep]
    split_images.flags.writeable = False
    split_labels.flags.writeable = False
    out[split] = (split_images, split_labels)
  return out


def shift_images(images_BHWC: np.ndarray, rng: np.random.Generator,
                 max_shift: int = 1) -> np.ndarray:
  """Translates each image by up to ``max_shift`` pixels per axis (zero
  fill); offsets are uniform and independent per image and axis."""
  b = images_BHWC.shape[0]
  dy = rng.integers(0, 2 * max_shift + 1, size=b)
  dx = rng.integers(0, 2 * max_shift + 1, size=b)
  return shift_by(images_BHWC, dy, dx, max_shift)


def shift_by(images_BHWC: np.ndarray, dy: np.ndarray, dx: np.ndarray,
             max_shift: int = 1) -> np.ndarray:
  """Image ``i`` moved by ``(dy[i], dx[i]) - max_shift`` pixels (zero fill)."""
  b, h, w, _ = images_BHWC.shape
  s = max_shift
  padded = np.pad(images_BHWC, ((0, 0), (s, s), (s, s), (0, 0)))
  rows = dy[:, None, None] + np.arange(h)[None, :, None]
  cols = dx[:, None, None] + np.arange(w)[None, None, :]
  return padded[np.arange(b)[:, None, None], rows, cols]


class DigitsViT(Task):
  """Classify 8x8 digit images (ViT target task).

  Training batches walk a seeded permutation of the train split, one epoch
  after another; evaluation uses the split in its fixed order.

  Options:
    augment: translate training images by up to one pixel.
  """

  name = "digits_vit"
  kind = "classification"

  def __init__(self, seed: int = 0, *, augment: bool = False):
    super().__init__(seed)
    if not isinstance(augment, (bool, np.bool_)):
      raise ValueError(f"{self.name}: augment={augment!r} must be a bool")
    self.augment = bool(augment)

  def _batch(self, split: str, step: int, batch_size: int) -> Batch:
    images, labels = digits_splits()[split]
    idx = epoch_indices(self.seed, split, step, batch_size, len(labels))
    batch_images = images[idx]
    if self.augment and split == "train":
      # Per-example offsets from (seed, split, example index) alone.
      def offsets(c):
        dydx = augment_rng(self.seed, split, c).integers(0, 3, (TRAIN_CHUNK, 2))
        return {"dy": dydx[:, 0], "dx": dydx[:, 1]}
      shift = stream_rows(step * batch_size, batch_size, offsets,
                          self._chunk_cache, ("shift", split))
      batch_images = shift_by(batch_images, shift["dy"], shift["dx"])
    return {"inputs": batch_images, "labels": labels[idx]}

  def _eval_set(self, split: str, num_examples: int) -> Batch:
    images, labels = digits_splits()[split]
    return {"inputs": images[:num_examples].copy(),
            "labels": labels[:num_examples].copy()}

  def spec(self) -> Dict[str, Any]:
    sizes = {s: len(v[1]) for s, v in digits_splits().items()}
    return {"name": self.name, "kind": self.kind, "image_shape": IMAGE_SHAPE,
            "num_classes": NUM_CLASSES, "split_sizes": sizes}


class DigitsSetAnomaly(Task):
  """Find the one image of a different class in a set of digit images.

  Each example picks a majority class and a different odd class (uniform),
  ``set_size - 1`` distinct majority images and one odd image from the
  split, and puts the odd image at a uniform position.

  Options:
    set_size: images per set (>= 3, so the majority is well defined).
  """

  name = "digits_set_anomaly"
  kind = "set_anomaly"

  def __init__(self, seed: int = 0, *, set_size: int = 6):
    super().__init__(seed)
    self.set_size = check_int(self.name, "set_size", set_size, 3)
    smallest = min(np.bincount(labels, minlength=NUM_CLASSES).min()
                   for _, labels in digits_splits().values())
    if self.set_size - 1 > smallest:
      raise ValueError(f"{self.name}: set_size={set_size} needs "
                       f"{set_size - 1} images of one class, but a split has "
                       f"only {smallest}")

  def _sample(self, rng: np.random.Generator, split: str, n: int) -> Batch:
    images, labels = digits_splits()[split]
    flat = images.reshape(len(images), -1)
    by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    m = self.set_size
    inputs = np.empty((n, m, flat.shape[1]), dtype=np.float32)
    odd_B = rng.integers(0, m, size=n)
    for i in range(n):
      major = rng.integers(NUM_CLASSES)
      minor = (major + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES
      members = rng.choice(by_class[major], size=m - 1, replace=False)
      odd = rng.choice(by_class[minor])
      inputs[i] = flat[np.insert(members, odd_B[i], odd)]
    return {"inputs": inputs, "labels": odd_B.astype(np.int32)}

  def spec(self) -> Dict[str, Any]:
    return {"name": self.name, "kind": self.kind, "set_size": self.set_size,
            "feature_dim": int(np.prod(IMAGE_SHAPE)),
            "image_shape": IMAGE_SHAPE, "num_classes": self.set_size}
