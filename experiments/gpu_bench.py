"""The GPU benchmark (issue 22): tokens/s and MFU of configs/gpu_1b.py per attention and
expert path, the Hugging Face reference on the same GPU, the grouped GEMM against
ragged_dot, absorbed vs naive decoding at 4K. scripts/gpu_bench.sh runs it on a GPU box.

  python -m experiments.gpu_bench --out=gpu_bench.json [--profile_dir=DIR]
  python -m experiments.gpu_bench --tiny --out=/tmp/g.json     # CPU smoke run, seconds
"""

import json
import os
import sys

from absl import app, flags

from experiments import launch

_OUT = flags.DEFINE_string("out", None, "JSON file to write (rewritten after each part).")
_PARTS = flags.DEFINE_list("parts", ["train", "hf", "gemm", "decode"], "Which parts to run.")
_VARIANTS = flags.DEFINE_list("variants", [], "train part: only these variants (names as "
                              "in gpu_speed.TRAIN_VARIANTS; default all).")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per train step.")
_SEQ = flags.DEFINE_integer("seq", 2048, "Tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 6, "Timed repetitions (medians).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Trace 3 steps of the first train "
                               "variant here and report op time per model part.")
_DEADLINE = flags.DEFINE_float("deadline_s", 420.0, "Skip the parts not started by then.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny sizes on any backend (a smoke run).")
flags.mark_flag_as_required("out")


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.bench import gpu_speed
  unknown = set(_VARIANTS.value) - {v[0] for v in gpu_speed.TRAIN_VARIANTS}
  if unknown:
    raise app.UsageError(f"--variants: unknown {sorted(unknown)}; known: "
                         f"{[v[0] for v in gpu_speed.TRAIN_VARIANTS]}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)

  def save(results):
    with open(_OUT.value + ".tmp", "w") as fh:
      json.dump(results, fh, indent=1, sort_keys=True)
    os.replace(_OUT.value + ".tmp", _OUT.value)

  batch, seq = (2, 32) if _TINY.value else (_BATCH.value, _SEQ.value)
  results = gpu_speed.run(_PARTS.value, batch, seq, _REPEATS.value, _PROFILE.value,
                          _DEADLINE.value, save, tiny=_TINY.value,
                          variants=_VARIANTS.value)
  for k in sorted(results):
    v = results[k]
    sys.stdout.write(f"{k}  {v:,.4g}\n" if isinstance(v, float) else f"{k}  {v}\n")


if __name__ == "__main__":
  app.run(main)
