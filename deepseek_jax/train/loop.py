"""The training loop: mesh / input / model / shard / step / loop, one flat function.

`train(cfg, workdir)` trains any config from a laptop CPU to a multi-host pod and
resumes exactly from the newest checkpoint in `workdir`. Metrics of step s are pulled
to the host after step s+1 is dispatched, so the device never waits for the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from absl import logging

from deepseek_jax import balancing
from deepseek_jax.data import corpus as corpus_lib
from deepseek_jax.train import batches as batches_lib
from deepseek_jax.train import multihost, sharding
from deepseek_jax.train.checkpoint import (Checkpointer, CheckpointNotSaved, WorkdirBusy,
                                           WorkdirConflict, WorkdirLock,
                                           check_workdir_config, read_config)
from deepseek_jax.model.config import model_config_from
from deepseek_jax.model.param_count import count_params
from deepseek_jax.train.recipe import Recipe
from deepseek_jax.train.metrics import MetricWriter, measure_matmul_peak, train_flops_per_token
from deepseek_jax.model.transformer import Transformer, abstract_variables
from deepseek_jax.train.step import (TrainState, balance_hparams, init_state, jit_steps,
                                     make_optimizer, run_lr_schedule)


class NonFiniteLoss(FloatingPointError):
  pass


# Errors that stop a run with a message that says what happened and what to do: the
# entry point prints the message alone, without a traceback.
RUN_ERRORS = (NonFiniteLoss, CheckpointNotSaved, WorkdirBusy, WorkdirConflict)


class ConfigError(ValueError):
  """The run's input (config values, mesh, data paths, a dataset that does not fit the
  config) cannot start a run; the message names the problem and the fix. Raised before
  anything is built or saved; the entry point prints it alone and exits with status 2."""


@contextlib.contextmanager
def user_input():
  """Within: a ValueError or FileNotFoundError is about the run's input (the checks and
  loading that come before any building), re-raised as ConfigError."""
  try:
    yield
  except RUN_ERRORS:
    raise
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e


class ZeroGradWatch:
  """A gradient norm of exactly 0 for `steps` steps in a row: the model has stopped
  learning while the loss stays finite (the non-finite check does not see it)."""

  def __init__(self, steps: int = 3):
    self.steps, self.run = steps, 0

  def __call__(self, step: int, loss: float, grad_norm: float) -> str | None:
    self.run = self.run + 1 if grad_norm == 0.0 else 0
    if self.run != self.steps:
      return None
    return (f"gradient norm exactly 0 for {self.steps} steps in a row (steps "
            f"{step - self.steps + 1}-{step}, loss {loss:.4f}): the model has stopped "
            "learning (saturated or dead activations, often a learning rate far too high)")


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


def build_steps(cfg, model_cfg, mesh):
  """The model, optimizer, shardings and jitted steps of a run on `mesh`: what train()
  runs, and what experiments.compile compiles for a TPU topology.

  Returns (model, tx, state_shardings, batch_sharding, train_fn, eval_fn, init_fn)."""
  model = Transformer(model_cfg)
  tx = make_optimizer(cfg.optimizer, cfg.total_steps, run_lr_schedule(cfg))
  state_sh = state_shardings(model, tx, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  train_fn, eval_fn = jit_steps(model, tx, cfg, state_sh, batch_sh)
  # Steps trace under the mesh: MoE layers go expert-parallel when mesh.expert > 1.
  train_fn, eval_fn = sharding.with_mesh(mesh, train_fn), sharding.with_mesh(mesh, eval_fn)
  init_fn = jax.jit(lambda rng: init_state(model, tx, rng), out_shardings=state_sh)
  return model, tx, state_sh, batch_sh, train_fn, eval_fn, init_fn


class _Preemption:
  """SIGTERM (preemption) and a first Ctrl-C (SIGINT) ask the loop to save and exit
  cleanly; a second Ctrl-C stops at once (KeyboardInterrupt), without saving."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass

  def restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    logging.warning("%s: saving a checkpoint and exiting (rerun the same command to "
                    "resume)%s", name,
                    "; Ctrl-C again stops at once, without saving"
                    if signum == signal.SIGINT else "")
    self.requested = True


def describe_run(cfg, model_cfg, mesh) -> str:
  """One line a researcher checks before a run starts: model, mesh, batch, balancing."""
  c = count_params(model_cfg)
  b = cfg.balance
  alphas = [f"{k} {b[k + '_alpha']:g}" for k in ("aux", "seq_aux", "batch_aux")
            if b[k + "_alpha"]]
  bias = f"bias u {b.bias_rate:g} ({b.bias_rule})" if b.bias_rate else ""
  mesh_s = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
  return (f"model {c['total'] / 1e6:.2f}M params ({c['activated'] / 1e6:.2f}M activated), "
          f"{model_cfg.n_layers} layers of which {model_cfg.n_moe_layers} MoE "
          f"({model_cfg.n_shared_experts} shared + {model_cfg.n_routed_experts} routed, "
          f"top-{model_cfg.top_k}), MTP depth {model_cfg.mtp_depth} | mesh {mesh_s} | "
          f"batch {cfg.batch_size} x {cfg.seq_len}{_ramp(cfg)}, {cfg.total_steps} steps, "
          f"{cfg.microbatches} microbatch(es) | balancing: "
          + (", ".join(alphas + [bias] if bias else alphas) or "none")
          + _scopes(cfg))


def _scopes(cfg) -> str:
  scopes = balancing.term_scopes(cfg.balance, int(cfg.microbatches))
  return (" | counted over: " + ", ".join(f"{k} {v}" for k, v in scopes.items())
          if scopes else "")


def _ramp(cfg) -> str:
  stages = Recipe(cfg).stages
  if len(stages) == 1:
    return ""
  return " (ramp: " + ", ".join(f"{s.batch} from step {s.start_step}" for s in stages) + ")"


def _global_batch(local, batch_sh):
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}


def _packed_rows(streams, weights, cfg, split: str):
  """A split's rows, refused before training when it cannot fill one batch (evaluation
  would otherwise fail after the last step, before the final save)."""
  more = "raise" if split == "validation" else "lower"
  if cfg.data.source == "prepared":   # the split was made at prepare time
    size = "larger" if split == "validation" else "smaller"
    knob = (f"prepare the data again with `experiments.prepare_data` and a {size} "
            f"--val_fraction (data.val_fraction does not act on prepared data)")
  else:
    knob = f"{more} data.val_fraction (now {cfg.data.val_fraction})"
  fix = f"{knob}, or lower batch_size (now {cfg.batch_size}) or seq_len (now {cfg.seq_len})"
  try:
    rows = batches_lib.packed_rows(streams, weights, cfg.seq_len, cfg.seed,
                                   shuffle=split == "training")
  except ValueError as e:
    raise ValueError(f"the {split} split: {e}; {fix}") from None
  if rows.n_rows < cfg.batch_size:
    raise ValueError(f"the {split} split holds {rows.n_rows} rows of seq_len + 1 = "
                     f"{cfg.seq_len + 1} tokens, fewer than one batch of batch_size="
                     f"{cfg.batch_size}; {fix}")
  return rows


# Evaluation steps allowed in flight between host syncs: hundreds of queued cross-process
# collectives deadlocked Gloo (docs/design.md, "Multi-host"); a sync also asks whether to
# stop for a preemption.
EVAL_SYNC_EVERY = 8


@functools.partial(jax.jit, donate_argnums=0)
def _sum_batches(acc, out):
  return jax.tree.map(jnp.add, acc, out)


@jax.jit
def _sum_sequences(acc):
  return jax.tree.map(lambda a: a.sum(0), acc)


def evaluate(eval_fn, state, rows, cfg, batch_sh, n_batches, n_moe_layers,
             stop=lambda: False):
  """Validation over fixed batches: loss, perplexity, MTP loss per depth, MaxVio_global.

  The per-sequence sums of each batch (step.eval_step) are added on device, where each
  data shard keeps its own rows, and reduced over the batch once at the end: a batch
  costs no cross-process reduction. stop() is asked every EVAL_SYNC_EVERY batches (with
  every process's answer): True abandons the evaluation and returns None."""
  acc, t0 = None, time.perf_counter()
  batches = batches_lib.validation_batches(rows, cfg.batch_size, n_batches, jax.process_index(),
                                    jax.process_count())
  total = rows.n_rows // cfg.batch_size
  n = total if n_batches is None else min(n_batches, total)
  logging.info("evaluating %d batch(es) of %d x %d", n, cfg.batch_size, cfg.seq_len)
  for i, local in enumerate(batches):
    out = eval_fn(state, _global_batch(local, batch_sh))
    acc = out if acc is None else _sum_batches(acc, out)
    if (i + 1) % EVAL_SYNC_EVERY == 0:
      jax.block_until_ready(acc)
      if multihost.any_process(stop()):
        return None
  sums = jax.device_get(_sum_sequences(acc))
  tokens = max(float(sums["n_tokens"]), 1.0)
  result = {"val_loss": float(sums["ce_sum"]) / tokens, "eval_batches": n,
            "eval_seconds": time.perf_counter() - t0}
  result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
  if "mtp_sum" in sums:
    result["val_mtp"] = (np.asarray(sums["mtp_sum"])
                         / np.maximum(np.asarray(sums["mtp_tokens"]), 1.0)).tolist()
  if "load" in sums:
    mv = np.asarray(jax.device_get(balancing.max_violation(sums["load"])))
    result["val_load"] = np.asarray(sums["load"]).tolist()
    result["maxvio_global"] = mv.tolist()
    result["maxvio_global_mean"] = float(mv[:n_moe_layers].mean())
  return result


def _compile_first_steps(train_fn, eval_fn, state, hparams, val_rows, cfg, batch_sh,
                         train_batch: int):
  """Compiles the first train step and the eval step ahead of their first call (which
  then reuses them), so that a barrier after this is passed by compiled processes only."""
  local = next(batches_lib.validation_batches(val_rows, cfg.batch_size, 1, jax.process_index(),
                                       jax.process_count()))
  def spec(rows):
    return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype, sharding=batch_sh)
            for k, v in local.items()}
  train_fn.lower(state, spec(train_batch), hparams).compile()
  eval_fn.lower(state, spec(cfg.batch_size)).compile()


def train(cfg, workdir: str, *, peak_flops: float | None = None, quiet: bool = False,
          devices=None):
  """Trains cfg in workdir (resuming if it holds a checkpoint); returns the last metrics.

  devices: the devices of the mesh (default all; tests pass one to get an unsharded run).
  The workdir is locked for the run (checkpoint.WorkdirLock): a second training of it is
  refused.
  """
  # Mesh ---------------------------------------------------------------------------
  with user_input():
    mesh = sharding.make_mesh(cfg.mesh, devices, cfg.model.d_model)
    stages = stage_configs(cfg, mesh)     # every input checked before anything builds
    cfg = resolve_microbatches(cfg, mesh)
    validate_run_config(cfg, mesh)
  if jax.process_index() != 0:
    return _train(cfg, workdir, mesh, peak_flops, quiet, stages)
  with WorkdirLock(workdir):
    return _train(cfg, workdir, mesh, peak_flops, quiet, stages)


def _load_corpus(data_cfg, vocab_size: int) -> corpus_lib.Corpus:
  """The run's data. With several processes, a default built on first use (stdlib /
  files) is prepared by process 0 while the others wait; they then find it (a shared
  file system) or prepare their own copy (a disk per host), so a shared cache is
  prepared once. A failure in process 0 reaches the others as their own: it is raised
  after the barrier, and they meet the same input."""
  if jax.process_count() > 1 and data_cfg.source != "prepared":
    failed = None
    if jax.process_index() == 0:
      try:
        corpus_lib.prepared_dirs(data_cfg, vocab_size)
      except Exception as e:  # noqa: BLE001 (re-raised below, after the barrier)
        failed = e
    else:
      logging.info("waiting for process 0 to prepare the data")
    multihost.barrier("deepseek_jax_data_prepared")
    if failed is not None:
      raise failed
  return corpus_lib.load_corpus(data_cfg, vocab_size)


@dataclasses.dataclass(frozen=True)
class _Inputs:
  model_cfg: object
  saved_cfg: dict | None     # the config of the run resumed (None: a new run)
  corpus: corpus_lib.Corpus
  val_rows: object
  recipe: Recipe
  schedule: batches_lib.BatchSchedule
  hparams: dict


def _inputs(cfg, workdir: str) -> _Inputs:
  """Everything a run reads before it builds anything, each failure a ConfigError."""
  with user_input():
    model_cfg = model_config_from(cfg.model)
    saved_cfg = read_config(workdir)
    resuming = check_workdir_config(workdir, cfg.to_dict())
    corpus = _load_corpus(cfg.data, model_cfg.vocab_size)
    train_rows = _packed_rows(corpus.train, corpus.weights, cfg, "training")
    val_rows = _packed_rows(corpus.val, corpus.weights, cfg, "validation")
    recipe = Recipe(cfg)
    schedule = batches_lib.BatchSchedule(train_rows, cfg.batch_size, cfg.seed,
                                         [(s.start_step, s.batch) for s in recipe.stages],
                                         cfg.data.get("composition", "mixed"),
                                         int(cfg.microbatches))
    hparams = jax.tree.map(jnp.float32, balance_hparams(cfg))
  return _Inputs(model_cfg, saved_cfg if resuming else None, corpus, val_rows, recipe,
                 schedule, hparams)


def describe_resume(saved: dict, cfg, step: int) -> str | None:
  """What a changed total_steps does to the steps still to train, from step on (None if
  it is unchanged): the learning rate there under the saved and the new schedule, where
  the decay now ends and when the bias freezes."""
  old_total = saved.get("total_steps")
  if old_total == cfg.total_steps:
    return None
  import ml_collections
  old = ml_collections.ConfigDict(saved)
  lr_old, lr_new = (float(run_lr_schedule(c)(step)) for c in (old, cfg))
  freeze_old, freeze_new = (int(balance_hparams(c)["bias_freeze_step"]) for c in (old, cfg))
  if step >= cfg.total_steps:
    return (f"total_steps {old_total} -> {cfg.total_steps}: the run is already at step "
            f"{step}; nothing to train")
  text = (f"total_steps {old_total} -> {cfg.total_steps}: steps {step}-{cfg.total_steps} "
          f"follow the learning-rate schedule of {cfg.total_steps} steps, which gives "
          f"{lr_new:.3g} at step {step} where the saved run's gave {lr_old:.3g}")
  if freeze_old != freeze_new:
    text += (f"; the expert bias freezes at step {freeze_new} (was {freeze_old})")
  return text + (". The steps already trained keep the schedule they had: the result "
                 "is not the run that set this total from the start")


def initialized_from(spec: str, state, abstract):
  """state with the parameters and balancing bias of run `spec` (WORKDIR or WORKDIR:STEP,
  default its latest step), restored onto this run's shardings; the optimizer and the
  step stay fresh (a new stage: a context extension)."""
  workdir, step = spec, None
  if m := re.fullmatch(r"(.*):(\d+)", spec):
    workdir, step = m.group(1), int(m.group(2))
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ConfigError(f"config.init_from={spec!r}: {workdir} holds no checkpoints/ (give "
                      "a training run's workdir, optionally :STEP)")
  parts = {"params": abstract.params}
  if abstract.expert_bias is not None:
    parts["expert_bias"] = abstract.expert_bias
  src = Checkpointer(workdir, keep=1, async_save=False)
  try:
    restored, at = src.restore_parts(step, parts)
  except FileNotFoundError as e:
    raise ConfigError(f"config.init_from={spec!r}: {e}") from None
  finally:
    src.close()
  logging.info("initialised from %s step %d (parameters%s; optimizer and step fresh)",
               workdir, at, " and expert bias" if "expert_bias" in parts else "")
  return state.replace(**restored)


def _train(cfg, workdir: str, mesh, peak_flops, quiet: bool, stage_cfgs: dict):
  inputs = _inputs(cfg, workdir)
  model_cfg, resuming, corpus = inputs.model_cfg, inputs.saved_cfg is not None, inputs.corpus
  val_rows, recipe, schedule = inputs.val_rows, inputs.recipe, inputs.schedule
  hparams = inputs.hparams
  is_main = jax.process_index() == 0
  logging.info("run: %s", describe_run(cfg, model_cfg, mesh))
  logging.info("data: %s", corpus_lib.describe(corpus))

  # Model and shardings ------------------------------------------------------------------
  model, tx, state_sh, batch_sh, train_fn, eval_fn, init_fn = build_steps(cfg, model_cfg, mesh)
  # A batch-size ramp: one compiled train step per stage, built when first reached.
  train_fns = {cfg.batch_size: train_fn}

  def stage_train_fn(batch_size):
    if batch_size not in train_fns:
      fn, _ = jit_steps(model, tx, stage_cfgs[batch_size], state_sh, batch_sh)
      train_fns[batch_size] = sharding.with_mesh(mesh, fn)
      logging.info("batch-size stage %d x %d: its own train step (%d microbatch(es))",
                   batch_size, cfg.seq_len, stage_cfgs[batch_size].microbatches)
    return train_fns[batch_size]

  ckpt = Checkpointer(workdir, cfg.keep_checkpoints, training=True)
  writer = MetricWriter(workdir, cfg.total_steps, enabled=is_main and not quiet)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init_fn, jax.random.PRNGKey(cfg.seed)), state_sh)
  restored = ckpt.restore_latest(abstract, set_aside_corrupt=True) if resuming else None
  if restored is None and ckpt.steps():
    raise RuntimeError(f"{workdir} has checkpoints but no config.json; refusing to start over")
  if restored is not None:
    state, meta, step = restored
    saved_tok = meta.get("tokenizer")
    if saved_tok is not None and saved_tok != corpus.manifest["tokenizer"]:
      raise WorkdirConflict(
          f"the data's tokenizer ({corpus.manifest['tokenizer']}) is not the one step "
          f"{step} in {ckpt.directory} was trained with ({saved_tok}): the prepared data "
          "was rebuilt with another tokenizer. Use a new --workdir, or the data the run "
          "started with; the saved run is left untouched.")
    logging.info("resumed from step %d (%s)", step, ckpt.directory)
    change = describe_resume(inputs.saved_cfg, cfg, step)
    if change:
      logging.warning("%s", change)
    if is_main:
      writer.truncate_after(step)
  else:
    state = init_fn(jax.random.PRNGKey(cfg.seed))
    step = 0
    if cfg.get("init_from"):
      state = initialized_from(cfg.init_from, state, abstract)

  flops_per_token = train_flops_per_token(model_cfg, cfg.seq_len)
  if peak_flops is None:
    peak_flops = measure_matmul_peak() * jax.process_count()
  preempt = _Preemption()
  n_eval = None if cfg.eval_batches < 0 else cfg.eval_batches

  # Loop ---------------------------------------------------------------------------
  n_moe = model_cfg.n_moe_layers
  final_batches = cfg.get("final_eval_batches", -1)
  final_eval = None if final_batches is None or final_batches < 0 else final_batches
  pending = None          # (step, device metrics) of the last dispatched step
  preempted = False
  last = {}
  clock = {"pulled": time.perf_counter(), "window": time.perf_counter(), "since": step}
  t_start, start_step = time.perf_counter(), step

  zero_grads = ZeroGradWatch()

  groups = sorted(abstract.params.keys())   # the train step's "grad_finite" order
  skipped_run = []                          # the current run of skipped steps

  def pull(p):
    """Host copy of step p's metrics. A skipped step (non-finite loss or gradient norm:
    the train step did not apply it) is logged; cfg.max_skipped_steps + 1 in a row stop
    the run before anything saves (the state holds no update of a skipped step)."""
    s, dev_metrics = p
    m = jax.device_get(dev_metrics)
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if m["skipped"]:   # the step's own test: loss or gradient norm not finite
      what = " and ".join(name for name, v in (("loss", loss), ("gradient norm", gnorm))
                          if not math.isfinite(v)) or "update"
      bad = [g for g, fin in zip(groups, np.asarray(m.get("grad_finite", []))) if not fin]
      where = f" (non-finite gradients in {', '.join(bad)})" if bad else ""
      skipped_run.append(s)
      if len(skipped_run) > cfg.get("max_skipped_steps", 3):
        ckpt.wait()
        saved = ckpt.steps()
        raise NonFiniteLoss(
            f"non-finite {what} at step {s}{where}: {len(skipped_run)} step(s) in a row "
            f"(steps {skipped_run[0]}-{s}) were skipped, more than max_skipped_steps="
            f"{cfg.get('max_skipped_steps', 3)}; training stopped. The skipped steps "
            f"changed nothing; the latest checkpoint is step "
            f"{saved[-1] if saved else None} in {ckpt.directory} (its parameters are "
            "finite; a diverging run can still hold huge ones there: lower the learning "
            "rate before resuming from it)")
      logging.warning("step %d skipped: non-finite %s (loss %s, gradient norm %s)%s; "
                      "parameters and optimizer state left as they were", s, what, loss,
                      gnorm, where)
    else:
      skipped_run.clear()
    stalled = zero_grads(s, loss, gnorm)
    if stalled:
      logging.warning("%s", stalled)
    if "maxvio" in m:  # the mean over the main model's MoE layers (MTP rows excluded)
      m["maxvio_mean"] = float(np.mean(m["maxvio"][:n_moe]))
    now = time.perf_counter()
    m["step_time"] = now - clock["pulled"]
    clock["pulled"] = now
    return m

  def record(s, m, extra=None, console=False, now=None):
    nonlocal last
    m.update(extra or {})
    if console or (s + 1) % cfg.log_every == 0:
      now = now or time.perf_counter()
      steps, dt = s + 1 - clock["since"], now - clock["window"]
      if steps > 0 and dt > 0:
        tokens = recipe.tokens_at_step(s + 1) - recipe.tokens_at_step(clock["since"])
        m["tokens_per_s"] = tokens / dt
        m["mfu"] = tokens * flops_per_token / dt / peak_flops
      clock.update(window=now, since=s + 1)
      done = s + 1 - start_step
      writer.console(s + 1, m, (now - t_start) / done * (cfg.total_steps - s - 1))
    writer.write(s, m)
    last = m

  if jax.process_count() > 1:   # no process opens a collective while another compiles
    _compile_first_steps(stage_train_fn(schedule.batch_size_at(step)), eval_fn, state,
                         hparams, val_rows, cfg, batch_sh, schedule.batch_size_at(step))
    multihost.barrier("deepseek_jax_steps_compiled")

  loader = batches_lib.Prefetcher(
      lambda s: schedule.batch(s, jax.process_index(), jax.process_count()),
      cfg.data.prefetch, cfg.data.loader_threads, stop=cfg.total_steps)
  try:
    while step < cfg.total_steps:
      batch = _global_batch(loader.get(step), batch_sh)
      state, metrics = stage_train_fn(schedule.batch_size_at(step))(state, batch, hparams)
      ckpt.poll()   # a finished background write is logged as saved, a failed one stops
      if pending is not None:
        record(pending[0], pull(pending))
      pending = (step, metrics)
      step += 1
      preempted = multihost.any_process(preempt.requested)   # every process stops at one step
      eval_due = step % cfg.eval_every == 0 or step == cfg.total_steps
      save_due = (step % cfg.checkpoint_every == 0 or step == cfg.total_steps
                  or preempted)
      if eval_due or save_due:
        m = pull(pending)   # verified finite before anything is saved
        t_trained, extra = time.perf_counter(), {}
        if eval_due and not preempted:
          n = final_eval if step == cfg.total_steps else n_eval
          extra = evaluate(eval_fn, state, val_rows, cfg, batch_sh, n, n_moe,
                           stop=lambda: preempt.requested)
          if extra is None:   # a preemption signal arrived during it: save and exit
            logging.warning("evaluation at step %d abandoned for the preemption", step)
            preempted, save_due, extra = True, True, {}
        record(pending[0], m, extra, console=eval_due, now=t_trained)
        pending = None
        if save_due:
          ckpt.save(step, state, {"data_step": step, "config": cfg.to_dict(),
                                  "tokenizer": corpus.manifest["tokenizer"]},
                    force=preempted)   # logged once its write is confirmed
        # Evaluation and saving are not training time.
        clock["pulled"] = clock["window"] = time.perf_counter()
        clock["since"] = step
        if preempted:
          break
  finally:
    loader.close()
    ckpt.close()
    writer.close()
    preempt.restore()
  last["step"] = step
  last["preempted"] = preempted
  return last
