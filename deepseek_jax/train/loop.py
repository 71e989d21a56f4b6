"""The training loop: inputs, the program (train/program.py), restore or initialise,
then step / log / evaluate / save until total_steps or a preemption.

`train(cfg, workdir)` trains any config from a laptop CPU to a multi-host pod and
resumes exactly from the newest checkpoint in `workdir`. Metrics of step s are pulled
to the host after step s+1 is dispatched, so the device never waits for the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
from absl import logging

from deepseek_jax import balancing
from deepseek_jax.data import corpus as corpus_lib
from deepseek_jax.train import batches as batches_lib
from deepseek_jax.train import multihost, program as program_lib, sharding, validation
from deepseek_jax.train.checkpoint import (Checkpointer, CheckpointNotSaved, WorkdirBusy,
                                           WorkdirConflict, WorkdirLock,
                                           check_workdir_config, read_config)
from deepseek_jax.model.config import model_config_from
from deepseek_jax.model.param_count import count_params
from deepseek_jax.train.recipe import Recipe
from deepseek_jax.train.metrics import MetricWriter, measure_matmul_peak, train_flops_per_token
from deepseek_jax.train.step import balance_hparams, run_lr_schedule
from deepseek_jax.train.step_log import NonFiniteLoss, StepLog


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


def _compile_first_steps(train_fn, eval_fn, state, hparams, val_rows, cfg, batch_sh,
                         train_batch: int):
  """Compiles the first train step and the eval step ahead of their first call (which
  then reuses them), so that a barrier after this is passed by compiled processes only."""
  local = next(batches_lib.validation_batches(val_rows, cfg.batch_size, 1,
                                              jax.process_index(), jax.process_count()))
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
    stages = program_lib.stage_configs(cfg, mesh)   # every input checked before building
    cfg = program_lib.resolve_microbatches(cfg, mesh)
    program_lib.validate_run_config(cfg, mesh)
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
                                         cfg.data.composition, int(cfg.microbatches))
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


def _start_state(cfg, workdir, ckpt, program, inputs, writer):
  """(state, step): the newest checkpoint's when resuming, else a fresh state (from
  config.init_from's parameters when it names a run)."""
  abstract = program.abstract_state(cfg.seed)
  resuming = inputs.saved_cfg is not None
  restored = ckpt.restore_latest(abstract, set_aside_corrupt=True) if resuming else None
  if restored is None and ckpt.steps():
    raise RuntimeError(f"{workdir} has checkpoints but no config.json; refusing to start "
                       "over")
  if restored is None:
    state = program.init_fn(jax.random.PRNGKey(cfg.seed))
    if cfg.init_from:
      state = initialized_from(cfg.init_from, state, abstract)
    return state, 0
  state, meta, step = restored
  tokenizer = inputs.corpus.manifest["tokenizer"]
  if meta.get("tokenizer") is not None and meta["tokenizer"] != tokenizer:
    raise WorkdirConflict(
        f"the data's tokenizer ({tokenizer}) is not the one step {step} in "
        f"{ckpt.directory} was trained with ({meta['tokenizer']}): the prepared data was "
        "rebuilt with another tokenizer. Use a new --workdir, or the data the run started "
        "with; the saved run is left untouched.")
  logging.info("resumed from step %d (%s)", step, ckpt.directory)
  change = describe_resume(inputs.saved_cfg, cfg, step)
  if change:
    logging.warning("%s", change)
  if jax.process_index() == 0:
    writer.truncate_after(step)
  return state, step


def _eval_batches(n: int | None) -> int | None:
  """A config's evaluation batch count: None (a negative value) is the whole split."""
  return None if n is None or n < 0 else n


def _train(cfg, workdir: str, mesh, peak_flops, quiet: bool, stage_cfgs: dict):
  inputs = _inputs(cfg, workdir)
  model_cfg, schedule, hparams = inputs.model_cfg, inputs.schedule, inputs.hparams
  logging.info("run: %s", describe_run(cfg, model_cfg, mesh))
  logging.info("data: %s", corpus_lib.describe(inputs.corpus))
  program = program_lib.build(cfg, model_cfg, mesh, stage_cfgs)
  ckpt = Checkpointer(workdir, cfg.keep_checkpoints, training=True)
  writer = MetricWriter(workdir, cfg.total_steps,
                        enabled=jax.process_index() == 0 and not quiet)
  state, step = _start_state(cfg, workdir, ckpt, program, inputs, writer)
  if peak_flops is None:
    peak_flops = measure_matmul_peak() * jax.process_count()
  log = StepLog(cfg, writer=writer, recipe=inputs.recipe, ckpt=ckpt,
                groups=sorted(state.params.keys()),   # the train step's "grad_finite" order
                n_moe_layers=model_cfg.n_moe_layers,
                flops_per_token=train_flops_per_token(model_cfg, cfg.seq_len),
                peak_flops=peak_flops, start_step=step)
  if jax.process_count() > 1:   # no process opens a collective while another compiles
    _compile_first_steps(program.train_fn_for(schedule.batch_size_at(step)),
                         program.eval_fn, state, hparams, inputs.val_rows, cfg,
                         program.batch_sh, schedule.batch_size_at(step))
    multihost.barrier("deepseek_jax_steps_compiled")

  preempt = _Preemption()
  loader = batches_lib.Prefetcher(
      lambda s: schedule.batch(s, jax.process_index(), jax.process_count()),
      cfg.data.prefetch, cfg.data.loader_threads, stop=cfg.total_steps)
  pending, preempted = None, False   # pending: (step, device metrics) not yet pulled
  try:
    while step < cfg.total_steps:
      batch = validation.global_batch(loader.get(step), program.batch_sh)
      state, metrics = program.train_fn_for(schedule.batch_size_at(step))(state, batch,
                                                                          hparams)
      ckpt.poll()   # a finished background write is logged as saved, a failed one stops
      if pending is not None:
        log.record(pending[0], log.pull(pending))
      pending = (step, metrics)
      step += 1
      preempted = multihost.any_process(preempt.requested)   # every process stops at one step
      eval_due = step % cfg.eval_every == 0 or step == cfg.total_steps
      save_due = step % cfg.checkpoint_every == 0 or step == cfg.total_steps or preempted
      if not (eval_due or save_due):
        continue
      m = log.pull(pending)   # verified finite before anything is saved
      t_trained, extra = time.perf_counter(), {}
      if eval_due and not preempted:
        n = cfg.final_eval_batches if step == cfg.total_steps else cfg.eval_batches
        extra = validation.evaluate(program.eval_fn, state, inputs.val_rows, cfg,
                                    program.batch_sh, _eval_batches(n),
                                    model_cfg.n_moe_layers, stop=lambda: preempt.requested)
        if extra is None:   # a preemption signal arrived during it: save and exit
          logging.warning("evaluation at step %d abandoned for the preemption", step)
          preempted, save_due, extra = True, True, {}
      log.record(pending[0], m, extra, console=eval_due, now=t_trained)
      pending = None
      if save_due:
        ckpt.save(step, state, {"data_step": step, "config": cfg.to_dict(),
                                "tokenizer": inputs.corpus.manifest["tokenizer"]},
                  force=preempted)   # logged once its write is confirmed
      log.paused(step)
      if preempted:
        break
  finally:
    loader.close()
    ckpt.close()
    writer.close()
    preempt.restore()
  return {**log.last, "step": step, "preempted": preempted}
