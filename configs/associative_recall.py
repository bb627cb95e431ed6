"""Associative recall: key-value pairs, then a key; predict its value (LM).

    python -m experiments.main --config=configs/associative_recall.py
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "associative_recall"
  c.task.options.num_pairs = 8      # key-value pairs per sequence
  c.task.options.num_keys = 16      # key alphabet
  c.task.options.num_values = 10    # value alphabet
  c.model.arch = "transformer"
  c.model.num_layers = 2
  c.model.positional = "rope"
  c.batch_size = 64
  c.num_train_steps = 3000
  c.learning_rate = 1e-3
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
