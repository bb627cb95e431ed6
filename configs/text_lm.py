"""Character-level language model on a UTF-8 text file, with sampling.

    python -m experiments.main --config=configs/text_lm.py \
        --config.task.options.path=my_corpus.txt
"""

from ml_collections import config_dict

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "text_lm"
  c.task.options.path = config_dict.placeholder(str)  # None: built-in text
  c.task.options.length = 128       # characters per training sequence
  c.model.arch = "transformer"
  c.model.num_layers = 2
  c.model.emb_dim = 128
  c.model.mlp_dim = 256
  c.model.num_heads = 4
  c.model.positional = "rope"
  c.batch_size = 32
  c.num_train_steps = 2000
  c.learning_rate = 2e-3
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.num_eval_examples = 256
  c.eval_batch_size = 64
  return c
