"""Balancing results from saved runs: summaries, results.json, report.md and plots.

Everything is rebuilt from what a run leaves in its workdir (config.json and
metrics.jsonl), so runs trained anywhere (a pod included) can be compared on a laptop.

Definitions (LFB Sec. 4.1; SPEC.md 3):
  MaxVio = (max_i load_i - mean load) / mean load, per MoE layer, averaged over the main
  model's MoE layers (MTP blocks are reported in metrics.jsonl but not here).
  maxvio_global: loads counted over the whole validation set by the final model.
  maxvio_batch:  per training batch, averaged over all training steps.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from deepseek_jax.train.metrics import read_records

# LFB Table 2 (validation perplexity / MaxVio_global) and V3 4.5.3, for the report.
PAPER_TABLE = (
    ("LFB 1B (64 routed top-6, 100B tokens)", "aux loss a=1e-3", 9.56, 0.72),
    ("LFB 1B (64 routed top-6, 100B tokens)", "loss-free u=1e-3", 9.50, 0.04),
    ("LFB 3B (200B tokens)", "aux loss a=1e-3", 7.97, 0.52),
    ("LFB 3B (200B tokens)", "loss-free u=1e-3", 7.92, 0.04),
    ("LFB 1B, update-rule ablation", "magnitude update u=1e-3", 9.51, 0.036),
    ("LFB 1B, bias-use ablation", "multiplicative bias", 9.52, 0.036),
)
PAPER_FOR = {"aux": (9.56, 0.72), "bias": (9.50, 0.04), "bias_magnitude": (9.51, 0.036),
             "bias_mult": (9.52, 0.036)}


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


# Plots -------------------------------------------------------------------------------

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _styles(names):
  """{run name: (color, label or None)}: one color per strategy, its seeds sharing it and
  one legend entry."""
  strategy = {n: (m.group(1) if (m := _SEED_SUFFIX.match(n)) else n) for n in names}
  order = list(dict.fromkeys(strategy.values()))
  out, seen = {}, set()
  for n in names:
    s = strategy[n]
    out[n] = (f"C{order.index(s) % 10}", None if s in seen else s)
    seen.add(s)
  return out


def plot_val_loss(runs: dict, path: str):
  plt = _plt()
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
  plt = _plt()
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
  plt = _plt()
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


# Seeds: means, intervals, paired differences ---------------------------------------------

_SEED_SUFFIX = re.compile(r"^(.*)_seed(\d+)$")

# Two-sided 95% Student-t quantiles by degrees of freedom (1.96 past 30).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
        16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
  if df <= 0:
    return float("nan")
  return _T95.get(df) or (1.96 if df > 30 else _T95[max(k for k in _T95 if k <= df)])


def interval(values) -> dict:
  """Mean, sample std and the 95% t-interval half-width of the mean (nan for one value)."""
  v = np.asarray(values, np.float64)
  n = len(v)
  sd = float(v.std(ddof=1)) if n > 1 else float("nan")
  return {"n": n, "mean": float(v.mean()), "std": sd,
          "ci95": t95(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")}


def group_by_strategy(results: dict) -> dict:
  """{strategy: {seed: summary}} from {run name: summary}; `name_seedK` runs group."""
  groups = {}
  for name, r in results.items():
    m = _SEED_SUFFIX.match(name)
    strategy, seed = (m.group(1), int(m.group(2))) if m else (name, r.get("seed", 0))
    groups.setdefault(strategy, {})[seed] = r
  return groups


def seed_table(groups: dict, keys=("val_loss", "maxvio_global")) -> dict:
  """{strategy: {key: interval over seeds}} (runs without the key are left out)."""
  return {s: {k: interval([r[k] for r in by_seed.values()]) for k in keys
              if all(k in r for r in by_seed.values())} for s, by_seed in groups.items()}


def paired(groups: dict, base: str, other: str, key: str) -> dict | None:
  """other - base on the seeds both have: interval of the paired differences."""
  if base not in groups or other not in groups:
    return None
  seeds = sorted(set(groups[base]) & set(groups[other]))
  if not seeds or not all(key in groups[x][s] for x in (base, other) for s in seeds):
    return None
  return interval([groups[other][s][key] - groups[base][s][key] for s in seeds])


def _pm(iv, spec=".4f"):
  if iv["n"] == 1 or math.isnan(iv["ci95"]):
    return format(iv["mean"], spec)
  return f"{format(iv['mean'], spec)} ± {format(iv['ci95'], spec)}"


def _compare(iv, what: str, unit: str, smaller_is_better=True) -> str:
  """One clause worded from a paired interval, never from one seed."""
  lo, hi = iv["mean"] - iv["ci95"], iv["mean"] + iv["ci95"]
  rng = f"(mean {iv['mean']:+.4f}{unit}, 95% CI [{lo:+.4f}, {hi:+.4f}], {iv['n']} seeds)"
  if iv["n"] < 2 or math.isnan(iv["ci95"]):
    return f"{what}: {iv['mean']:+.4f}{unit} on one seed, no interval {rng}"
  if hi < 0:
    return f"{what} is lower {rng}" + (": better" if smaller_is_better else "")
  if lo > 0:
    return f"{what} is higher {rng}" + (": worse" if smaller_is_better else "")
  return f"{what} is indistinguishable: the interval contains 0 {rng}"


def seeded_verdict(groups: dict, base: str = "aux") -> list[str]:
  out = []
  for other in groups:
    if other == base:
      continue
    loss = paired(groups, base, other, "val_loss")
    vio = paired(groups, base, other, "maxvio_global")
    if loss is None or loss["n"] < 2:
      continue
    line = f"- **{other} - {base}**: " + _compare(loss, "validation loss", " nats")
    if vio is not None:
      line += "; " + _compare(vio, "MaxVio_global", "")
    out.append(line + ".")
  return out


# The Pareto view (LFB's aux-loss dilemma) --------------------------------------------------

LOSS_FAMILIES = ("aux", "batch_aux", "seq_aux")   # the losses that can trade (one alpha)
FAMILIES = LOSS_FAMILIES + ("bias", "quantile", "none", "other")
_LABEL = {"aux": "aux loss (alpha)", "batch_aux": "batch-wise aux, normalised (alpha)",
          "seq_aux": "sequence-wise aux, normalised (alpha)", "bias": "sign-rule bias (u)",
          "quantile": "Quantile Balancing", "none": "none", "other": "other strategies"}
_COLOR = {"aux": "tab:red", "batch_aux": "tab:orange", "seq_aux": "tab:purple",
          "bias": "tab:blue", "quantile": "tab:green", "none": "black", "other": "tab:gray"}


def family(balance: dict) -> tuple[str, float] | None:
  """(loss, alpha) for a run with one balance loss and no bias, ("bias", u) for the
  sign- or magnitude-rule bias alone, ("quantile", 0) / ("none", 0); None for combinations."""
  alpha = {"aux": balance.get("aux_alpha", 0.0),
           "batch_aux": balance.get("batch_aux_alpha", 0.0),
           "seq_aux": balance.get("seq_aux_alpha", 0.0)}
  rate, rule = balance.get("bias_rate", 0.0), balance.get("bias_rule", "sign")
  losses = [k for k, v in alpha.items() if v]
  if len(losses) == 1 and not rate:
    return losses[0], alpha[losses[0]]
  if losses:
    return None
  if rate and rule in ("sign", "magnitude"):   # magnitude: LFB's softmax setting
    return "bias", rate
  if rate and rule == "quantile":
    return "quantile", 0.0
  if not rate:
    return "none", 0.0
  return None


def _overlap(p: dict, q: dict, key: str) -> bool:
  """The two points' 95% intervals of `key` overlap (False without intervals)."""
  cp, cq = p[f"{key}_ci95"], q[f"{key}_ci95"]
  if math.isnan(cp) or math.isnan(cq):
    return False
  return abs(p[key] - q[key]) <= cp + cq


def pareto_points(groups: dict) -> list[dict]:
  """One point per strategy with MaxVio: its family, knob, mean loss and MaxVio over its
  seeds with their 95% half-widths, the points that dominate it on the means, and of
  those the ones whose intervals overlap its own on both axes (not resolved)."""
  pts = []
  for name, by_seed in groups.items():
    rs = list(by_seed.values())
    if not all("maxvio_global" in r for r in rs):
      continue
    fam = family(rs[0].get("balance", {}))
    loss, vio = interval([r["val_loss"] for r in rs]), interval([r["maxvio_global"] for r in rs])
    pts.append({"name": name, "family": fam[0] if fam else "other",
                "knob": fam[1] if fam else float("nan"), "n": loss["n"],
                "val_loss": loss["mean"], "maxvio_global": vio["mean"],
                "val_loss_ci95": loss["ci95"], "maxvio_global_ci95": vio["ci95"]})
  by_name = {q["name"]: q for q in pts}
  for p in pts:   # dominated: another point is no worse on both and better on one
    p["dominated_by"] = [q["name"] for q in pts if q is not p
                         and q["val_loss"] <= p["val_loss"]
                         and q["maxvio_global"] <= p["maxvio_global"]
                         and (q["val_loss"] < p["val_loss"]
                              or q["maxvio_global"] < p["maxvio_global"])]
    p["within_noise"] = [n for n in p["dominated_by"]
                         if _overlap(p, by_name[n], "val_loss")
                         and _overlap(p, by_name[n], "maxvio_global")]
  return pts


def plot_pareto(points: list[dict], path: str, title: str = ""):
  """Loss against MaxVio_global per family with 95% bars; a second panel zooms on the
  points within 0.05 nats of the best loss when others lie far above them."""
  plt = _plt()
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


def _best_bias(points: list[dict]) -> dict | None:
  bias = [p for p in points if p["family"] == "bias"]
  return min(bias, key=lambda p: p["maxvio_global"]) if bias else None


def _matched(family_points: list[dict], best: dict) -> tuple[dict, bool]:
  """The family's point at the bias's balance: its lowest-loss point whose mean MaxVio
  is at most `best`'s (True), else its best-balanced point (False)."""
  reach = [p for p in family_points if p["maxvio_global"] <= best["maxvio_global"]]
  if reach:
    return min(reach, key=lambda p: p["val_loss"]), True
  return min(family_points, key=lambda p: p["maxvio_global"]), False


def pareto_verdict(points: list[dict]) -> list[str]:
  """The frontier on the means in words: who is on it, who dominates whom, each loss
  family's trade-off."""
  by_fam = {f: sorted((p for p in points if p["family"] == f), key=lambda p: p["knob"])
            for f in LOSS_FAMILIES + ("bias",)}
  if not by_fam["bias"] or not any(by_fam[f] for f in LOSS_FAMILIES):
    return []
  frontier = [p["name"] for p in points if not p["dominated_by"]]
  out = [f"**Pareto frontier** (on the means; validation loss and MaxVio_global both lower "
         f"is better): {', '.join(frontier)}."]
  noisy = [f"{p['name']} by {', '.join(p['within_noise'])}" for p in points
           if p["within_noise"]]
  if noisy:
    out.append("Dominated on the means but with overlapping 95% intervals on both axes "
               "(not resolved by these seeds): " + "; ".join(noisy) + ".")
  bias_names = {b["name"] for b in by_fam["bias"]}
  best_bias = _best_bias(points)
  for fam in LOSS_FAMILIES:
    a = by_fam[fam]
    if not a:
      continue
    word = "Aux" if fam == "aux" else fam
    dom = [p["name"] for p in a if bias_names & set(p["dominated_by"])]
    back = [p["name"] for p in by_fam["bias"]
            if {q["name"] for q in a} & set(p["dominated_by"])]
    out.append(f"{word} runs dominated by a bias run: {len(dom)} of {len(a)}"
               + (f" ({', '.join(dom)})" if dom else "")
               + f"; bias runs dominated by one of them: {len(back)} of "
               f"{len(by_fam['bias'])}" + (f" ({', '.join(back)})" if back else "") + ".")
    if len(a) >= 2:
      vio_falls = all(x["maxvio_global"] >= y["maxvio_global"] for x, y in zip(a, a[1:]))
      loss_rises = all(x["val_loss"] <= y["val_loss"] for x, y in zip(a, a[1:]))
      out.append(
          f"{word} loss from alpha {a[0]['knob']:g} to {a[-1]['knob']:g}: MaxVio_global "
          f"{a[0]['maxvio_global']:.3f} -> {a[-1]['maxvio_global']:.3f}, validation loss "
          f"{a[0]['val_loss']:.4f} -> {a[-1]['val_loss']:.4f} ("
          + ("the dilemma LFB describes: each larger alpha balances better and costs loss"
             if vio_falls and loss_rises else "not a monotone trade-off on the means")
          + ").")
    m, reaches = _matched(a, best_bias)
    if reaches:
      out.append(f"{'An' if fam == 'aux' else 'A'} {fam} run reaches the best bias balance ({best_bias['name']}, "
                 f"{best_bias['maxvio_global']:.3f}): {m['name']} at loss "
                 f"{m['val_loss']:.4f} vs {best_bias['val_loss']:.4f}.")
    else:
      out.append(f"No {fam} alpha reaches the bias's best balance ({best_bias['name']}, "
                 f"MaxVio_global {best_bias['maxvio_global']:.3f}; the best {fam} run: "
                 f"{m['maxvio_global']:.3f}).")
  return out


def matched_comparisons(groups: dict, points: list[dict]) -> dict:
  """Per loss family, seed-paired differences (bias - family point) at matched balance:
  the bias point is the bias run with the best mean balance; its match in the family is
  the lowest-loss point whose mean MaxVio_global is at least as low, else (flagged
  reaches=False) the family's best-balanced point. And the family's own trade-off: its
  best-balanced point minus its smallest alpha, paired."""
  best = _best_bias(points)
  out = {}
  for fam in LOSS_FAMILIES:
    a = sorted((p for p in points if p["family"] == fam), key=lambda p: p["knob"])
    if not a or best is None:
      continue
    match, reaches = _matched(a, best)
    balanced = min(a, key=lambda p: p["maxvio_global"])
    out[fam] = {
        "bias": best["name"], "match": match["name"], "reaches": reaches,
        "val_loss": paired(groups, match["name"], best["name"], "val_loss"),
        "maxvio_global": paired(groups, match["name"], best["name"], "maxvio_global"),
        "trade": {"from": a[0]["name"], "to": balanced["name"],
                  "val_loss": paired(groups, a[0]["name"], balanced["name"], "val_loss"),
                  "maxvio_global": paired(groups, a[0]["name"], balanced["name"],
                                          "maxvio_global")}}
  return out


def _sign(iv) -> int:
  """-1 / +1 when the 95% interval lies below / above 0; 0 when it contains 0 or when
  there is no interval (one seed)."""
  if iv is None or iv["n"] < 2 or math.isnan(iv["ci95"]):
    return 0
  if iv["mean"] + iv["ci95"] < 0:
    return -1
  return 1 if iv["mean"] - iv["ci95"] > 0 else 0


def dilemma_verdict(comparisons: dict) -> list[str]:
  """Each family's trade-off and where the bias sits against it, worded from the paired
  95% intervals only."""
  out = []
  for fam, c in comparisons.items():
    t = c["trade"]
    ivs = (t["val_loss"], t["maxvio_global"], c["val_loss"], c["maxvio_global"])
    if any(iv is None or iv["n"] < 2 for iv in ivs):
      out.append(f"- **{fam}**: fewer than two paired seeds, no intervals: no verdict.")
      continue
    if t["from"] == t["to"]:
      trade = (f"its best balance is at its smallest alpha ({t['from']}): larger alphas do "
               "not balance better, so it shows no trade-off to speak of")
    else:
      dv, dl = _sign(t["maxvio_global"]), _sign(t["val_loss"])
      what = {(-1, 1): "shows the dilemma: balance improves and loss rises, both resolved",
              (-1, 0): "balance improves at no resolved loss cost",
              (-1, -1): "balance improves and loss falls: no dilemma here"}.get(
                  (dv, dl), "balance does not improve resolvably")
      trade = (f"from {t['from']} to {t['to']}: " + _compare(t["maxvio_global"],
               "MaxVio_global", "") + "; " + _compare(t["val_loss"], "validation loss",
                                                      " nats") + f": {what}")
    dl = _sign(c["val_loss"])
    where = ({-1: "below the family's curve (lower loss than", 1: "above the family's "
              "curve (higher loss than", 0: "inside the noise of the family's curve (loss "
              "indistinguishable from"}[dl]
             + f" {c['match']}, " + ("which reaches its balance" if c["reaches"]
                                     else "the family's best-balanced point, which does "
                                     "not reach its balance") + ")")
    out.append(f"- **{fam}**: {trade}. The bias ({c['bias']}) sits {where}: "
               + _compare(c["val_loss"], "its validation loss", " nats") + "; "
               + _compare(c["maxvio_global"], "its MaxVio_global", "") + ".")
  return out


# The report ----------------------------------------------------------------------------

def _fmt(v, spec=".3f"):
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_report(runs: dict, out_dir: str, title: str = "Balancing ablation") -> dict:
  """runs: {name: load_run(...)} (names `strategy_seedK` group by strategy). Writes
  results.json, report.md and PNGs; returns {name: summary}."""
  os.makedirs(out_dir, exist_ok=True)
  results = {name: summarize(run) for name, run in runs.items()}
  groups = group_by_strategy(results)
  multi_seed = any(len(v) > 1 for v in groups.values())
  points = pareto_points(groups)
  # The Pareto view is for sweeps: the bias and a loss family present, one family at
  # several knobs.
  n_fam = {f: sum(p["family"] == f for p in points) for f in LOSS_FAMILIES + ("bias",)}
  pareto = (n_fam["bias"] >= 1 and any(n_fam[f] for f in LOSS_FAMILIES)
            and max(n_fam.values()) >= 2)
  summary = {n: {k: v for k, v in r.items() if k != "val_load"} for n, r in results.items()}
  extra = {}
  if multi_seed:
    extra["seeds"] = seed_table(groups)
    extra["paired_vs_aux"] = {s: {k: paired(groups, "aux", s, k)
                                  for k in ("val_loss", "maxvio_global")}
                              for s in groups if s != "aux" and "aux" in groups}
  if pareto:
    extra["pareto"] = points
    if multi_seed:
      extra["matched"] = matched_comparisons(groups, points)
  with open(os.path.join(out_dir, "results.json"), "w") as fh:
    json.dump({"runs": summary, **extra}, fh, indent=1)
  plot_val_loss(runs, os.path.join(out_dir, "val_loss.png"))
  plot_maxvio_batch(runs, os.path.join(out_dir, "maxvio_batch.png"))
  heatmaps = []
  for name, r in results.items():
    m = _SEED_SUFFIX.match(name)
    if "val_load" in r and (m is None or int(m.group(2)) == min(groups[m.group(1)])):
      n_moe = runs[name]["config"]["model"]["n_layers"] - runs[name]["config"]["model"][
          "first_k_dense"]
      f = f"load_{name}.png"
      plot_load_heatmap(name, r, n_moe, os.path.join(out_dir, f))
      heatmaps.append(f)

  lines = [f"# {title}", ""]
  any_run = next(iter(runs.values()))["config"]
  m = any_run["model"]
  seeds = sorted({s for v in groups.values() for s in v})
  lines += [
      f"Model: d_model {m['d_model']}, {m['n_layers']} layers ({m['first_k_dense']} dense), "
      f"{m['n_shared_experts']} shared + {m['n_routed_experts']} routed experts, "
      f"top-{m['top_k']}, {m['score_func']} gate; {any_run['batch_size']} x "
      f"{any_run['seq_len']} tokens per step, seed(s) {', '.join(map(str, seeds))}. Data: "
      f"{any_run['data']['source']} ({any_run['data']['tokenizer']} tokenizer).", "",
      "| run | steps | val loss | val PPL | MaxVio_global | MaxVio_batch | "
      "dropped | tokens/s | paper PPL / MaxVio_global (LFB 1B) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    paper = PAPER_FOR.get(name)
    lines.append(
        f"| {name} | {r['steps']} | {_fmt(r['val_loss'], '.4f')} | {_fmt(r['val_ppl'], '.2f')} | "
        f"{_fmt(r.get('maxvio_global'))} | {_fmt(r.get('maxvio_batch'))} | "
        f"{_fmt(r.get('dropped_frac'), '.4f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
        f"{'%g / %g' % paper if paper else ''} |")
  if multi_seed:
    table = extra["seeds"]
    lines += ["", f"Over seeds (mean ± 95% t-interval half-width; n seeds):", "",
              "| strategy | n | val loss | MaxVio_global |", "|---|---|---|---|"]
    for s, t in table.items():
      lines.append(f"| {s} | {t['val_loss']['n']} | {_pm(t['val_loss'])} | "
                   + (f"{_pm(t['maxvio_global'], '.3f')} |" if "maxvio_global" in t else "n/a |"))
    pv = seeded_verdict(groups)
    if pv:
      lines += ["", "Paired differences against aux, seed by seed:", "", *pv]
  if pareto:
    lines += ["", "Pareto view (mean ± 95% half-width over seeds where several; "
              "dominance on the means, * where the intervals overlap on both axes):", "",
              "| run | family | knob | val loss | MaxVio_global | dominated by |",
              "|---|---|---|---|---|---|"]
    order = {f: i for i, f in enumerate(FAMILIES)}
    for p in sorted(points, key=lambda p: (order[p["family"]], p["knob"])):
      dom = ", ".join(n + ("*" if n in p["within_noise"] else "") for n in p["dominated_by"])
      lines.append(
          f"| {p['name']} | {p['family']} | {p['knob']:g} | "
          f"{_pm(dict(n=p['n'], mean=p['val_loss'], ci95=p['val_loss_ci95']))} | "
          f"{_pm(dict(n=p['n'], mean=p['maxvio_global'], ci95=p['maxvio_global_ci95']), '.3f')}"
          f" | {dom or '-'} |")
    any_gate = next(iter(runs.values()))["config"]["model"].get("score_func", "")
    plot_pareto(points, os.path.join(out_dir, "pareto.png"), title=f"{any_gate} gate")
    lines += ["", *pareto_verdict(points)]
    if "matched" in extra:
      lines += ["", "The dilemma per family, and the bias against it (seed-paired 95% "
                "intervals; the bias run with the best mean balance against the family's "
                "lowest-loss run at least as balanced):", "",
                *dilemma_verdict(extra["matched"])]
    lines += ["", "![pareto](pareto.png)"]
  lines += ["", "LFB Table 2 (validation perplexity / MaxVio_global):", "",
            "| model | strategy | PPL | MaxVio_global |", "|---|---|---|---|"]
  lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in PAPER_TABLE]
  if not multi_seed:
    lines += ["", *verdict(results)]
  lines += ["", "![validation loss](val_loss.png)", "", "![MaxVio_batch](maxvio_batch.png)",
            ""]
  lines += [f"![{h}]({h})" for h in heatmaps]
  with open(os.path.join(out_dir, "report.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  return results


def verdict(results: dict) -> list[str]:
  """What the numbers say about the headline question, stated plainly (never tuned)."""
  if "aux" not in results or "bias" not in results or "maxvio_global" not in results["bias"]:
    return []
  a, b = results["aux"], results["bias"]
  out = [f"**Headline (bias vs aux):** MaxVio_global {b['maxvio_global']:.3f} vs "
         f"{a['maxvio_global']:.3f} ({b['maxvio_global'] / max(a['maxvio_global'], 1e-9):.2f}x); "
         f"validation loss {b['val_loss']:.4f} vs {a['val_loss']:.4f} "
         f"({b['val_loss'] - a['val_loss']:+.4f})."]
  better_balance = b["maxvio_global"] < a["maxvio_global"]
  diff = b["val_loss"] - a["val_loss"]
  if better_balance and diff <= 0:
    out.append("The miniature agrees with the paper: the bias balances better than the "
               "auxiliary loss at a validation loss no worse.")
  elif better_balance and diff <= 0.01:
    out.append(f"The bias balances better than the auxiliary loss; its validation loss is "
               f"{diff:+.4f} nats from the aux run's, a gap one seed cannot resolve (rerun "
               "with --seed to check; the paper has the bias slightly better).")
  else:
    out.append("The miniature does NOT reproduce the paper on this point "
               f"(better balance: {better_balance}; loss within 0.01 nats: {diff <= 0.01}); "
               "see BUILD_NOTES.md for what was checked.")
  return out
