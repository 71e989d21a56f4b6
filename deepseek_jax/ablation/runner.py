"""The balancing ablation: the same data, seed and budget for each strategy, then a report.

Each strategy trains in WORKDIR/<name> (WORKDIR/<name>_seed<k> with several seeds)
through the ordinary trainer, so an interrupted ablation resumes where it stopped and a
finished run is not retrained.

Sweeps (instead of a strategy list):
  rate    the sign-rule bias at u in RATE_SWEEP (LFB Fig. 4)
  pareto  the aux-loss dilemma (LFB Sec. 2.2; V3 4.5.3): every family that can trade
          balance for loss, each at every alpha of PARETO_ALPHAS (the classic aux loss
          alpha * sum_i f_i mean(s_i); the batch-wise and sequence-wise losses on
          normalised affinities), the sign-rule bias at every u of RATE_SWEEP, Quantile
          Balancing, and no balancing; the report draws validation loss against
          MaxVio_global per family
  lfb_softmax  LFB's softmax-gate setting (run with --gate=softmax): the magnitude-rule
          bias at every u of RATE_SWEEP against the classic aux loss at alpha 1e-4, 3e-4
          (the appendix's) and 1e-3

`reuse` folders (earlier ablations, e.g. the main job's) lend their finished runs: a run
whose config.json equals a planned run's config is copied in instead of retrained. An
interrupted sweep resumes by run name (each run's workdir resumes itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from absl import logging

from configs import common
from deepseek_jax import balancing
from deepseek_jax.ablation import report, saved_runs
from deepseek_jax.train import checkpoint
from deepseek_jax.train import loop as trainer

# The main job: no balancing, the aux loss, the aux-loss-free bias and Quantile Balancing,
# which fit the 15-minute budget on 2 CPU cores (BUILD_NOTES.md, "Balancing ablation (the
# main job)"); README.md's headline table and its definitions (tests/test_balancing.py).
DEFAULT_STRATEGIES = ("none", "aux", "bias", "quantile")
RATE_SWEEP = (1e-4, 1e-3, 1e-2)          # LFB Fig. 4
PARETO_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1)  # every loss's alpha, LFB's 1e-3 in the middle
# The balance losses that can trade balance for loss (configs/small.py ALPHA_OF).
PARETO_LOSSES = ("aux", "batch_aux", "seq_aux")
LFB_SOFTMAX_ALPHAS = (1e-4, 3e-4, 1e-3)
SWEEPS = ("rate", "pareto", "lfb_softmax")


class Interrupted(RuntimeError):
  """A run was stopped by SIGTERM or Ctrl-C after saving: the ablation stops too (its
  finished and saved runs resume with the same command)."""


def plan(strategies, sweep: str | None):
  """[(run name, config arg)] for the requested strategies or sweep."""
  rate = [(f"bias_u{u:g}", f"strategy=bias,rate={u:g}") for u in RATE_SWEEP]
  if sweep == "rate":
    return rate
  if sweep == "lfb_softmax":
    # LFB's softmax-gate comparison as the issue reads its appendix: the magnitude
    # update rule for the bias, the classic aux loss at 3e-4 and the alphas around it.
    return ([(f"aux_a{a:g}", f"strategy=aux,alpha={a:g}") for a in LFB_SOFTMAX_ALPHAS]
            + [(f"bias_magnitude_u{u:g}", f"strategy=bias_magnitude,rate={u:g}")
               for u in RATE_SWEEP])
  if sweep == "pareto":
    return ([("none", "strategy=none")]
            + [(f"{loss}_a{a:g}", f"strategy={loss},alpha={a:g}")
               for loss in PARETO_LOSSES for a in PARETO_ALPHAS]
            + rate + [("quantile", "strategy=quantile")])
  if sweep:
    raise ValueError(f"--sweep must be one of {SWEEPS} or empty; got {sweep!r}")
  for s in strategies:
    balancing.strategy(s)      # an unknown name: a ValueError naming the known ones
  return [(s, f"strategy={s}") for s in strategies]


def run_name(name: str, seed: int, seeds) -> str:
  return name if len(seeds) == 1 else f"{name}_seed{seed}"


def config_key(cfg_dict: dict) -> str:
  """A run's identity: the hash of its config as config.json records it, without the
  fields a run may change on resume (logging, loader settings: checkpoint.resumable)."""
  def strip(d, prefix=""):
    return {k: strip(v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in d.items() if not checkpoint.resumable(prefix + k)}
  text = json.dumps(strip(json.loads(json.dumps(cfg_dict))), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_runs(folders) -> dict:
  """{config_key: run folder} of every finished run (its last evaluation at its last
  step) directly under `folders`; the first folder wins a tie."""
  found = {}
  for folder in folders:
    if not os.path.isdir(folder):
      raise ValueError(f"--reuse: {folder} is not a folder")
    for entry in sorted(os.listdir(folder)):
      d = os.path.join(folder, entry)
      if not os.path.isfile(os.path.join(d, checkpoint.CONFIG_FILE)):
        continue
      try:
        run = saved_runs.load_run(d)
        done = saved_runs.summarize(run)["steps"] == run["config"]["total_steps"]
      except (OSError, ValueError, KeyError):
        done = False
      if done:
        found.setdefault(config_key(run["config"]), d)
  return found


def copy_reusable(jobs, workdir: str, folders) -> list[str]:
  """Copies each job's finished twin from `folders` into workdir/<name> (when that does
  not exist yet). Returns the names reused."""
  found = finished_runs(folders)
  reused = []
  for name, cfg in jobs:
    dst = os.path.join(workdir, name)
    src = found.get(config_key(cfg.to_dict()))
    if src and not os.path.exists(dst) and os.path.abspath(src) != os.path.abspath(dst):
      shutil.copytree(src, dst)
      reused.append(name)
      print(f"=== {name}: reusing {src} (the same config, finished)", flush=True)
  return reused


def run(get_config, runs, workdir: str, *, size: str, steps: int | None, seeds=(0,),
        peak_flops: float | None = None, overrides=None, parallel: int = 1, reuse=(),
        gate: str = "sigmoid"):
  """Trains every (name, arg) of `runs` on every seed, then writes the report. parallel > 1
  trains that many runs at once, each in its own process (see _run_in_lanes); `reuse`
  folders lend finished runs of the same config (copy_reusable); `gate` is the router's
  affinity function for every run (sigmoid or softmax)."""
  t0 = time.perf_counter()
  jobs = []
  for seed in seeds:
    for name, arg in runs:
      cfg = get_config(f"{arg},size={size},gate={gate}")
      if steps:
        cfg.total_steps = steps
        cfg.eval_every = max(steps // 6, 1)
        cfg.checkpoint_every = steps
        cfg.optimizer.warmup_steps = max(steps // 20, 1)
      cfg.seed = int(seed)
      jobs.append((run_name(name, seed, seeds), cfg))
  apply_overrides(jobs, overrides or {})
  train_jobs(jobs, workdir, peak_flops=peak_flops, parallel=parallel, reuse=reuse)
  runs_data = {name: saved_runs.load_run(os.path.join(workdir, name)) for name, _ in jobs}
  results = report.write_report(runs_data, workdir)
  logging.info("ablation done in %.0fs", time.perf_counter() - t0)
  return results


def _leaves(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def apply_overrides(jobs, overrides: dict):
  """The user's overrides ({dotted path: value}, e.g. --config.PATH=VALUE) on every job's
  config, after the job's own settings (strategy, seed, steps, ...), which they win
  over; except a field the jobs set differently from one another (what the sweep
  compares: a strategy's knob, the seed under several seeds, a scope), which would make
  the runs the same: a ValueError naming it."""
  leaves = [_leaves(cfg.to_dict()) for _, cfg in jobs]
  for path in overrides:
    values = sorted({repr(l[path]) for l in leaves if path in l})
    if len(values) > 1:
      raise ValueError(
          f"--config.{path}: the runs of this sweep set it to different values "
          f"({', '.join(values)}: their strategy, seed or sweep point); choose those with "
          "the experiment's own flags (--strategies, --sweep, --seeds), or override it "
          "with a single strategy and seed")
  for _, cfg in jobs:
    for path, value in overrides.items():
      common.set_path(cfg, path, value)
  return jobs


def train_jobs(jobs, workdir: str, *, peak_flops: float | None = None, parallel: int = 1,
               reuse=()):
  """Trains [(run name, config)] into workdir/<name>: each workdir resumes itself (a
  finished run only re-reads its end), `reuse` folders lend finished twins, parallel > 1 trains that
  many at once in their own processes. Raises Interrupted when a run was stopped."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  if reuse:
    copy_reusable(jobs, workdir, reuse)
  if parallel > 1 and len(jobs) > 1:
    _run_in_lanes(jobs, workdir, peak_flops, parallel, t0)
    return
  for i, (name, cfg) in enumerate(jobs):
    print(f"=== [{i + 1}/{len(jobs)}] {name}: {cfg.total_steps} steps, seed {cfg.seed} "
          f"({time.perf_counter() - t0:.0f}s elapsed) ===", flush=True)
    last = trainer.train(cfg, os.path.join(workdir, name), peak_flops=peak_flops)
    if last.get("preempted"):
      raise Interrupted(f"{name} stopped at step {last.get('step')} (saved); rerun the "
                        "same command to resume the ablation")


# Lanes ----------------------------------------------------------------------------------
# One small run leaves XLA:CPU's second core half idle (158% CPU for the main job on 2
# cores); two runs at once train 1.38x more steps per second there (docs/history.md,
# "Fast feedback"). Each run is a spawned process with the same config object, writing its
# console to WORKDIR/<name>/console.log; the results are the same as run one by one.

_EXIT_PREEMPTED = 75   # a lane's run saved and stopped on SIGTERM / Ctrl-C
_EXIT_CONFIG = 76      # a lane's config cannot start a run (trainer.ConfigError)
_JAX_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
_POLL_S = 30.0


def _train_in_lane(cfg, workdir: str, peak_flops, log_path: str, jax_settings: dict):
  """A lane's process: console to log_path, the parent's compilation cache, one run."""
  fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  import jax
  for k, v in jax_settings.items():
    jax.config.update(k, v)
  try:
    last = trainer.train(cfg, workdir, peak_flops=peak_flops)
  except trainer.ConfigError as e:
    print(f"ConfigError: {e}", flush=True)   # the console's last line: the parent reads it
    os._exit(_EXIT_CONFIG)
  if last.get("preempted"):
    os._exit(_EXIT_PREEMPTED)


def _last_progress(log_path: str) -> str:
  try:
    with open(log_path, "rb") as fh:
      fh.seek(0, os.SEEK_END)
      fh.seek(max(fh.tell() - 4096, 0))
      lines = fh.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
  except OSError:
    return ""
  steps = [l.split("] ", 1)[-1].split() for l in lines if "] step " in l]
  # "step 120/400  loss 4.7055 ..." -> "step 120/400 loss 4.7055"
  return " ".join(steps[-1][:4]) if steps else "starting"


def _tail(path: str, n: int = 30) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as fh:
      return "".join(fh.readlines()[-n:])
  except OSError:
    return "(no console log)"


def _run_in_lanes(jobs, workdir: str, peak_flops, lanes: int, t0: float):
  import multiprocessing
  import jax
  from deepseek_jax.data import corpus as corpus_lib
  # The tokenizer and token streams once, here: lanes starting together would each train
  # the same BPE.
  for cfg in {(repr(c.data.to_dict()), c.model.vocab_size): c for _, c in jobs}.values():
    corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  settings = {k: getattr(jax.config, k) for k in _JAX_SETTINGS}
  ctx = multiprocessing.get_context("spawn")
  pending, running, failed, interrupted = list(enumerate(jobs)), {}, [], []
  bad_config = None
  last_report = time.perf_counter()
  try:
    while pending or running:
      while pending and len(running) < lanes:
        i, (name, cfg) = pending.pop(0)
        run_dir = os.path.join(workdir, name)
        os.makedirs(run_dir, exist_ok=True)
        log_path = os.path.join(run_dir, "console.log")
        proc = ctx.Process(target=_train_in_lane, name=f"lane-{name}",
                           args=(cfg, run_dir, peak_flops, log_path, settings))
        proc.start()
        running[name] = (proc, log_path, time.perf_counter())
        print(f"=== [{i + 1}/{len(jobs)}] {name}: {cfg.total_steps} steps, seed {cfg.seed}, "
              f"in a lane of {lanes} ({time.perf_counter() - t0:.0f}s elapsed; console: "
              f"{log_path}) ===", flush=True)
      time.sleep(0.5)
      for name, (proc, log_path, start) in list(running.items()):
        if proc.is_alive():
          continue
        proc.join()
        del running[name]
        took = time.perf_counter() - start
        if proc.exitcode == _EXIT_CONFIG:
          pending.clear()      # the same config mistake would stop every run
          bad_config = bad_config or f"{name}: " + _tail(log_path, 1).strip().removeprefix(
              "ConfigError: ")
        elif proc.exitcode == _EXIT_PREEMPTED:
          interrupted.append(name)
          pending.clear()      # start nothing new; the other lanes stop on their own
          print(f"=== {name} stopped after {took:.0f}s (saved)", flush=True)
        elif proc.exitcode != 0:
          failed.append((name, proc.exitcode, log_path))
          print(f"=== {name} FAILED (exit {proc.exitcode}) after {took:.0f}s; its console "
                f"ends:\n{_tail(log_path)}", flush=True)
        else:
          print(f"=== {name} done in {took:.0f}s", flush=True)
      if running and time.perf_counter() - last_report > _POLL_S:
        last_report = time.perf_counter()
        print(f"  [{last_report - t0:.0f}s] " + " | ".join(
            f"{n}: {_last_progress(lp)}" for n, (_, lp, _) in running.items()), flush=True)
  except KeyboardInterrupt:   # Ctrl-C reached the lanes too: they save and stop
    print("=== Ctrl-C: the running runs save and stop", flush=True)
    interrupted.extend(running)
  finally:
    for proc, _, _ in running.values():
      proc.terminate()
      proc.join()
  if bad_config:
    raise trainer.ConfigError(bad_config)
  if failed:
    raise RuntimeError("ablation runs failed: " + ", ".join(
        f"{n} (exit {code}, console {lp})" for n, code, lp in failed))
  if interrupted:
    raise Interrupted(f"{', '.join(interrupted)} stopped (saved); rerun the same command "
                      "to resume the ablation")
