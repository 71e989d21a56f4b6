"""Evaluate a run's latest checkpoint: loss on prepared datasets, or passkey retrieval.

  python -m experiments.evaluate --workdir=runs/mine --data=data/mine,data/other \
      [--batches=N] [--step=S] [--split=val] [--out=eval.json]
  python -m experiments.evaluate --workdir=runs/mine --task=passkey \
      --lengths=64,256,1024 [--n=16] [--out=passkey.json]

--task=loss (default): one line per dataset: loss, perplexity and bits per byte
(comparable across tokenizers). --task=passkey: one line per length: the share of n
prompts whose hidden five-digit key the model retrieves greedily (train/passkey.py).
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
_TASK = flags.DEFINE_enum("task", "loss", ["loss", "passkey"], "What to evaluate.")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024"], "Passkey prompt lengths (tokens).")
_N = flags.DEFINE_integer("n", 16, "Passkey prompts per length (keys at evenly spread "
                          "depths).")
flags.mark_flags_as_required(["workdir"])


def passkey():
  from deepseek_jax.train import passkey
  try:
    lengths = [int(x) for x in _LENGTHS.value]
  except ValueError:
    raise app.UsageError(f"--lengths must be integers; got {','.join(_LENGTHS.value)}")
  if _N.value < 1 or min(lengths) < 1:
    raise app.UsageError("--n and every --lengths value must be >= 1")
  try:
    out = passkey.evaluate_passkey(_WORKDIR.value, lengths, _N.value, _STEP.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  for length, r in out["lengths"].items():
    print(f"passkey at {length} tokens: {r['accuracy']:.0%} of {r['n']} retrieved "
          f"(answer tokens {r['token_accuracy']:.0%}; trained at {out['seq_len']}, "
          f"step {out['step']})")
  return out


def main(argv):
  del argv
  launch.init_distributed()
  if _TASK.value == "passkey":
    out = passkey()
  else:
    out = loss()
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump(out, fh, indent=1)


def loss():
  from deepseek_jax.train import evaluation
  if not _DATA.value:
    raise app.UsageError("--data is required for --task=loss (prepared dataset folders)")
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
  return out


if __name__ == "__main__":
  launch.run(main)
