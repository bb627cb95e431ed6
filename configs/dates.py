"""Dates in ~20 human formats -> ISO 8601, with a Transformer.

    python -m experiments.main --config=configs/dates.py
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "dates"
  c.model.arch = "transformer"
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.batch_size = 64
  c.num_train_steps = 2000
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.num_eval_examples = 1000
  return c
