"""Where the time goes: our train step vs Hugging Face's on the same CPU, MFU, MoE scaling
with the expert count, absorbed vs naive decode and speculative decoding, the input
pipeline's rate, compile time and peak memory.

  python -m experiments.bench --out=/tmp/bench.json
  python -m experiments.bench --parts=train --no_hf --out=/tmp/b.json
  python -m experiments.bench --parts=train --profile_dir=/tmp/trace --out=/tmp/b.json
  python -m experiments.bench --tiny --out=/tmp/smoke.json     # seconds; what the test runs
"""

import json
import sys

from absl import app, flags

from experiments import launch

_OUT = flags.DEFINE_string("out", None, "JSON file to write.")
_PARTS = flags.DEFINE_list("parts", ["train", "moe", "decode", "data"], "Which parts to "
                           "run (data: the input pipeline's rate against the train step's).")
_HF = flags.DEFINE_bool("hf", True, "Time the Hugging Face reference (needs the parity "
                        "extra).")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny sizes (a smoke run, not a measurement).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repetitions (medians).")
_SPEC_WORKDIR = flags.DEFINE_string("spec_workdir", None, "decode part: a training run "
                                    "with MTP to draft with (default: train configs/"
                                    "smoke.py for 300 steps first, about a minute).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Also trace 3 train steps with "
                               "jax.profiler into this folder and report op time per "
                               "model part (attention, routed/shared experts, ...).")
flags.mark_flag_as_required("out")


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.bench import train_speed as benchmark
  if _SPEC_WORKDIR.value:
    from deepseek_jax.inference import decoding
    try:   # fail before the benchmarks, not after them
      decoding.run_config_path(_SPEC_WORKDIR.value)
    except FileNotFoundError as e:
      raise app.UsageError(f"--spec_workdir: {e}") from None
  results = benchmark.run_all(_PARTS.value, hf=_HF.value, tiny=_TINY.value,
                              repeats=_REPEATS.value, spec_workdir=_SPEC_WORKDIR.value,
                              profile_dir=_PROFILE.value)
  with open(_OUT.value, "w") as fh:
    json.dump(results, fh, indent=1, sort_keys=True)
  benchmark.print_table(results, sys.stdout)


if __name__ == "__main__":
  app.run(main)
