"""The balance-scope experiment: where loads are counted, and what it does to experts.

Qwen's "Demons in the Detail" (arXiv 2501.11873): balancing each micro-batch, when a
micro-batch holds one domain, forbids experts from specialising by domain and costs
quality; balancing the global batch does not, and the gap vanishes when micro-batches
mix domains. The sweep: strategies x scopes (micro-batch, global batch) x compositions
(mixed, single_domain) x seeds, on the embedded domains (configs/balance_scope.py).
seq_aux counts per sequence whatever the scope, so it runs once per composition (scope
"sequence").

Each run trains in WORKDIR/<cell>_seed<k> through the ordinary trainer (killed sweeps
resume, finished runs are reused: ablation/runner.train_jobs), then its final checkpoint
is evaluated on each domain's validation split: per-domain loss, and per-sequence expert
loads for the specialisation metrics (ablation/specialisation.py), cached in the run's
domain_eval.json. MaxVio is measured there at two scopes: over micro-batches composed as
in training (one domain each under single_domain; mixed otherwise) and over all of it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import balance_scope as scope_config
from deepseek_jax.ablation import specialisation
from deepseek_jax.ablation.stats import interval

STRATEGIES = ("bias", "batch_aux", "seq_aux", "quantile")
QUICK_STRATEGIES = ("bias", "batch_aux")
SCOPES = scope_config.SCOPES
COMPOSITIONS = ("mixed", "single_domain")
EVAL_FILE = "domain_eval.json"
QUICK = dict(strategies=QUICK_STRATEGIES, seeds=(0, 1), steps=100, eval_batches=4)
FULL = dict(strategies=STRATEGIES, seeds=(0, 1, 2), steps=scope_config.STEPS,
            eval_batches=16)


def preset(quick: bool, strategies=None, seeds=None, steps: int | None = None) -> dict:
  """QUICK or FULL with the command line's strategies, seeds and steps put in; a
  ValueError names a bad one."""
  out = dict(QUICK if quick else FULL)
  if strategies:
    out["strategies"] = tuple(strategies)
  if seeds:
    try:
      out["seeds"] = tuple(int(s) for s in seeds)
    except ValueError:
      raise ValueError(f"--seeds takes integers; got {list(seeds)}") from None
  if steps is not None:
    if steps < 1:
      raise ValueError(f"--steps must be >= 1; got {steps}")
    out["steps"] = steps
  return out


def plan(strategies) -> list[dict]:
  """The cells: {"name", "strategy", "scope", "composition"}."""
  unknown = sorted(set(strategies) - set(STRATEGIES))
  if unknown:
    raise ValueError(f"unknown strategies {unknown}; the sweep knows {STRATEGIES}")
  cells = []
  for composition in COMPOSITIONS:
    for strategy in strategies:
      for scope in ("sequence",) if strategy == "seq_aux" else SCOPES:
        cells.append({"name": f"{strategy}_{scope}_{composition}", "strategy": strategy,
                      "scope": scope, "composition": composition})
  return cells


def config_for(cell: dict, seed: int, steps: int):
  scope = "global" if cell["scope"] == "sequence" else cell["scope"]
  cfg = scope_config.get_config(f"strategy={cell['strategy']},scope={scope},"
                                f"composition={cell['composition']},steps={steps}")
  cfg.seed = int(seed)
  return cfg


def jobs(cells, seeds, steps: int) -> list[tuple[str, object]]:
  return [(f"{c['name']}_seed{s}", config_for(c, s, steps)) for c in cells for s in seeds]


def _micro_groups(domain_B, composition: str, per_micro: int, seed: int = 0):
  """A micro-batch id per validation sequence, composed as training composed them:
  single_domain, consecutive sequences of one domain; mixed, a fixed shuffle of all."""
  domain_B = np.asarray(domain_B)
  groups = np.empty(len(domain_B), np.int64)
  if composition == "single_domain":
    next_id = 0
    for d in np.unique(domain_B):
      idx = np.flatnonzero(domain_B == d)
      groups[idx] = next_id + np.arange(len(idx)) // per_micro
      next_id = groups[idx].max() + 1
    return groups
  order = np.random.default_rng(seed).permutation(len(domain_B))
  groups[order] = np.arange(len(domain_B)) // per_micro
  return groups


def evaluate_run(run_dir: str, n_batches: int) -> dict:
  """The run's final checkpoint on each domain's validation split (n_batches batches a
  domain): overall and per-domain loss, specialisation and MaxVio at both scopes. Cached
  in run_dir/domain_eval.json (recomputed when n_batches differs)."""
  path = os.path.join(run_dir, EVAL_FILE)
  if os.path.exists(path):
    with open(path) as fh:
      cached = json.load(fh)
    if cached.get("eval_batches") == n_batches:
      return cached
  from deepseek_jax.data import corpus as corpus_lib
  from deepseek_jax.train import batches as batches_lib
  from deepseek_jax.train.evaluation import restore_state
  from deepseek_jax.train.step import eval_step
  model, state, run_cfg, step, _ = restore_state(run_dir)
  corpus = corpus_lib.load_corpus(run_cfg.data, model.cfg.vocab_size)
  fn = jax.jit(lambda st, b: eval_step(st, b, model=model, cfg=run_cfg))
  loads, labels, by_domain = [], [], {}
  ce_all = n_all = 0.0
  for d, (name, stream) in enumerate(zip(corpus.names, corpus.val)):
    rows = batches_lib.PackedRows(stream, seq_len=run_cfg.seq_len)
    ce = n = 0.0
    for batch in batches_lib.validation_batches(rows, run_cfg.batch_size, n_batches):
      out = jax.device_get(fn(state, {k: jnp.asarray(v) for k, v in batch.items()}))
      ce += float(np.sum(out["ce_sum"]))
      n += float(np.sum(out["n_tokens"]))
      loads.append(np.asarray(out["load"]))
      labels += [d] * len(out["load"])
    by_domain[name] = ce / max(n, 1.0)
    ce_all, n_all = ce_all + ce, n_all + n
  load_BLE = np.concatenate(loads)
  per_micro = run_cfg.batch_size // max(int(run_cfg.microbatches), 1)
  groups = _micro_groups(labels, run_cfg.data.composition, per_micro, run_cfg.seed)
  result = {"step": int(step), "eval_batches": n_batches, "val_loss": ce_all / n_all,
            "val_loss_by_domain": by_domain,
            **specialisation.report(load_BLE, labels, list(corpus.names),
                                    model.cfg.top_k, groups)}
  with open(path, "w") as fh:
    json.dump(result, fh, indent=1)
  return result


METRICS = ("val_loss", "maxvio_micro", "maxvio_global", "js_divergence")


def summarise(cells, seeds, evals: dict) -> list[dict]:
  """One row a cell: its metrics' {"mean", "ci95"} over seeds, and per-seed values."""
  out = []
  for c in cells:
    runs = [evals[f"{c['name']}_seed{s}"] for s in seeds]
    row = {k: c[k] for k in ("name", "strategy", "scope", "composition")}
    row["seeds"] = list(seeds)
    for key in METRICS:
      iv = interval([r[key] for r in runs])
      row[key] = {"mean": iv["mean"], "ci95": iv["ci95"], "values": [r[key] for r in runs]}
    row["val_loss_by_domain"] = {}
    for d in runs[0]["val_loss_by_domain"]:
      iv = interval([r["val_loss_by_domain"][d] for r in runs])
      row["val_loss_by_domain"][d] = {"mean": iv["mean"], "ci95": iv["ci95"]}
    row["entropy_bits"] = {d: float(np.mean([r["entropy_bits"][d] for r in runs]))
                           for d in runs[0]["entropy_bits"]}
    row["top_k_share"] = {d: float(np.mean([r["top_k_share"][d] for r in runs]))
                          for d in runs[0]["top_k_share"]}
    out.append(row)
  return out
