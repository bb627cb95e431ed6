"""ListOps (Long Range Arena spec), sequences of 33-127 tokens, on CPU.

    python -m experiments.main --config=configs/listops.py
    # published LRA data (basic_train.tsv, basic_val.tsv, basic_test.tsv):
    python -m experiments.main --config=configs/listops.py \
        --config.task.options.data_dir=/path/to/lra_release/listops-1000 \
        --config.task.options.max_length=2000
    # an efficient variant:
    python -m experiments.main --config=configs/listops.py \
        --config.model.attention="performer(num_features=64)"
"""

from ml_collections import config_dict

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "listops"
  c.task.options.max_depth = 10     # LRA: 10
  c.task.options.max_args = 10      # LRA: 10
  c.task.options.min_length = 32    # LRA: 500
  c.task.options.max_length = 128   # LRA: 2000
  c.task.options.data_dir = config_dict.placeholder(str)  # LRA TSV folder
  c.model.arch = "transformer"
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.model.positional = "sinusoidal"
  c.model.options.pooling = "cls"   # mean | max | cls (LRA: CLS)
  c.batch_size = 32
  c.num_train_steps = 6000
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.num_eval_examples = 1000
  c.eval_batch_size = 100
  return c
