"""Rebuild the balancing table and plots from finished runs (ablation or single runs).

  python -m experiments.report --workdirs=/tmp/ablation/aux,/tmp/ablation/bias --out=/tmp/cmp
  python -m experiments.report --workdirs=/tmp/ablation     # every run inside it
"""

import os

from absl import app, flags

from deepseek_jax.ablation import report, saved_runs

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories, or folders of runs.")
_OUT = flags.DEFINE_string("out", None, "Where to write (default: the first workdir).")
flags.mark_flag_as_required("workdirs")


def _runs(paths):
  found = {}
  for p in paths:
    p = os.path.abspath(p)
    if not os.path.isdir(p):
      raise app.UsageError(f"--workdirs: {p} is not a directory (give run directories, "
                           f"or folders of runs such as an ablation's --workdir)")
    if os.path.exists(os.path.join(p, "metrics.jsonl")):
      found[os.path.basename(p)] = p
    else:
      for d in sorted(os.listdir(p)):
        if os.path.exists(os.path.join(p, d, "metrics.jsonl")):
          found[d] = os.path.join(p, d)
  if not found:
    raise app.UsageError(f"no run (a folder with metrics.jsonl) in {paths}")
  return found


def main(argv):
  del argv
  runs = _runs(_WORKDIRS.value)
  out = _OUT.value or (_WORKDIRS.value[0] if len(runs) > 1 else os.path.dirname(
      next(iter(runs.values()))))
  report.write_report({n: saved_runs.load_run(p) for n, p in runs.items()}, out)
  print(open(os.path.join(out, "report.md")).read())


if __name__ == "__main__":
  app.run(main)
