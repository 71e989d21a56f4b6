"""A finished run as its workdir keeps it (config.json and metrics.jsonl), and its summary.

Everything the report shows is rebuilt from these two files, so runs trained anywhere (a
pod included) can be compared on a laptop. Runs named `<strategy>_seed<k>` are seeds of
one strategy.

Definitions (LFB Sec. 4.1; SPEC.md 3):
  MaxVio = (max_i load_i - mean load) / mean load, per MoE layer, averaged over the main
  model's MoE layers (MTP blocks are reported in metrics.jsonl but not here).
  maxvio_global: loads counted over the whole validation set by the final model.
  maxvio_batch:  per training batch, averaged over all training steps.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from deepseek_jax.train.metrics import read_records

SEED_SUFFIX = re.compile(r"^(.*)_seed(\d+)$")


def load_run(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as fh:
    config = json.load(fh)
  records = read_records(os.path.join(workdir, "metrics.jsonl"))
  return {"workdir": workdir, "config": config, "records": records}


def summarize(run: dict) -> dict:
  """The numbers of one finished run (raises if it never reached a final evaluation)."""
  cfg, records = run["config"], run["records"]
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "val_loss" in r]
  if not evals:
    raise ValueError(f"{run['workdir']}: no evaluation in metrics.jsonl (unfinished run?)")
  final = evals[-1]
  out = {
      "steps": int(final["step"]) + 1,
      "val_loss": final["val_loss"],
      "val_ppl": final["val_ppl"],
      "train_loss_last": float(np.mean([r["ce"] for r in train[-10:]])),
      "tokens_per_s": _tokens_per_s(cfg, train),
      "balance": cfg.get("balance", {}),
      "seed": cfg.get("seed", 0),
  }
  if "maxvio_global_mean" in final:
    vio = [r["maxvio_mean"] for r in train if "maxvio_mean" in r]
    out.update({
        "maxvio_global": final["maxvio_global_mean"],
        "maxvio_global_per_layer": final["maxvio_global"],
        "maxvio_batch": float(np.mean(vio)),
        "maxvio_batch_last10pct": float(np.mean(vio[-max(1, len(vio) // 10):])),
        "dropped_frac": float(np.mean([r.get("dropped_frac", 0.0) for r in train])),
        "val_load": final["val_load"],
    })
  if "val_mtp" in final:
    out["val_mtp"] = final["val_mtp"]
  return out


def _tokens_per_s(cfg, train) -> float:
  """Median steady-state throughput (first steps carry compilation)."""
  times = [r["step_time"] for r in train[len(train) // 10 + 1:] if "step_time" in r]
  if not times:
    return float("nan")
  return cfg["batch_size"] * cfg["seq_len"] / float(np.median(times))


def series(run: dict, key: str):
  pts = [(r["step"] + 1, r[key]) for r in run["records"] if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def group_by_strategy(results: dict) -> dict:
  """{strategy: {seed: summary}} from {run name: summary}; `name_seedK` runs group."""
  groups = {}
  for name, r in results.items():
    m = SEED_SUFFIX.match(name)
    strategy, seed = (m.group(1), int(m.group(2))) if m else (name, r.get("seed", 0))
    groups.setdefault(strategy, {})[seed] = r
  return groups
