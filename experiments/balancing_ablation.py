r"""The headline experiment: auxiliary-loss vs auxiliary-loss-free (bias) balancing.

  python -m experiments.balancing_ablation --workdir=/tmp/ablation
  python -m experiments.balancing_ablation --workdir=DIR --strategies=aux,bias --steps=1000
  python -m experiments.balancing_ablation --workdir=DIR --sweep=rate
  python -m experiments.balancing_ablation --workdir=DIR --sweep=pareto --seeds=0,1,2 \
      --reuse=runs/ablation            # the main job's runs are not retrained
  python -m experiments.balancing_ablation --workdir=DIR --sweep=pareto --gate=softmax
  python -m experiments.balancing_ablation --workdir=DIR --seeds=0,1,2   # intervals
  python -m experiments.balancing_ablation --workdir=DIR --size=medium --cpu_devices=8 \
      --config.mesh.data=8

Writes DIR/results.json, DIR/report.md and PNG plots; each strategy's run (checkpoints,
metrics.jsonl, TensorBoard) is in DIR/<strategy>.
"""

from absl import flags
from ml_collections import config_flags

from configs import small
from deepseek_jax import balancing
from deepseek_jax.ablation import runner as ablation
from experiments import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_STRATEGIES = flags.DEFINE_list(
    "strategies", list(ablation.DEFAULT_STRATEGIES), "Strategies to compare, from "
    "deepseek_jax/balancing.py STRATEGIES: " + "; ".join(
        f"{s.name}: {s.description}" for s in balancing.STRATEGIES.values()) + ".")
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
_CONFIG = launch.define_config_overrides(
    small.get_config(), "configs/small.py", "Overrides of run-config fields for every run, "
    "as experiments.train takes them: --config.PATH=VALUE (e.g. --config.mesh.data=8 "
    "--config.total_steps=100), typed and checked against configs/small.py. They apply "
    "after each run's own settings (--size, its strategy or sweep point, --steps, --gate, "
    "the seed) and win over them, except a field the runs set differently from one "
    "another (a strategy's knob among several strategies, the seed under --seeds): that "
    "one is refused; choose it with --strategies, --sweep or --seeds. --steps also scales "
    "eval_every, checkpoint_every and the warmup; --config.total_steps sets that field "
    "alone.")
flags.declare_key_flag("config")
_PEAK = flags.DEFINE_float("peak_flops", None, "Declared peak FLOP/s for MFU.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 2, "Runs trained at once, each in its own process (console in "
    "DIR/<run>/console.log): 2 trains 1.38x faster than 1 on 2 CPU cores, with the same "
    "results. 1: one after the other in this process. Single-process jobs only.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  launch.init_distributed()
  runs = None
  try:
    runs = ablation.plan(_STRATEGIES.value, _SWEEP.value)
    seeds = [int(s) for s in _SEEDS.value] if _SEEDS.value else [_SEED.value]
  except ValueError as e:
    launch.fail(str(e) if runs is None else f"--seeds takes integers; got {_SEEDS.value}")
  if len(set(seeds)) != len(seeds):
    launch.fail(f"--seeds has a repeated seed: {seeds}")
  if _SWEEP.value == "lfb_softmax" and _GATE.value != "softmax":
    launch.fail("--sweep=lfb_softmax is LFB's softmax-gate setting: add --gate=softmax")
  if _PARALLEL.value < 1:
    launch.fail(f"--parallel must be >= 1; got {_PARALLEL.value}")
  import jax
  # Lanes are separate processes: a multi-process (multi-host) job trains one run at a
  # time across all its processes instead.
  parallel = _PARALLEL.value if jax.process_count() == 1 else 1
  try:
    ablation.run(small.get_config, runs, _WORKDIR.value, size=_SIZE.value,
                 steps=_STEPS.value, seeds=seeds, peak_flops=_PEAK.value,
                 overrides=config_flags.get_override_values(flags.FLAGS["config"]),
                 parallel=parallel, reuse=_REUSE.value, gate=_GATE.value)
  except ablation.trainer.ConfigError as e:   # the runs' config (--config.*): one line
    launch.fail(str(e))
  except ValueError as e:
    if not str(e).startswith(("--reuse", "--config.")):
      raise
    launch.fail(str(e))
  except ablation.Interrupted as e:
    print(f"=== interrupted: {e}")
    return 1
  print(open(f"{_WORKDIR.value}/report.md").read())


if __name__ == "__main__":
  launch.run(main)
