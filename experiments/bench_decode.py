"""Decode benchmarks (not tests), one JSON line per measurement (deepseek_jax/
benchmark_decode.py holds the measurements; experiments/bench.py runs the headline two).

  python -m experiments.bench_decode --part=absorb            # --contexts=256,...,8192
  python -m experiments.bench_decode --part=kv_bytes
  python -m experiments.bench_decode --part=speculative --workdir=DIR   # MTP-trained run
  python -m experiments.bench_decode --part=round_cost        # --layers=4,16

absorb: one decode step (batch 1) with the cache filled to each context length, on a
model with V2-Lite's attention in two dense layers. speculative: plain vs MTP-drafted
greedy decoding on validation prompts of the run's corpus. round_cost: device time of
one plain step and one speculative round on random weights: whether speculation can pay
depends on that ratio, not on the weights.
"""

import json
import sys

from absl import app, flags

from experiments import launch

_PART = flags.DEFINE_enum("part", "absorb",
                          ["absorb", "kv_bytes", "speculative", "round_cost"], "")
_CONTEXTS = flags.DEFINE_list("contexts", ["256", "512", "1024", "2048", "4096", "8192"],
                              "Cache lengths for --part=absorb.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "absorb: timed steps per point (median); "
                                "speculative: runs per batch and mode (fastest kept).")
_WORKDIR = flags.DEFINE_string("workdir", None, "--part=speculative: a run with MTP.")
_DEPTHS = flags.DEFINE_list("depths", [], "--part=speculative: MTP depths to try (the "
                            "first k modules of the run); default: all of them.")
_N_PROMPTS = flags.DEFINE_integer("n_prompts", 8, "--part=speculative: validation prompts.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "")
_BATCH = flags.DEFINE_integer("batch", 1, "--part=speculative: prompts decoded together.")
_LAYERS = flags.DEFINE_list("layers", ["4", "16"], "--part=round_cost: main-model depths.")
_OUT = flags.DEFINE_string("out", None, "Append results as JSON lines here.")


def _emit(record):
  print(json.dumps(record))
  if _OUT.value:
    with open(_OUT.value, "a") as fh:
      fh.write(json.dumps(record) + "\n")


def _speculative(bd):
  from deepseek_jax.inference import decoding
  if not _WORKDIR.value:
    raise app.UsageError("--part=speculative needs --workdir (a run with mtp_depth >= 1)")
  try:
    model, variables, run_cfg, step = decoding.load_workdir(_WORKDIR.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  if model.cfg.mtp_depth < 1:
    raise app.UsageError(f"{_WORKDIR.value} has no MTP modules")
  prompts = bd.validation_prompts(run_cfg, model.cfg.vocab_size, _N_PROMPTS.value,
                                  _PROMPT_LEN.value)
  res = bd.speculative_vs_plain(model, variables, prompts, _MAX_NEW.value,
                                depths=[int(d) for d in _DEPTHS.value] or None,
                                batch=_BATCH.value, repeats=_REPEATS.value)
  for mode, row in res.items():
    _emit({"part": "speculative", "mode": mode, "step": step, "prompts": len(prompts),
           "batch": _BATCH.value, "max_new_tokens": _MAX_NEW.value, **row})


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.bench import decode_speed as bd
  if _PART.value == "speculative":
    _speculative(bd)
    return
  rows = {"absorb": lambda: bd.absorbed_vs_naive([int(c) for c in _CONTEXTS.value],
                                                 repeats=_REPEATS.value),
          "kv_bytes": bd.kv_bytes,
          "round_cost": lambda: bd.round_cost([int(n) for n in _LAYERS.value],
                                              repeats=_REPEATS.value)}[_PART.value]()
  for row in rows:
    _emit({"part": _PART.value, **row})
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
