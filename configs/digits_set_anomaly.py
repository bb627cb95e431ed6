"""Set anomaly detection on digits: which image is not like the others?

No positional encoding: the encoder is permutation-equivariant.

    python -m experiments.main --config=configs/digits_set_anomaly.py
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "digits_set_anomaly"
  c.task.options.set_size = 6       # images per set
  c.model.arch = "transformer"
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.model.positional = "none"
  c.batch_size = 64
  c.num_train_steps = 2000
  c.learning_rate = 1e-3
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  return c
