"""Where should loads be balanced? Micro-batch vs global scope, mixed vs single-domain.

  python -m experiments.balance_scope --workdir=/tmp/scope --quick   # <= 10 min, 2 cores
  python -m experiments.balance_scope --workdir=/tmp/scope           # the full sweep

Sweeps {bias, batch_aux, seq_aux, quantile} x {micro, global scope} x {mixed,
single_domain micro-batches} over 3 seeds (--quick: bias and batch_aux, 2 seeds, 100
steps) on the embedded code / prose / structured domains (configs/balance_scope.py),
then evaluates each run on each domain and writes WORKDIR/report.md, results.json and
cells.png (deepseek_jax/ablation/balance_scope.py). Killed, it resumes with the same
command; finished runs and their evaluations are reused.
"""

import os

from absl import app, flags

from experiments import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_QUICK = flags.DEFINE_bool("quick", False, "The short variant (bias and batch_aux, 2 seeds, "
                           "100 steps).")
_STRATEGIES = flags.DEFINE_list("strategies", None, "Override the strategies swept.")
_SEEDS = flags.DEFINE_list("seeds", None, "Override the seeds.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps a run.")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs trained at once (own processes).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.ablation import balance_scope as bs
  from deepseek_jax.ablation import balance_scope_report, runner
  preset = dict(bs.QUICK if _QUICK.value else bs.FULL)
  if _STRATEGIES.value:
    preset["strategies"] = tuple(_STRATEGIES.value)
  if _SEEDS.value:
    try:
      preset["seeds"] = tuple(int(s) for s in _SEEDS.value)
    except ValueError:
      raise app.UsageError(f"--seeds takes integers; got {_SEEDS.value}") from None
  if _STEPS.value is not None:
    if _STEPS.value < 1:
      raise app.UsageError(f"--steps must be >= 1; got {_STEPS.value}")
    preset["steps"] = _STEPS.value
  if _PARALLEL.value < 1:
    raise app.UsageError(f"--parallel must be >= 1; got {_PARALLEL.value}")
  try:
    cells = bs.plan(preset["strategies"])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  jobs = bs.jobs(cells, preset["seeds"], preset["steps"])
  print(f"=== balance scope: {len(cells)} cells x {len(preset['seeds'])} seeds = "
        f"{len(jobs)} runs of {preset['steps']} steps", flush=True)
  try:
    runner.train_jobs(jobs, _WORKDIR.value, parallel=_PARALLEL.value)
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
