"""Statistics over seeds: means, 95% Student-t intervals, seed-paired differences."""

from __future__ import annotations

import math

import numpy as np

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


def interval_sign(iv) -> int:
  """-1 / +1 when the 95% interval lies below / above 0; 0 when it contains 0 or when
  there is no interval (one seed)."""
  if iv is None or iv["n"] < 2 or math.isnan(iv["ci95"]):
    return 0
  if iv["mean"] + iv["ci95"] < 0:
    return -1
  return 1 if iv["mean"] - iv["ci95"] > 0 else 0
