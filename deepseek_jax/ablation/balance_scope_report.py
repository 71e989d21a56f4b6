"""The balance-scope experiment's verdicts, plots and markdown (results.json beside it).

A verdict compares micro-batch scope with global scope for one strategy and composition
by the paired difference over seeds (micro - global, same seed), with its 95% t-interval:
"global better" only when the interval lies above 0. Qwen's finding reproduces for a
strategy when global scope is better under single_domain and not under mixed.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from deepseek_jax.ablation.plots import pyplot
from deepseek_jax.ablation.stats import interval


def _cell(rows, strategy, scope, composition):
  return next((r for r in rows if (r["strategy"], r["scope"], r["composition"])
               == (strategy, scope, composition)), None)


def paired_gap(rows, strategy: str, composition: str, key: str = "val_loss") -> dict | None:
  """micro - global of `key` over the seeds both cells ran: {"mean", "ci95", "n"}."""
  micro = _cell(rows, strategy, "micro", composition)
  glob = _cell(rows, strategy, "global", composition)
  if micro is None or glob is None:
    return None
  seeds = [s for s in micro["seeds"] if s in glob["seeds"]]
  diffs = [micro[key]["values"][micro["seeds"].index(s)]
           - glob[key]["values"][glob["seeds"].index(s)] for s in seeds]
  return interval(diffs)


def _reading(gap: dict) -> tuple[str, int]:
  """(words, sign): +1 global better (interval above 0), -1 micro better, 0 neither."""
  lo, hi = gap["mean"] - gap["ci95"], gap["mean"] + gap["ci95"]
  where = (f"micro - global {gap['mean']:+.4f} nats, 95% CI [{lo:+.4f}, {hi:+.4f}], "
           f"{gap['n']} seeds")
  if gap["n"] < 2 or math.isnan(gap["ci95"]):
    return f"one seed, no interval ({where})", 0
  if lo > 0:
    return f"global scope better ({where})", 1
  if hi < 0:
    return f"micro scope better ({where})", -1
  return f"no difference beyond the interval ({where})", 0


def verdicts(rows) -> list[str]:
  out = []
  for strategy in dict.fromkeys(r["strategy"] for r in rows if r["scope"] != "sequence"):
    gaps = {c: paired_gap(rows, strategy, c) for c in ("single_domain", "mixed")}
    if any(g is None for g in gaps.values()):
      continue
    (single, s_sign), (mixed, m_sign) = _reading(gaps["single_domain"]), _reading(gaps["mixed"])
    js = paired_gap(rows, strategy, "single_domain", "js_divergence")
    js_words = ""
    if js is not None:
      half = "" if math.isnan(js["ci95"]) else f" ± {js['ci95']:.4f}"
      js_words = (f"; domain JS divergence micro - global under single_domain "
                  f"{js['mean']:+.4f}{half} bits (lower: less specialised by domain)")
    reproduces = s_sign > 0 and m_sign <= 0
    out.append(f"{strategy}: under single_domain, {single}; under mixed, {mixed}{js_words}. "
               f"Qwen's finding (global beats micro only when micro-batches hold one "
               f"domain) {'reproduces' if reproduces else 'does not reproduce'} here.")
  return out


def _fmt(iv, spec=".4f"):
  if iv is None:
    return "-"
  if iv.get("ci95") is None or math.isnan(iv["ci95"]):
    return format(iv["mean"], spec)
  return f"{format(iv['mean'], spec)} ± {format(iv['ci95'], spec)}"


def plot_cells(rows, path: str):
  """Validation loss and domain JS divergence per cell, 95% intervals as error bars."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  labels = [f"{r['strategy']}\n{r['scope']}" for r in rows]
  colors = ["C0" if r["composition"] == "mixed" else "C3" for r in rows]
  x = np.arange(len(rows))
  for ax, key, title in ((axes[0], "val_loss", "validation loss (nats/token)"),
                         (axes[1], "js_divergence", "domain JS divergence (bits)")):
    mean = [r[key]["mean"] for r in rows]
    err = [0 if math.isnan(r[key]["ci95"]) else r[key]["ci95"] for r in rows]
    ax.bar(x, mean, yerr=err, color=colors, capsize=3)
    ax.set_xticks(x, labels, fontsize=6)
    ax.set_title(title + "  (blue mixed, red single_domain)", fontsize=9)
    lo = min(m - e for m, e in zip(mean, err))
    hi = max(m + e for m, e in zip(mean, err))
    if key == "val_loss":
      ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(rows, out_dir: str, title: str = "Balance scope") -> dict:
  """report.md, results.json and cells.png in out_dir; returns the results."""
  results = {"cells": rows, "verdicts": verdicts(rows)}
  with open(os.path.join(out_dir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=1)
  plot_cells(rows, os.path.join(out_dir, "cells.png"))
  domains = list(rows[0]["val_loss_by_domain"]) if rows else []
  lines = [f"# {title}", "",
           "Cells: strategy x scope (where loads are counted) x composition (mixed, or one "
           "domain a micro-batch); mean ± 95% t-interval over seeds. MaxVio micro: "
           "validation loads counted per micro-batch composed as in training; global: "
           "over all of it. JS: mean pairwise Jensen-Shannon divergence between the "
           "domains' expert usage (bits; 0 = the same experts).", "",
           "| cell | seeds | val loss | " + " | ".join(domains)
           + " | MaxVio micro | MaxVio global | JS | top-k share |",
           "|---" * (7 + len(domains)) + "|"]
  for r in rows:
    share = np.mean(list(r["top_k_share"].values()))
    lines.append(f"| {r['name']} | {len(r['seeds'])} | {_fmt(r['val_loss'])} | "
                 + " | ".join(_fmt(r["val_loss_by_domain"][d]) for d in domains)
                 + f" | {_fmt(r['maxvio_micro'], '.3f')} | {_fmt(r['maxvio_global'], '.3f')}"
                 f" | {_fmt(r['js_divergence'])} | {share:.3f} |")
  lines += ["", "## Verdicts", ""] + [f"- {v}" for v in results["verdicts"]]
  lines += ["", "![cells](cells.png)", ""]
  with open(os.path.join(out_dir, "report.md"), "w") as fh:
    fh.write("\n".join(lines))
  return results
