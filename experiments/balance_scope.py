"""Where should loads be balanced? Micro-batch vs global scope, mixed vs single-domain.

  python -m experiments.balance_scope --workdir=/tmp/scope --quick   # <= 10 min, 2 cores
  python -m experiments.balance_scope --workdir=/tmp/scope           # the full sweep

Sweeps {bias, batch_aux, seq_aux, quantile} x {micro, global scope} x {mixed,
single_domain micro-batches} over 3 seeds (--quick: bias and batch_aux, 2 seeds, 100
steps) on the embedded code / prose / structured domains (configs/balance_scope.py),
then evaluates each run on each domain and writes WORKDIR/report.md, results.json and
cells.png (deepseek_jax/ablation/balance_scope.py). Killed, it resumes with the same
command; finished runs and their evaluations are reused. --config.PATH=VALUE changes a
field of every run (e.g. --config.data.domain_bytes=1048576), as experiments.train
takes it; see --config's help.
"""

import os

from absl import flags
from ml_collections import config_flags

from configs import balance_scope as scope_config
from experiments import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_QUICK = flags.DEFINE_bool("quick", False, "The short variant (bias and batch_aux, 2 seeds, "
                           "100 steps).")
_STRATEGIES = flags.DEFINE_list("strategies", None, "Override the strategies swept.")
_SEEDS = flags.DEFINE_list("seeds", None, "Override the seeds.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps a run.")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs trained at once (own processes).")
_CONFIG = launch.define_config_overrides(
    scope_config.get_config(), "configs/balance_scope.py", "Overrides of run-config "
    "fields for every run, as experiments.train takes them: --config.PATH=VALUE, typed "
    "and checked against configs/balance_scope.py. They apply after each run's own "
    "settings (its cell, seed and steps) and win over them, except a field the runs set "
    "differently from one another (the count scope, the composition, a strategy's knob, "
    "the seed): that one is refused; choose it with --strategies or --seeds.")
flags.declare_key_flag("config")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.ablation import balance_scope as bs
  from deepseek_jax.ablation import balance_scope_report, runner
  if _PARALLEL.value < 1:
    launch.fail(f"--parallel must be >= 1; got {_PARALLEL.value}")
  try:
    preset = bs.preset(_QUICK.value, _STRATEGIES.value, _SEEDS.value, _STEPS.value)
    cells = bs.plan(preset["strategies"])
    jobs = runner.apply_overrides(bs.jobs(cells, preset["seeds"], preset["steps"]),
                                  config_flags.get_override_values(flags.FLAGS["config"]))
  except ValueError as e:
    launch.fail(str(e))
  print(f"=== balance scope: {len(cells)} cells x {len(preset['seeds'])} seeds = "
        f"{len(jobs)} runs of {preset['steps']} steps", flush=True)
  try:
    runner.train_jobs(jobs, _WORKDIR.value, parallel=_PARALLEL.value)
  except runner.trainer.ConfigError as e:   # the runs' config (--config.*): one line
    launch.fail(str(e))
  except runner.Interrupted as e:
    print(f"=== interrupted: {e}")
    return 1
  evals = {}
  for name, _ in jobs:
    evals[name] = bs.evaluate_run(os.path.join(_WORKDIR.value, name),
                                  preset["eval_batches"])
  rows = bs.summarise(cells, preset["seeds"], evals)
  results = balance_scope_report.write(rows, _WORKDIR.value)
  print(open(os.path.join(_WORKDIR.value, "report.md")).read())
  return 0 if results["cells"] else 1


if __name__ == "__main__":
  launch.run(main)
