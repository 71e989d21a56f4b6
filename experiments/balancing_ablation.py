"""The headline experiment: auxiliary-loss vs auxiliary-loss-free (bias) balancing.

  python -m experiments.balancing_ablation --workdir=/tmp/ablation
  python -m experiments.balancing_ablation --workdir=DIR --strategies=aux,bias --steps=1000
  python -m experiments.balancing_ablation --workdir=DIR --sweep=rate
  python -m experiments.balancing_ablation --workdir=DIR --sweep=pareto --seeds=0,1,2 \
      --reuse=runs/ablation            # the main job's runs are not retrained
  python -m experiments.balancing_ablation --workdir=DIR --sweep=pareto --gate=softmax
  python -m experiments.balancing_ablation --workdir=DIR --seeds=0,1,2   # intervals
  python -m experiments.balancing_ablation --workdir=DIR --size=medium --cpu_devices=8 \
      --override=mesh.data=8

Writes DIR/results.json, DIR/report.md and PNG plots; each strategy's run (checkpoints,
metrics.jsonl, TensorBoard) is in DIR/<strategy>.
"""

from absl import app, flags

from experiments import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
# The default four fit the 15-minute budget on 2 CPU cores (BUILD_NOTES.md, "Balancing
# ablation (the main job)"): no balancing, the aux loss, the aux-loss-free bias and
# Quantile Balancing; add bias_seq_aux, seq_aux, batch_aux, bias_magnitude, bias_mult,
# bias_freeze, ... (configs/small.py STRATEGIES) as needed.
_STRATEGIES = flags.DEFINE_list("strategies", ["none", "aux", "bias", "quantile"],
                                "Strategies to compare (configs/small.py STRATEGIES).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per strategy (default: the "
                              "size's own).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed (same for every strategy).")
_SEEDS = flags.DEFINE_list("seeds", None, "Several seeds (e.g. 0,1,2): every strategy on "
                           "every seed; the report gives means, 95% intervals and paired "
                           "differences against aux. Overrides --seed.")
_SIZE = flags.DEFINE_enum("size", "small", ["tiny", "small", "medium"], "Model size.")
_SWEEP = flags.DEFINE_string("sweep", "", "Instead of --strategies: 'rate' (the bias at u "
                             "in {1e-4, 1e-3, 1e-2}) or 'pareto' (the aux, batch_aux and "
                             "seq_aux losses at alpha in {1e-4, 1e-3, 1e-2, 1e-1}, the bias "
                             "at u in {1e-4, 1e-3, 1e-2}, quantile and none: validation "
                             "loss against MaxVio_global) or 'lfb_softmax' (with "
                             "--gate=softmax: the magnitude-rule bias against aux at "
                             "alpha 1e-4, 3e-4, 1e-3).")
_GATE = flags.DEFINE_enum("gate", "sigmoid", ["sigmoid", "softmax"], "The router's "
                          "affinities for every run: sigmoid (V3, LFB's 1B) or softmax "
                          "(V2; LFB's softmax comparison).")
_REUSE = flags.DEFINE_list("reuse", [], "Folders of earlier ablations whose finished runs "
                           "with the same config are copied in instead of retrained.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Config overrides key=value "
                                      "(e.g. mesh.data=8), applied to every run.")
_PEAK = flags.DEFINE_float("peak_flops", None, "Declared peak FLOP/s for MFU.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 2, "Runs trained at once, each in its own process (console in "
    "DIR/<run>/console.log): 2 trains 1.38x faster than 1 on 2 CPU cores, with the same "
    "results. 1: one after the other in this process. Single-process jobs only.")
flags.mark_flag_as_required("workdir")


def _parse(kv):
  k, v = kv.split("=", 1)
  for cast in (int, float):
    try:
      return k, cast(v)
    except ValueError:
      pass
  return k, {"true": True, "false": False}.get(v.lower(), v)


def main(argv):
  del argv
  launch.init_distributed()
  from configs import small
  from deepseek_jax.ablation import runner as ablation
  try:
    runs = ablation.plan(_STRATEGIES.value, _SWEEP.value)
    seeds = [int(s) for s in _SEEDS.value] if _SEEDS.value else [_SEED.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--seeds has a repeated seed: {seeds}")
  for name, _ in runs:
    if not _SWEEP.value and name not in small.STRATEGIES:
      raise app.UsageError(f"unknown strategy {name!r}; known: {sorted(small.STRATEGIES)}")
  if _SWEEP.value == "lfb_softmax" and _GATE.value != "softmax":
    raise app.UsageError("--sweep=lfb_softmax is LFB's softmax-gate setting: add "
                         "--gate=softmax")
  if _PARALLEL.value < 1:
    raise app.UsageError(f"--parallel must be >= 1; got {_PARALLEL.value}")
  import jax
  # Lanes are separate processes: a multi-process (multi-host) job trains one run at a
  # time across all its processes instead.
  parallel = _PARALLEL.value if jax.process_count() == 1 else 1
  try:
    ablation.run(small.get_config, runs, _WORKDIR.value, size=_SIZE.value,
                 steps=_STEPS.value, seeds=seeds, peak_flops=_PEAK.value,
                 overrides=dict(_parse(kv) for kv in _OVERRIDE.value), parallel=parallel,
                 reuse=_REUSE.value, gate=_GATE.value)
  except ValueError as e:
    if "--reuse" not in str(e):
      raise
    raise app.UsageError(str(e)) from None
  except ablation.Interrupted as e:
    print(f"=== interrupted: {e}")
    return 1
  print(open(f"{_WORKDIR.value}/report.md").read())


if __name__ == "__main__":
  app.run(main)
