"""Sort a sequence of 16 symbols (vocabulary 10) with a Transformer.

    python -m experiments.main --config=configs/sort.py
    python -m experiments.main --config=configs/sort.py \
        --config.model.positional=none      # fails: no notion of order
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "sort"
  c.task.options.length = 16        # symbols per sequence
  c.task.options.vocab_size = 10    # distinct symbols
  c.model.arch = "transformer"
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.batch_size = 64
  c.num_train_steps = 1500
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.num_eval_examples = 512
  return c
