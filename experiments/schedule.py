"""A run's recipe before you rent the pod: learning rate, batch size, MTP lambda and
bias rate against tokens, with the tokens and steps at every phase boundary.

  python -m experiments.schedule --config=configs/deepseek_v3_671b.py
  python -m experiments.schedule --config=configs/deepseek_v3_671b.py --out=recipe.json \
      --plot=recipe.png --at_tokens=0,469B,10T,14.3T,14.8T

Values are the config's schedules (train/recipe.py) as functions of tokens seen; a
point's "step" is the step during which the run crosses that many tokens (a switch
takes effect from the first step that starts at or past it).
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Write the boundaries (and points) as JSON here.")
_PLOT = flags.DEFINE_string("plot", None, "Plot the four schedules against tokens (PNG).")
_AT = flags.DEFINE_list("at_tokens", [], "Token counts (10T, 333B, 4.3e12) to report the "
                        "values in force at.")
flags.mark_flag_as_required("config")


def _fmt_tokens(t: float) -> str:
  for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if t >= div:
      return f"{t / div:.6g}{suffix}"
  return f"{t:.0f}"


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.4g}"


def table(rows) -> str:
  head = f"{'tokens':>10} {'step':>9} {'lr':>9} {'batch':>6} {'mtp':>5} {'bias u':>7}  events"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{_fmt_tokens(r['tokens']):>10} {r['step']:>9,} {_fmt(r['lr']):>9} "
                 f"{r['batch_size']:>6} {_fmt(r['mtp_lambda']):>5} {_fmt(r['bias_rate']):>7}"
                 f"  {r.get('events', '')}")
  return "\n".join(lines)


def plot(recipe, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  end = recipe.total_tokens or float(recipe.tokens_at_step(max(recipe._starts) + 1))
  ts = np.linspace(0.0, end, 2000)
  ts = np.unique(np.concatenate([ts, [r["tokens"] for r in recipe.boundaries()]]))
  pts = [recipe.point(float(t)) for t in ts]
  fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
  for ax, key, label in zip(axes, ("lr", "batch_size", "mtp_lambda", "bias_rate"),
                            ("learning rate", "batch (sequences)", "MTP lambda",
                             "bias update rate u")):
    ys = [p[key] for p in pts]
    if all(y is None for y in ys):
      ax.text(0.5, 0.5, "not scheduled by tokens", ha="center", transform=ax.transAxes)
    else:
      ax.plot(ts / 1e12 if end >= 1e12 else ts, ys, drawstyle="steps-post"
              if key != "lr" else "default")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[-1].set_xlabel("tokens (T)" if end >= 1e12 else "tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def extension_rows(cfg) -> list[dict]:
  """The config's context-extension stages (config.extension) in order."""
  rows = []
  for name, s in (cfg.get("extension") or {}).items():
    rows.append({"stage": name, "seq_len": s.seq_len, "batch_size": s.batch_size,
                 "tokens_per_step": s.seq_len * s.batch_size, "steps": s.steps,
                 "tokens": s.seq_len * s.batch_size * s.steps, "lr": s.lr,
                 "rope_factor": s.rope_factor,
                 "rope_original_max_len": s.rope_original_max_len,
                 "mesh": " ".join(f"{a}={n}" for a, n in s.mesh.items())})
  return sorted(rows, key=lambda r: r["seq_len"])


def extension_table(rows) -> str:
  head = (f"{'stage':>6} {'seq_len':>8} {'batch':>6} {'tokens/step':>11} {'steps':>6} "
          f"{'tokens':>8} {'lr':>8} {'YaRN s':>6}  mesh")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['stage']:>6} {r['seq_len']:>8,} {r['batch_size']:>6,} "
                 f"{_fmt_tokens(r['tokens_per_step']):>11} {r['steps']:>6,} "
                 f"{_fmt_tokens(r['tokens']):>8} {_fmt(r['lr']):>8} "
                 f"{r['rope_factor']:>6g}  {r['mesh']} (bias frozen, MTP at its late weight)")
  return "\n".join(lines)


def main(argv):
  del argv
  from deepseek_jax.train.recipe import Recipe, parse_tokens
  cfg = _CONFIG.value
  try:
    recipe = Recipe(cfg)
    at = [parse_tokens(t) for t in _AT.value]
  except ValueError as e:
    sys.exit(f"experiments.schedule: {e}")
  rows = recipe.boundaries()
  print(table(rows))
  print(f"\ntotal: {_fmt_tokens(recipe.total_tokens or 0)} tokens in {cfg.total_steps:,} "
        f"steps (config.total_steps); batch stages: "
        + ", ".join(f"{s.batch} from step {s.start_step:,}" for s in recipe.stages))
  extension = extension_rows(cfg)
  if extension:
    print("\ncontext extension (each stage a run of its own: --config=FILE:NAME "
          "--config.init_from=PREVIOUS_RUN):\n" + extension_table(extension))
  points = [recipe.point(t) for t in at]
  if points:
    print("\n" + table(points))
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump({"boundaries": rows, "points": points, "total_steps": int(cfg.total_steps),
                 "total_tokens": recipe.total_tokens, "extension": extension,
                 "stages": [vars(s) for s in recipe.stages]}, fh, indent=1)
  if _PLOT.value:
    plot(recipe, _PLOT.value)


if __name__ == "__main__":
  launch.run(main)
