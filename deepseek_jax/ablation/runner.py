"""The balancing ablation: the same data, seed and budget for each strategy, then a report.

Each strategy trains in WORKDIR/<name> (WORKDIR/<name>_seed<k> with several seeds)
through the ordinary trainer, so an interrupted ablation resumes where it stopped and a
finished run is not retrained.

Sweeps (instead of a strategy list):
  rate    the sign-rule bias at u in RATE_SWEEP (LFB Fig. 4)
  pareto  the aux-loss dilemma (LFB Sec. 2.2): the classic aux loss at every alpha of
          PARETO_ALPHAS, the sign-rule bias at every u of RATE_SWEEP, and no balancing;
          the report draws validation loss against MaxVio_global per family
"""

from __future__ import annotations

import os
import time

from absl import logging

from configs import common
from deepseek_jax.ablation import report
from deepseek_jax.train import loop as trainer

RATE_SWEEP = (1e-4, 1e-3, 1e-2)          # LFB Fig. 4
PARETO_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1)  # the aux loss's alpha, LFB's 1e-3 in the middle
SWEEPS = ("rate", "pareto")


def plan(strategies, sweep: str | None):
  """[(run name, config arg)] for the requested strategies or sweep."""
  rate = [(f"bias_u{u:g}", f"strategy=bias,rate={u:g}") for u in RATE_SWEEP]
  if sweep == "rate":
    return rate
  if sweep == "pareto":
    return ([("none", "strategy=none")]
            + [(f"aux_a{a:g}", f"strategy=aux,alpha={a:g}") for a in PARETO_ALPHAS] + rate)
  if sweep:
    raise ValueError(f"--sweep must be one of {SWEEPS} or empty; got {sweep!r}")
  return [(s, f"strategy={s}") for s in strategies]


def run_name(name: str, seed: int, seeds) -> str:
  return name if len(seeds) == 1 else f"{name}_seed{seed}"


def run(get_config, runs, workdir: str, *, size: str, steps: int | None, seeds=(0,),
        peak_flops: float | None = None, overrides=None):
  """Trains every (name, arg) of `runs` on every seed, then writes the report."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  jobs = [(run_name(name, seed, seeds), arg, seed) for seed in seeds for name, arg in runs]
  for i, (name, arg, seed) in enumerate(jobs):
    cfg = get_config(f"{arg},size={size}")
    if steps:
      cfg.total_steps = steps
      cfg.eval_every = max(steps // 6, 1)
      cfg.checkpoint_every = steps
      cfg.optimizer.warmup_steps = max(steps // 20, 1)
    cfg.seed = int(seed)
    for k, v in (overrides or {}).items():
      common.set_path(cfg, k, v)
    print(f"=== [{i + 1}/{len(jobs)}] {name}: {cfg.total_steps} steps, seed {seed} "
          f"({time.perf_counter() - t0:.0f}s elapsed) ===", flush=True)
    trainer.train(cfg, os.path.join(workdir, name), peak_flops=peak_flops)
  runs_data = {name: report.load_run(os.path.join(workdir, name)) for name, _, _ in jobs}
  results = report.write_report(runs_data, workdir)
  logging.info("ablation done in %.0fs", time.perf_counter() - t0)
  return results
