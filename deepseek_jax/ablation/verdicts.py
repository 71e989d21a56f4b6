"""The verdicts in words, each worded from the numbers and never tuned: the one-seed
headline (bias against aux), the seed-paired differences against aux, the Pareto
frontier, and each loss family's dilemma with the bias against it."""

from __future__ import annotations

import math

from deepseek_jax.ablation.pareto import LOSS_FAMILIES, best_bias, matched_point
from deepseek_jax.ablation.stats import interval_sign, paired


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
  best = best_bias(points)
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
    m, reaches = matched_point(a, best)
    if reaches:
      out.append(f"{'An' if fam == 'aux' else 'A'} {fam} run reaches the best bias balance "
                 f"({best['name']}, {best['maxvio_global']:.3f}): {m['name']} at loss "
                 f"{m['val_loss']:.4f} vs {best['val_loss']:.4f}.")
    else:
      out.append(f"No {fam} alpha reaches the bias's best balance ({best['name']}, "
                 f"MaxVio_global {best['maxvio_global']:.3f}; the best {fam} run: "
                 f"{m['maxvio_global']:.3f}).")
  return out


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
      dv, dl = interval_sign(t["maxvio_global"]), interval_sign(t["val_loss"])
      what = {(-1, 1): "shows the dilemma: balance improves and loss rises, both resolved",
              (-1, 0): "balance improves at no resolved loss cost",
              (-1, -1): "balance improves and loss falls: no dilemma here"}.get(
                  (dv, dl), "balance does not improve resolvably")
      trade = (f"from {t['from']} to {t['to']}: " + _compare(t["maxvio_global"],
               "MaxVio_global", "") + "; " + _compare(t["val_loss"], "validation loss",
                                                      " nats") + f": {what}")
    dl = interval_sign(c["val_loss"])
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

