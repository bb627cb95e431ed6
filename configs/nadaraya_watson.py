"""Nadaraya-Watson attention pooling on y = 2 sin x + x + noise.

    python -m experiments.main --config=configs/nadaraya_watson.py \
        --config.model.options.kernel=constant      # attention without a query
    python -m experiments.main --config=configs/nadaraya_watson.py \
        --config.model.options.learn_bandwidth=True  # parametric width
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "nadaraya_watson"
  c.task.options.num_keys = 50      # training (x, y) pairs per example
  c.task.options.num_queries = 50   # test points per example
  c.task.options.noise_std = 0.5
  c.model.arch = "nadaraya_watson"
  c.model.positional = "none"
  c.model.options.kernel = "gaussian"   # gaussian|boxcar|epanechnikov|constant
  c.model.options.bandwidth = 1.0       # kernel width (initial if learned)
  c.model.options.learn_bandwidth = False
  c.batch_size = 32
  c.num_train_steps = 500
  c.learning_rate = 3e-2
  c.warmup_steps = 10
  c.weight_decay = 0.0
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.num_eval_examples = 256
  return c
