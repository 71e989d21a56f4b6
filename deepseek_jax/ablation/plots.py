"""The report's plots: validation loss, MaxVio per batch, expert-load heatmaps, and the
Pareto view (matplotlib, headless)."""

from __future__ import annotations

import math

import numpy as np

from deepseek_jax.ablation.pareto import FAMILIES, LOSS_FAMILIES
from deepseek_jax.ablation.saved_runs import SEED_SUFFIX, series

_LABEL = {"aux": "aux loss (alpha)", "batch_aux": "batch-wise aux, normalised (alpha)",
          "seq_aux": "sequence-wise aux, normalised (alpha)", "bias": "sign-rule bias (u)",
          "quantile": "Quantile Balancing", "none": "none", "other": "other strategies"}
_COLOR = {"aux": "tab:red", "batch_aux": "tab:orange", "seq_aux": "tab:purple",
          "bias": "tab:blue", "quantile": "tab:green", "none": "black", "other": "tab:gray"}


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _styles(names):
  """{run name: (color, label or None)}: one color per strategy, its seeds sharing it and
  one legend entry."""
  strategy = {n: (m.group(1) if (m := SEED_SUFFIX.match(n)) else n) for n in names}
  order = list(dict.fromkeys(strategy.values()))
  out, seen = {}, set()
  for n in names:
    s = strategy[n]
    out[n] = (f"C{order.index(s) % 10}", None if s in seen else s)
    seen.add(s)
  return out


def plot_val_loss(runs: dict, path: str):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  styles = _styles(list(runs))
  for name, run in runs.items():
    x, y = series(run, "val_loss")
    color, label = styles[name]
    ax.plot(x, y, marker="o", ms=3, color=color, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Validation loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_maxvio_batch(runs: dict, path: str, window: int = 10):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  styles = _styles(list(runs))
  for name, run in runs.items():
    x, y = series(run, "maxvio_mean")
    if not y:
      continue
    y = np.asarray(y)
    smooth = np.convolve(y, np.ones(window) / window, mode="valid") if len(y) >= window else y
    color, label = styles[name]
    line, = ax.plot(x[len(x) - len(smooth):], smooth, color=color, label=label)
    ax.plot(x, y, color=line.get_color(), alpha=0.15, lw=0.8)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel(f"MaxVio_batch (mean over MoE layers; {window}-step mean)")
  ax.set_title("Load imbalance per training batch")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_load_heatmap(name: str, summary: dict, n_moe_layers: int, path: str):
  """Validation load of each expert relative to the layer mean (1 = perfectly balanced)."""
  plt = pyplot()
  load = np.asarray(summary["val_load"], np.float64)[:n_moe_layers]
  rel = load / np.maximum(load.mean(-1, keepdims=True), 1e-9)
  fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * rel.shape[1]), 1.2 + 0.45 * rel.shape[0]))
  im = ax.imshow(rel, cmap="RdBu_r", vmin=0.0, vmax=2.0, aspect="auto")
  ax.set_xlabel("expert")
  ax.set_ylabel("MoE layer")
  ax.set_yticks(range(rel.shape[0]))
  ax.set_title(f"{name}: validation load / mean  (MaxVio_global {summary['maxvio_global']:.3f})")
  fig.colorbar(im, ax=ax, fraction=0.03)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_pareto(points: list[dict], path: str, title: str = ""):
  """Loss against MaxVio_global per family with 95% bars; a second panel zooms on the
  points within 0.05 nats of the best loss when others lie far above them."""
  plt = pyplot()
  from matplotlib.ticker import NullFormatter
  best = min(p["val_loss"] for p in points)
  near = [p for p in points if p["val_loss"] <= best + 0.05]
  zoom = len(near) < len(points)
  fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 7.5, 5.0),
                           squeeze=False)
  for ax in axes[0]:
    for fam in FAMILIES:
      pts = sorted((p for p in points if p["family"] == fam), key=lambda p: p["knob"])
      if not pts:
        continue
      ax.plot([p["maxvio_global"] for p in pts], [p["val_loss"] for p in pts],
              "-" if fam in LOSS_FAMILIES + ("bias",) else "", color=_COLOR[fam],
              alpha=0.6, label=_LABEL[fam])
      for p in pts:
        dominated = bool(p["dominated_by"])
        ax.errorbar(p["maxvio_global"], p["val_loss"],
                    xerr=None if math.isnan(p["maxvio_global_ci95"])
                    else p["maxvio_global_ci95"],
                    yerr=None if math.isnan(p["val_loss_ci95"]) else p["val_loss_ci95"],
                    fmt="o", ms=6, color=_COLOR[fam],
                    mfc="white" if dominated else _COLOR[fam], capsize=2)
        label = (p["name"] if fam in ("none", "other", "quantile") else f"{p['knob']:g}")
        ax.annotate(label, (p["maxvio_global"], p["val_loss"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=6, color=_COLOR[fam])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("MaxVio_global (log; lower = better balanced)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
  axes[0][0].legend(fontsize=7)
  n = max((p["n"] for p in points), default=1)
  axes[0][0].set_title((title + ": " if title else "") + "balance vs loss per family; "
                       "hollow: dominated on the means" + (
                           f"; bars: 95% intervals over {n} seeds" if n > 1 else ""),
                       fontsize=9)
  if zoom:
    lo = min(p["val_loss"] - (0 if math.isnan(p["val_loss_ci95"]) else p["val_loss_ci95"])
             for p in near)
    hi = max(p["val_loss"] + (0 if math.isnan(p["val_loss_ci95"]) else p["val_loss_ci95"])
             for p in near)
    axes[0][1].set_ylim(lo - 0.005, hi + 0.005)
    axes[0][1].set_title("zoom: the runs within 0.05 nats of the best loss", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
