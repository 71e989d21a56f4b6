"""The balancing ablation's report: results.json, report.md and its plots, written from
saved runs (saved_runs.py) with the statistics, Pareto view and verdicts beside it."""

from __future__ import annotations

import json
import math
import os

from deepseek_jax import balancing
from deepseek_jax.ablation import saved_runs
from deepseek_jax.ablation.pareto import (FAMILIES, LOSS_FAMILIES, matched_comparisons,
                                          pareto_points)
from deepseek_jax.ablation.plots import (plot_load_heatmap, plot_maxvio_batch, plot_pareto,
                                         plot_val_loss)
from deepseek_jax.ablation.stats import paired, seed_table
from deepseek_jax.ablation.verdicts import (dilemma_verdict, pareto_verdict, seeded_verdict,
                                            verdict)

# LFB Table 2 (validation perplexity / MaxVio_global) and V3 4.5.3, for the report.
PAPER_TABLE = (
    ("LFB 1B (64 routed top-6, 100B tokens)", "aux loss a=1e-3", 9.56, 0.72),
    ("LFB 1B (64 routed top-6, 100B tokens)", "loss-free u=1e-3", 9.50, 0.04),
    ("LFB 3B (200B tokens)", "aux loss a=1e-3", 7.97, 0.52),
    ("LFB 3B (200B tokens)", "loss-free u=1e-3", 7.92, 0.04),
    ("LFB 1B, update-rule ablation", "magnitude update u=1e-3", 9.51, 0.036),
    ("LFB 1B, bias-use ablation", "multiplicative bias", 9.52, 0.036),
)
# Our strategy -> (PPL, MaxVio_global) of its row in LFB's 1B tables (SPEC section 4).
LFB_1B_BY_STRATEGY = {"aux": (9.56, 0.72), "bias": (9.50, 0.04),
                      "bias_magnitude": (9.51, 0.036), "bias_mult": (9.52, 0.036)}


def write_report(runs: dict, out_dir: str, title: str = "Balancing ablation") -> dict:
  """runs: {name: saved_runs.load_run(...)} (names `strategy_seedK` group by strategy).
  Writes results.json, report.md and PNGs; returns {name: summary}."""
  os.makedirs(out_dir, exist_ok=True)
  results = {name: saved_runs.summarize(run) for name, run in runs.items()}
  groups = saved_runs.group_by_strategy(results)
  multi_seed = any(len(v) > 1 for v in groups.values())
  points = pareto_points(groups)
  sweep = _is_sweep(points)
  extra = _statistics(groups, points, multi_seed, sweep)
  summary = {n: {k: v for k, v in r.items() if k != "val_load"} for n, r in results.items()}
  with open(os.path.join(out_dir, "results.json"), "w") as fh:
    json.dump({"runs": summary, **extra}, fh, indent=1)
  heatmaps = _plot_runs(runs, results, groups, out_dir)
  if sweep:
    any_gate = next(iter(runs.values()))["config"]["model"].get("score_func", "")
    plot_pareto(points, os.path.join(out_dir, "pareto.png"), title=f"{any_gate} gate")

  lines = [f"# {title}", "", *_run_table(runs, groups, results), *_strategy_section(groups)]
  if multi_seed:
    lines += _seed_section(groups, extra["seeds"])
  if sweep:
    lines += _pareto_section(points, extra.get("matched"))
  lines += _paper_section()
  if not multi_seed:
    lines += ["", *verdict(results)]
  lines += ["", "![validation loss](val_loss.png)", "", "![MaxVio_batch](maxvio_batch.png)",
            ""]
  lines += [f"![{h}]({h})" for h in heatmaps]
  with open(os.path.join(out_dir, "report.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  return results


def _is_sweep(points: list[dict]) -> bool:
  """The Pareto view is for sweeps: the bias and a loss family present, one family at
  several knobs."""
  n_fam = {f: sum(p["family"] == f for p in points) for f in LOSS_FAMILIES + ("bias",)}
  return (n_fam["bias"] >= 1 and any(n_fam[f] for f in LOSS_FAMILIES)
          and max(n_fam.values()) >= 2)


def _statistics(groups: dict, points: list[dict], multi_seed: bool, sweep: bool) -> dict:
  """What results.json holds beside the runs: the seed table and the differences paired
  against aux (several seeds), the Pareto points (a sweep), the matched comparisons
  (both)."""
  extra = {}
  if multi_seed:
    extra["seeds"] = seed_table(groups)
    extra["paired_vs_aux"] = {s: {k: paired(groups, "aux", s, k)
                                  for k in ("val_loss", "maxvio_global")}
                              for s in groups if s != "aux" and "aux" in groups}
  if sweep:
    extra["pareto"] = points
    if multi_seed:
      extra["matched"] = matched_comparisons(groups, points)
  return extra


def _plot_runs(runs: dict, results: dict, groups: dict, out_dir: str) -> list[str]:
  """The loss and MaxVio curves, and a load heatmap per strategy (its first seed); returns
  the heatmaps' file names."""
  plot_val_loss(runs, os.path.join(out_dir, "val_loss.png"))
  plot_maxvio_batch(runs, os.path.join(out_dir, "maxvio_batch.png"))
  heatmaps = []
  for name, r in results.items():
    m = saved_runs.SEED_SUFFIX.match(name)
    if "val_load" in r and (m is None or int(m.group(2)) == min(groups[m.group(1)])):
      n_moe = runs[name]["config"]["model"]["n_layers"] - runs[name]["config"]["model"][
          "first_k_dense"]
      f = f"load_{name}.png"
      plot_load_heatmap(name, r, n_moe, os.path.join(out_dir, f))
      heatmaps.append(f)
  return heatmaps


def _format_value(v, spec=".3f"):
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _format_interval(iv, spec=".4f"):
  """mean ± 95% half-width, or the mean alone for one seed."""
  if iv["n"] == 1 or math.isnan(iv["ci95"]):
    return format(iv["mean"], spec)
  return f"{format(iv['mean'], spec)} ± {format(iv['ci95'], spec)}"


def _run_table(runs: dict, groups: dict, results: dict) -> list[str]:
  """The setup in one line, then one table row per run."""
  any_run = next(iter(runs.values()))["config"]
  m = any_run["model"]
  seeds = sorted({s for v in groups.values() for s in v})
  lines = [
      f"Model: d_model {m['d_model']}, {m['n_layers']} layers ({m['first_k_dense']} dense), "
      f"{m['n_shared_experts']} shared + {m['n_routed_experts']} routed experts, "
      f"top-{m['top_k']}, {m['score_func']} gate; {any_run['batch_size']} x "
      f"{any_run['seq_len']} tokens per step, seed(s) {', '.join(map(str, seeds))}. Data: "
      f"{any_run['data']['source']} ({any_run['data']['tokenizer']} tokenizer).", "",
      "| run | steps | val loss | val PPL | MaxVio_global | MaxVio_batch | "
      "dropped | tokens/s | paper PPL / MaxVio_global (LFB 1B) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    paper = LFB_1B_BY_STRATEGY.get(name)
    lines.append(
        f"| {name} | {r['steps']} | {_format_value(r['val_loss'], '.4f')} | "
        f"{_format_value(r['val_ppl'], '.2f')} | "
        f"{_format_value(r.get('maxvio_global'))} | {_format_value(r.get('maxvio_batch'))} | "
        f"{_format_value(r.get('dropped_frac'), '.4f')} | "
        f"{_format_value(r['tokens_per_s'], ',.0f')} | "
        f"{'%g / %g' % paper if paper else ''} |")
  return lines


def strategy_of(group: str) -> str | None:
  """The registry's strategy a run group is (a sweep's `bias_u0.01` is `bias`,
  `bias_magnitude_u0.01` is `bias_magnitude`), or None."""
  names = [s for s in balancing.STRATEGIES if group == s or group.startswith(s + "_")]
  return max(names, key=len, default=None)


def _strategy_section(groups: dict) -> list[str]:
  """What each strategy in the table is (deepseek_jax/balancing.py STRATEGIES)."""
  found = dict.fromkeys(s for s in map(strategy_of, groups) if s)
  return ["", "Strategies:", "", *(f"- **{s}**: {balancing.STRATEGIES[s].definition}."
                                   for s in found)] if found else []


def _seed_section(groups: dict, table: dict) -> list[str]:
  """Each strategy over its seeds, and its differences from aux paired seed by seed."""
  lines = ["", "Over seeds (mean ± 95% t-interval half-width; n seeds):", "",
           "| strategy | n | val loss | MaxVio_global |", "|---|---|---|---|"]
  for s, t in table.items():
    lines.append(f"| {s} | {t['val_loss']['n']} | {_format_interval(t['val_loss'])} | "
                 + (f"{_format_interval(t['maxvio_global'], '.3f')} |"
                    if "maxvio_global" in t else "n/a |"))
  pv = seeded_verdict(groups)
  if pv:
    lines += ["", "Paired differences against aux, seed by seed:", "", *pv]
  return lines


def _pareto_section(points: list[dict], matched: dict | None) -> list[str]:
  """The Pareto table, its verdict, the dilemma per family (several seeds), the plot."""
  lines = ["", "Pareto view (mean ± 95% half-width over seeds where several; "
           "dominance on the means, * where the intervals overlap on both axes):", "",
           "| run | family | knob | val loss | MaxVio_global | dominated by |",
           "|---|---|---|---|---|---|"]
  order = {f: i for i, f in enumerate(FAMILIES)}
  for p in sorted(points, key=lambda p: (order[p["family"]], p["knob"])):
    dom = ", ".join(n + ("*" if n in p["within_noise"] else "") for n in p["dominated_by"])
    loss = dict(n=p["n"], mean=p["val_loss"], ci95=p["val_loss_ci95"])
    vio = dict(n=p["n"], mean=p["maxvio_global"], ci95=p["maxvio_global_ci95"])
    lines.append(f"| {p['name']} | {p['family']} | {p['knob']:g} | "
                 f"{_format_interval(loss)} | {_format_interval(vio, '.3f')} | {dom or '-'} |")
  lines += ["", *pareto_verdict(points)]
  if matched is not None:
    lines += ["", "The dilemma per family, and the bias against it (seed-paired 95% "
              "intervals; the bias run with the best mean balance against the family's "
              "lowest-loss run at least as balanced):", "", *dilemma_verdict(matched)]
  return lines + ["", "![pareto](pareto.png)"]


def _paper_section() -> list[str]:
  lines = ["", "LFB Table 2 (validation perplexity / MaxVio_global):", "",
           "| model | strategy | PPL | MaxVio_global |", "|---|---|---|---|"]
  return lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in PAPER_TABLE]
