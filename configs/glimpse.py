"""Glimpse: a learned query per context id retrieves the queried item.

    python -m experiments.main --config=configs/glimpse.py \
        --config.model.score=cosine      # dot|scaled_dot|general|additive|cosine|location
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "glimpse"
  c.task.options.length = 16        # items per sequence
  c.task.options.num_keys = 16      # context ids
  c.task.options.num_items = 16     # item alphabet = classes
  c.model.arch = "glimpse"
  c.model.score = "scaled_dot"
  c.model.emb_dim = 32
  c.model.positional = "none"
  c.batch_size = 64
  c.num_train_steps = 1500
  c.learning_rate = 3e-3
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  return c
