"""The balancing ablation: the same data, seed and budget for each strategy, then a report.

Each strategy trains in WORKDIR/<name> through the ordinary trainer, so an interrupted
ablation resumes where it stopped and a finished strategy is not retrained.
"""

from __future__ import annotations

import os
import time

from absl import logging

from configs import common
from deepseek_jax.ablation import report
from deepseek_jax.train import loop as trainer

RATE_SWEEP = (1e-4, 1e-3, 1e-2)   # LFB Fig. 4


def plan(strategies, sweep: str | None):
  """[(run name, config arg)] for the requested strategies or sweep."""
  if sweep == "rate":
    return [(f"bias_u{u:g}", f"strategy=bias,rate={u:g}") for u in RATE_SWEEP]
  if sweep:
    raise ValueError(f"--sweep must be 'rate' or empty; got {sweep!r}")
  return [(s, f"strategy={s}") for s in strategies]


def run(get_config, runs, workdir: str, *, size: str, steps: int | None, seed: int,
        peak_flops: float | None = None, overrides=None):
  """Trains every (name, arg) of `runs`, then writes the report into workdir."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  for i, (name, arg) in enumerate(runs):
    cfg = get_config(f"{arg},size={size}")
    if steps:
      cfg.total_steps = steps
      cfg.eval_every = max(steps // 6, 1)
      cfg.checkpoint_every = steps
      cfg.optimizer.warmup_steps = max(steps // 20, 1)
    cfg.seed = seed
    for k, v in (overrides or {}).items():
      common.set_path(cfg, k, v)
    print(f"=== [{i + 1}/{len(runs)}] {name}: {cfg.total_steps} steps "
          f"({time.perf_counter() - t0:.0f}s elapsed) ===", flush=True)
    trainer.train(cfg, os.path.join(workdir, name), peak_flops=peak_flops)
  runs_data = {name: report.load_run(os.path.join(workdir, name)) for name, _ in runs}
  results = report.write_report(runs_data, workdir)
  logging.info("ablation done in %.0fs", time.perf_counter() - t0)
  return results
