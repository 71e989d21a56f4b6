"""Evaluate a run's latest checkpoint on prepared datasets (experiments.prepare_data).

  python -m experiments.evaluate --workdir=runs/mine --data=data/mine,data/other \
      [--batches=N] [--step=S] [--split=val] [--out=eval.json]

One line per dataset: loss, perplexity and bits per byte (comparable across tokenizers).
"""

import json

from absl import app, flags

from experiments import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_DATA = flags.DEFINE_string("data", None, "Comma-separated prepared dataset folders.")
_BATCHES = flags.DEFINE_integer("batches", None, "Batches per dataset (default: all).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "train"], "Which split to evaluate.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per batch (default: the run's).")
_OUT = flags.DEFINE_string("out", None, "Also write the results as JSON here.")
flags.mark_flags_as_required(["workdir", "data"])


def main(argv):
  del argv
  launch.init_distributed()
  from deepseek_jax.train import evaluation
  if _BATCHES.value is not None and _BATCHES.value < 1:
    raise app.UsageError(f"--batches must be >= 1; got {_BATCHES.value}")
  try:
    out = evaluation.evaluate_prepared(_WORKDIR.value, _DATA.value.split(","),
                                       _BATCHES.value, _STEP.value, _SPLIT.value,
                                       _BATCH.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  for r in out["sources"]:
    print(f"{r['data']}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bits/byte "
          f"{r['bits_per_byte']:.4f}  ({r['tokens']:,} tokens, step {out['step']})")
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  launch.run(main)
