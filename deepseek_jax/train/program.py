"""A run config to its jitted, sharded program.

The one path from a config to what runs: validate the config for a mesh, resolve its
microbatches (one config per batch-size stage), build the model, the optimizer, the
train state's shardings and the jitted train / eval / init steps. The training loop,
the TPU compile tool (train/aot.py) and the train bench (bench/train_speed.py) all take
their program from `build`, so what is compiled for a pod is what trains.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
import flax.linen as nn
from absl import logging

from deepseek_jax import balancing
from deepseek_jax.train import sharding
from deepseek_jax.train.recipe import Recipe
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.transformer import Transformer, abstract_variables
from deepseek_jax.train.step import TrainState, init_state, jit_steps, make_optimizer, run_lr_schedule


def resolve_microbatches(cfg, mesh, batch_size: int | None = None):
  """cfg with `microbatches: -1` resolved to one sequence per batch shard per
  microbatch (batch_size / batch shards), so one config accumulates right on any slice
  size; cfg itself when it names a number. batch_size: a batch-size stage's (a copy of
  cfg with that batch size and its microbatches)."""
  if cfg.microbatches != -1 and batch_size is None:
    return cfg
  auto = cfg.microbatches == -1
  cfg = cfg.copy_and_resolve_references()
  if batch_size is not None:
    cfg.batch_size = batch_size
  if auto:
    # A batch that does not split over the shards is validate_run_config's error.
    cfg.microbatches = max(cfg.batch_size // sharding.batch_divisor(mesh), 1)
  return cfg


def stage_configs(cfg, mesh) -> dict:
  """{batch size: the run config of that batch-size stage} (one entry without a ramp:
  cfg resolved). Every stage is validated; the largest stage must be cfg.batch_size
  (what evaluation, the checkpoint's config and experiments.compile's default use)."""
  stages = Recipe(cfg).batch_sizes
  if len(stages) > 1 and max(stages) != cfg.batch_size:
    raise ValueError(f"config.batch_size={cfg.batch_size} but schedule.batch_size ramps to "
                     f"{max(stages)}: set batch_size to the largest stage")
  out = {}
  for b in stages:
    out[b] = resolve_microbatches(cfg, mesh, b if len(stages) > 1 else None)
    validate_run_config(out[b], mesh)
  return out


# (field, test, rule) of the optimizer and balancing numbers: a bad one is refused by
# name before anything builds (a negative learning rate trained by gradient ascent).
_NUMBER_RULES = (
    ("optimizer.peak_lr", lambda x: x > 0, "must be positive"),
    ("optimizer.min_lr_ratio", lambda x: 0 <= x <= 1, "must be in [0, 1]"),
    ("optimizer.warmup_steps", lambda x: x >= 0, "must be >= 0"),
    ("optimizer.decay_start_frac", lambda x: 0 <= x <= 1, "must be in [0, 1]"),
    ("optimizer.b1", lambda x: 0 <= x < 1, "must be in [0, 1)"),
    ("optimizer.b2", lambda x: 0 <= x < 1, "must be in [0, 1)"),
    ("optimizer.eps", lambda x: x > 0, "must be positive"),
    ("optimizer.weight_decay", lambda x: x >= 0, "must be >= 0"),
    ("optimizer.grad_clip", lambda x: x > 0, "must be positive"),
    ("balance.bias_rate", lambda x: x >= 0, "must be >= 0"),
    ("balance.bias_freeze_frac", lambda x: 0 <= x <= 1, "must be in [0, 1]"),
    ("balance.aux_alpha", lambda x: x >= 0, "must be >= 0"),
    ("balance.seq_aux_alpha", lambda x: x >= 0, "must be >= 0"),
    ("balance.batch_aux_alpha", lambda x: x >= 0, "must be >= 0"),
    ("data.prefetch", lambda x: x >= 0, "must be >= 0 (0: build each batch in the loop)"),
    ("data.loader_threads", lambda x: x >= 1, "must be >= 1"),
)


def validate_run_config(cfg, mesh):
  for f in ("batch_size", "total_steps", "checkpoint_every", "eval_every", "log_every",
            "seq_len", "microbatches", "keep_checkpoints"):
    if int(cfg[f]) <= 0:
      raise ValueError(f"config.{f} must be positive (got {cfg[f]})")
  for path, ok, rule in _NUMBER_RULES:
    section, name = path.split(".")
    value = cfg[section][name]
    if not ok(value):
      raise ValueError(f"config.{path} {rule} (got {value})")
  div = sharding.batch_divisor(mesh) * cfg.microbatches
  if cfg.batch_size % div:
    raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of microbatches x "
                     f"batch devices = {cfg.microbatches} x {sharding.batch_divisor(mesh)}")
  n_context = mesh.shape.get("context", 1)
  if n_context > 1 and cfg.seq_len % (2 * n_context):
    raise ValueError(f"seq_len={cfg.seq_len} must be a multiple of 2 x mesh.context="
                     f"{2 * n_context} (each context shard holds two chunks of "
                     "seq_len / (2 x context) positions, the zig-zag layout)")
  if n_context > 1 and cfg.model.attention_impl not in ("plain", "blockwise",
                                                       "blockwise_latent"):
    raise ValueError(f"mesh.context={n_context} runs attention_impl 'plain', 'blockwise' "
                     "or 'blockwise_latent'"
                     f" (got {cfg.model.attention_impl!r}): set --config.model.attention_impl")
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"batch_size={cfg.batch_size} must split over {jax.process_count()} "
                     "processes")
  if cfg.balance.bias_rule not in balancing.BIAS_RULES:
    raise ValueError(f"config.balance.bias_rule must be one of {balancing.BIAS_RULES}")
  scope = cfg.balance.get("count_scope", "global")
  if scope not in balancing.COUNT_SCOPES:
    raise ValueError(f"config.balance.count_scope must be one of {balancing.COUNT_SCOPES}"
                     f" (got {scope!r})")
  if (cfg.balance.bias_rule == "quantile") != bool(cfg.model.quantile_stats):
    raise ValueError("Quantile Balancing needs both config.balance.bias_rule='quantile' and "
                     "config.model.quantile_stats=True (the model computes its targets)")


def state_shardings(model, tx, mesh):
  """Shardings of the whole TrainState from the params' logical axes."""
  boxed = abstract_variables(model)
  param_sh = sharding.param_shardings(boxed["params"], mesh)
  rep = sharding.replicated(mesh)
  abstract_params = nn.unbox(boxed["params"])
  opt_abstract = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh,
                                 transform_non_params=lambda _: rep)
  has_bias = "balance" in boxed
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                    expert_bias=rep if has_bias else None)


@dataclasses.dataclass
class Program:
  """What a run executes on its mesh. train_fn is the step of cfg.batch_size; a
  batch-size ramp gets one compiled step per stage (train_fn_for), built when reached."""
  cfg: object                 # the run config, microbatches resolved
  model: Transformer
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_sh: TrainState        # the train state's shardings
  batch_sh: jax.sharding.NamedSharding
  train_fn: object            # (state, batch, hparams) -> (state, metrics)
  eval_fn: object             # (state, batch) -> per-sequence sums
  init_fn: object             # rng -> state, laid out by state_sh
  stage_cfgs: dict            # {batch size: that stage's run config}
  _stage_fns: dict = dataclasses.field(default_factory=dict)

  def train_fn_for(self, batch_size: int):
    """The train step of the batch-size stage `batch_size`."""
    if batch_size == self.cfg.batch_size:
      return self.train_fn
    if batch_size not in self._stage_fns:
      stage = self.stage_cfgs[batch_size]
      fn, _ = jit_steps(self.model, self.tx, stage, self.state_sh, self.batch_sh)
      self._stage_fns[batch_size] = sharding.with_mesh(self.mesh, fn)
      logging.info("batch-size stage %d x %d: its own train step (%d microbatch(es))",
                   batch_size, self.cfg.seq_len, stage.microbatches)
    return self._stage_fns[batch_size]

  def compile_train_step(self, *args):
    """The train step compiled ahead of time for args (arrays or ShapeDtypeStructs),
    under the mesh as the loop traces it."""
    with jax.set_mesh(self.mesh):
      return self.train_fn.__wrapped__.lower(*args).compile()   # build wraps it in with_mesh

  def abstract_state(self, seed: int = 0):
    """The train state's ShapeDtypeStructs, each with its sharding."""
    shapes = jax.eval_shape(self.init_fn, jax.random.PRNGKey(seed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_sh)


def build(cfg, model_cfg: ModelConfig, mesh, stage_cfgs: dict | None = None) -> Program:
  """cfg's program on `mesh` (cfg validated for it and its microbatches resolved by the
  caller: stage_configs does both). Steps trace under the mesh: MoE layers go
  expert-parallel when mesh.expert > 1."""
  model = Transformer(model_cfg)
  tx = make_optimizer(cfg.optimizer, cfg.total_steps, run_lr_schedule(cfg))
  state_sh = state_shardings(model, tx, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  train_fn, eval_fn = jit_steps(model, tx, cfg, state_sh, batch_sh)
  init_fn = jax.jit(lambda rng: init_state(model, tx, rng), out_shardings=state_sh)
  return Program(cfg=cfg, model=model, tx=tx, mesh=mesh, state_sh=state_sh,
                 batch_sh=batch_sh, train_fn=sharding.with_mesh(mesh, train_fn),
                 eval_fn=sharding.with_mesh(mesh, eval_fn), init_fn=init_fn,
                 stage_cfgs=stage_cfgs or {cfg.batch_size: cfg})
