"""The Pareto view of balance against loss (LFB's aux-loss dilemma): each strategy's
family and knob, dominance on the means, and the family point matched to the bias."""

from __future__ import annotations

import math

from deepseek_jax.ablation.stats import interval, paired

LOSS_FAMILIES = ("aux", "batch_aux", "seq_aux")   # the losses that can trade (one alpha)
FAMILIES = LOSS_FAMILIES + ("bias", "quantile", "none", "other")


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


def best_bias(points: list[dict]) -> dict | None:
  bias = [p for p in points if p["family"] == "bias"]
  return min(bias, key=lambda p: p["maxvio_global"]) if bias else None


def matched_point(family_points: list[dict], best: dict) -> tuple[dict, bool]:
  """The family's point at the bias's balance: its lowest-loss point whose mean MaxVio
  is at most `best`'s (True), else its best-balanced point (False)."""
  reach = [p for p in family_points if p["maxvio_global"] <= best["maxvio_global"]]
  if reach:
    return min(reach, key=lambda p: p["val_loss"]), True
  return min(family_points, key=lambda p: p["maxvio_global"]), False


def matched_comparisons(groups: dict, points: list[dict]) -> dict:
  """Per loss family, seed-paired differences (bias - family point) at matched balance:
  the bias point is the bias run with the best mean balance; its match in the family is
  the lowest-loss point whose mean MaxVio_global is at least as low, else (flagged
  reaches=False) the family's best-balanced point. And the family's own trade-off: its
  best-balanced point minus its smallest alpha, paired."""
  best = best_bias(points)
  out = {}
  for fam in LOSS_FAMILIES:
    a = sorted((p for p in points if p["family"] == fam), key=lambda p: p["knob"])
    if not a or best is None:
      continue
    match, reaches = matched_point(a, best)
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
