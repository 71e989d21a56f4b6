"""Pieces every experiment config shares: the model section and the training defaults.

Every field a config has is overridable from the command line (`--config.a.b=v`); a
field that may be None is a typed placeholder so an override still type-checks.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from deepseek_jax.model.config import ModelConfig

_OPTIONAL_INT = ("q_lora_rank", "moe_block_size")
_OPTIONAL_FLOAT = ("ep_capacity_factor",)


def model_section(cfg: ModelConfig) -> ml_collections.ConfigDict:
  d = dataclasses.asdict(cfg)
  for k in _OPTIONAL_INT:
    if d[k] is None:
      d[k] = config_dict.placeholder(int)
  for k in _OPTIONAL_FLOAT:
    if d[k] is None:
      d[k] = config_dict.placeholder(float)
  return ml_collections.ConfigDict(d)


def set_path(config, dotted: str, value):
  """config["a"]["b"]["c"] = value for dotted "a.b.c" (a command-line style override)."""
  *path, last = dotted.split(".")
  node = config
  for p in path:
    if p not in node:
      raise KeyError(f"config has no section {p!r} (in override {dotted!r})")
    node = node[p]
  if last not in node:
    raise KeyError(f"config has no field {dotted!r}")
  node[last] = value
  return config


def base_config(model: ModelConfig) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_section(model)
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 8            # per periodic evaluation; -1: the whole validation set
  c.final_eval_batches = -1     # the evaluation after the last step
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.batch_size = 16            # global sequences per step
  c.seq_len = 256
  c.microbatches = 1           # gradient accumulation; -1: one sequence per batch shard
  c.mtp_lambda = 0.3           # MTP loss weight (V3: 0.3 for the first 10T tokens,
  c.mtp_lambda_late = 0.1      # then 0.1); it switches at this step (-1: never)
  c.mtp_lambda_switch_step = -1
  # A step with a non-finite loss or gradient norm is skipped (not applied); this many
  # in a row stop the run (0: stop at the first).
  c.max_skipped_steps = 3

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, context=1, tensor=1))
  # Start from another run's weights: WORKDIR or WORKDIR:STEP (default its latest step).
  # Its parameters and balancing bias are restored; the optimizer, step and data order
  # start fresh (a new stage, e.g. a context extension). Ignored once this run has
  # checkpoints of its own (it then resumes from them).
  c.init_from = ""
  # Long-context extension stages (extension_stage): name -> the fields they change.
  c.extension = ml_collections.ConfigDict()

  # Token-based schedules declared as phases (train/recipe.py has the grammar); empty:
  # the step-based fields (optimizer.warmup_steps/decay_start_frac, batch_size,
  # mtp_lambda_switch_step, balance.bias_freeze_frac). configs/deepseek_v3_671b.py
  # declares V3's recipe; `python -m experiments.schedule --config=FILE` shows one.
  c.schedule = ml_collections.ConfigDict(dict(lr="", batch_size="", mtp_lambda="",
                                              bias_rate=""))

  # V3 4.2: AdamW(0.9, 0.95, wd 0.1), clip 1.0, linear warmup, constant, cosine decay.
  c.optimizer = ml_collections.ConfigDict(dict(
      peak_lr=2.2e-4, min_lr_ratio=0.1, warmup_steps=100, decay_start_frac=0.8,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))

  # Load balancing (balancing.py). Rates/alphas of 0 switch a mechanism off.
  c.balance = ml_collections.ConfigDict(dict(
      bias_rate=0.0,            # u of b_i += u * sign(mean_load - load_i)
      bias_rule="sign",         # sign | magnitude (LFB's variant) | quantile (QB, needs
                                # model.quantile_stats; u then weighs the new target);
                                # model.bias_mode picks additive or multiplicative use
      count_scope="global",     # with microbatches > 1: global | micro counting for the
                                # batch-level losses and the bias (balancing.py)
      bias_freeze_frac=1.0,     # u is set to 0 after this fraction of total_steps
      aux_alpha=0.0,            # classic Switch/GShard auxiliary loss
      seq_aux_alpha=0.0,        # V3 sequence-wise balance loss (eqs 17-20)
      batch_aux_alpha=0.0))     # batch-wise balance loss (V3 4.5.3)

  c.data = ml_collections.ConfigDict(dict(
      # stdlib (the embedded default) | domains (code, prose and structured text cut
      # from the Python install: data/domains.py; bytes tokenizer) | files | prepared
      # (experiments.prepare_data); all but prepared are prepared on first use into
      # cache_dir, in the same format.
      source="stdlib",
      # How a batch draws on a mixture's sources: mixed (shuffled together) |
      # single_domain (each micro-batch from one source, rotating; needs an explicit
      # microbatches)
      composition="mixed",
      # files: comma-separated globs; prepared: DIR, or DIR1:W1,DIR2:W2 (a mixture)
      paths=config_dict.placeholder(str),
      tokenizer="bpe",          # stdlib / files: bpe (trained on the corpus) | bytes
      val_fraction=0.02,
      cache_dir=config_dict.placeholder(str),
      doc_attention_mask=True,  # attention (and MTP targets) stay inside a document
      # Batches built ahead of the step (train/batches.Prefetcher: Grain's read-ahead): how
      # many, on how many threads.
      # Neither changes any batch (a batch is a function of (seed, step)).
      prefetch=2,
      loader_threads=1,
  ))
  return c


def extension_stage(c, name: str) -> ml_collections.ConfigDict:
  """The config of context-extension stage `name` (c.extension[name]), run after
  pre-training as V3 did (report 4.3): longer sequences at a smaller batch (the same
  tokens a step), a constant learning rate, YaRN on the rope key (the model section's
  rope_factor and rope_original_max_len), a mesh that splits each sequence over
  "context", and init_from pointing at the pre-training run. Documented choices where
  the report is silent: the stage's "model" entries override the model section (memory
  settings such as remat, never the architecture), the balancing bias stays frozen (bias_rate 0, as V3 had it for
  its last 500B pre-training tokens), MTP stays on at its late weight, documents stay
  packed as in pre-training, and the batch-size ramp and phase schedules are off."""
  if name not in c.extension:
    raise ValueError(f"unknown extension stage {name!r}; this config has "
                     f"{sorted(c.extension) or 'none'}")
  s = c.extension[name]
  out = c.copy_and_resolve_references()
  out.seq_len, out.batch_size, out.total_steps = s.seq_len, s.batch_size, s.steps
  out.microbatches = s.get("microbatches", out.microbatches)
  for field in out.schedule:
    out.schedule[field] = ""
  out.optimizer.peak_lr, out.optimizer.warmup_steps = s.lr, 0
  out.optimizer.decay_start_frac, out.optimizer.min_lr_ratio = 1.0, 1.0   # constant
  out.mtp_lambda, out.mtp_lambda_switch_step = out.mtp_lambda_late, -1
  out.balance.bias_rate = 0.0
  out.model.rope_factor = s.rope_factor
  out.model.rope_original_max_len = s.rope_original_max_len
  for axis, size in s.mesh.items():
    out.mesh[axis] = size
  for field, value in s.get("model", {}).items():
    out.model[field] = value
  return out
