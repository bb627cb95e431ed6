"""Glimpse: a learned query per context id retrieves the queried item.

    python -m experiments.main --config=configs/glimpse.py \
        --config.model.score=cosine      # dot|scaled_dot|general|additive|cosine|location

``num_items`` (32) is larger than ``length`` (16) on purpose: when every
item occurs in every sequence, the item that is *missing* from a glimpse
that avoids the target also names the answer, and content scores drift to
that "attend to everything but the target" solution (high accuracy, target
attention mass near zero, and ~1/3 of the (key, item) embeddings stuck).
"""

from configs import base


def get_config():
  """Glimpse with one score function; every content score reaches ~100%."""
  c = base.get_base_config()
  c.task.name = "glimpse"           # experiments/data/glimpse.py
  c.task.options.length = 16        # items per sequence
  c.task.options.num_keys = 16      # context ids
  c.task.options.num_items = 32     # item alphabet = classes (> length)
  c.model.arch = "glimpse"          # Embed -> GlimpseAttention -> Dense
  c.model.score = "scaled_dot"      # dot|scaled_dot|general|additive|cosine|location
  c.model.emb_dim = 32              # token embedding / query width
  c.model.positional = "none"       # order is irrelevant to the task
  c.batch_size = 256                # large batches: every token, every step
  c.num_train_steps = 6000          # ~1 min on a 2-core CPU
  c.learning_rate = 2e-2            # peak (cosine decay to 10%)
  c.warmup_steps = 100              # linear warmup
  c.eval_every_steps = 500          # validation + best checkpoint
  c.checkpoint_every_steps = 500    # resume point
  return c
