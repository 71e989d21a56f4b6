"""Benchmark (not a test) of the expert-parallel MoE layer on simulated CPU devices:
bytes its all-to-all moves per token (measured, analytic, expected), wire bytes, rounds,
drops, and its time against one device (deepseek_jax/bench/expert_traffic.py).

  python -m experiments.bench_expert_parallel
  python -m experiments.bench_expert_parallel --meshes=2x4 --tokens=4096 --dtype=bfloat16
"""

import json

from absl import app, flags

from experiments import launch

_MESHES = flags.DEFINE_list("meshes", ["1x8", "2x4", "4x2"], "data x expert meshes.")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens per MoE layer call (all shards).")
_SEQ = flags.DEFINE_integer("seq", 64, "Sequence length (tokens = batch * seq).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 1.25, "The capacity setting's factor.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls (median reported).")
_PRESET = flags.DEFINE_string("preset", "small", "Model preset (config.PRESETS).")
_OUT = flags.DEFINE_string("out", None, "Also write the results as JSON here.")
flags.FLAGS.set_default("cpu_devices", 8)


def main(argv):
  del argv
  launch.init_distributed()
  from deepseek_jax.bench import expert_traffic
  results = expert_traffic.run(_MESHES.value, _TOKENS.value, _SEQ.value, _DTYPE.value,
                               _CAPACITY.value, _REPEATS.value, _PRESET.value,
                               log=lambda line: print(line, flush=True))
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
