"""Fields shared by every experiment config (each task's file starts here).

Override any field from the command line, e.g.
``--config.model.attention=linear --config.num_train_steps=2000``.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """The defaults; task configs change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # model init, dropout and data order
  c.runlocal = False              # True: tiny model, few steps (smoke test)
  c.fresh_start = False           # True: set existing checkpoints aside

  c.task = ml_collections.ConfigDict()
  c.task.name = "reverse"         # see experiments.data.list_tasks()
  c.task.options = ml_collections.ConfigDict()  # passed to get_task(**opts)

  c.model = ml_collections.ConfigDict()
  # Which model (experiments.problems.ARCHS, per task kind): transformer |
  # vit (image classification) | rnn (seq2seq) | glimpse | nadaraya_watson.
  c.model.arch = "transformer"
  c.model.attention = "softmax"   # any attn.list_attention() spec string
  c.model.positional = "sinusoidal"  # none|sinusoidal|learned|rope|alibi|t5
  c.model.num_layers = 2          # blocks in encoder (and decoder)
  c.model.num_heads = 4           # query heads
  c.model.num_kv_heads = 0        # key/value heads (GQA); 0 = num_heads
  c.model.emb_dim = 64            # model width; divisible by num_heads
  c.model.mlp_dim = 128           # hidden width of the MLP blocks
  c.model.dropout_rate = 0.0      # residual/MLP dropout
  c.model.attention_dropout_rate = 0.0  # dropout on attention weights
  c.model.logits_soft_cap = 0.0   # c > 0: scores -> c*tanh(scores/c); 0 = off
  c.model.pre_ln = True           # pre-LayerNorm (True) or post-LN (False)
  c.model.score = "additive"      # score function for rnn/glimpse models
  c.model.options = ml_collections.ConfigDict()  # extra model kwargs

  c.batch_size = 64               # global batch, split over the data axis
  c.num_train_steps = 1000
  c.learning_rate = 1e-3          # peak learning rate
  c.warmup_steps = 100
  c.schedule = "cosine"           # cosine | inverse_sqrt | constant
  c.weight_decay = 1e-4           # AdamW decoupled weight decay
  c.grad_clip_norm = 1.0          # global-norm clipping; 0 disables
  c.dtype = "float32"             # float32 | bfloat16 (activations)

  c.log_every_steps = 50          # log line / metrics.jsonl train record
  c.eval_every_steps = 250        # validation + checkpoint
  c.checkpoint_every_steps = 250  # latest checkpoint (resume point)
  c.keep_checkpoints = 2          # latest-N kept (the best is kept apart)
  c.num_eval_examples = 512       # validation/test examples per evaluation
  c.eval_batch_size = 128
  c.prefetch_batches = 2          # train batches made ahead on a thread; 0: none

  c.figures = ml_collections.ConfigDict()
  c.figures.enabled = True        # write workdir/figures/ at the end
  c.figures.num_examples = 2      # evaluation examples to draw
  c.figures.every_steps = 0       # >0: also draw during training

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # data-parallel devices (-1: all left)
  c.mesh.seq = 1                  # sequence-parallel devices (ring attention)
  c.mesh.model = 1                # heads; only ring attention splits them
  return c
