"""ViT on scikit-learn's 8x8 digits, with attention-rollout saliency maps.

    python -m experiments.main --config=configs/digits_vit.py
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.task.name = "digits_vit"
  c.task.options.augment = True
  c.model.arch = "vit"
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.model.positional = "learned"
  c.model.options.patch_size = 2    # 8x8 image -> 16 patches
  c.model.options.pooling = "cls"
  c.model.dropout_rate = 0.1
  c.batch_size = 64
  c.num_train_steps = 4000
  c.learning_rate = 2e-3
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.num_eval_examples = 400
  return c
