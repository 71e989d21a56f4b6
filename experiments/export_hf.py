"""Export a training run as a Hugging Face folder, for evaluation elsewhere.

  python -m experiments.export_hf --workdir=runs/ablation/bias --out=/tmp/bias_hf
  python -m experiments.export_hf --workdir=DIR --out=OUT --step=200 --max_shard_size=2GB

The folder loads offline with transformers' `AutoModelForCausalLM.from_pretrained(OUT)`
(DeepseekV3ForCausalLM) and `AutoTokenizer.from_pretrained(OUT)`: config.json,
safetensors shards of at most --max_shard_size with their index, the expert bias as
each MoE layer's `gate.e_score_correction_bias`, the MTP modules under the layer index
DeepSeek's release uses (transformers ignores them; vLLM and DeepSeek's code read them),
tokenizer.json + tokenizer_config.json, generation_config.json. Scanned and unrolled
runs export alike. Needs the parity extra (safetensors).
"""

import json
import os
import pathlib
import re
import sys

from absl import app, flags

from experiments import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run (experiments.train or an "
                               "ablation run's folder).")
_OUT = flags.DEFINE_string("out", None, "Folder to write (created; files of an earlier "
                           "export there are replaced).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: newest).")
_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard (KB/MB/GB, "
                             "powers of 1000 as transformers counts them).")
flags.mark_flags_as_required(["workdir", "out"])

_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9}


def parse_size(text: str) -> int:
  m = re.fullmatch(r"\s*([0-9.]+)\s*(B|KB|MB|GB)\s*", text.upper())
  if not m or float(m[1]) <= 0:
    raise ValueError(f"--max_shard_size={text!r}: give a size like 5GB, 500MB or 200KB")
  return int(float(m[1]) * _UNITS[m[2]])


def main(argv):
  del argv
  launch.quiet_console()
  try:
    max_bytes = parse_size(_SHARD.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  out = pathlib.Path(_OUT.value)
  if out.exists() and not out.is_dir():
    raise app.UsageError(f"--out={out} is a file, not a folder")
  if os.path.abspath(out) == os.path.abspath(_WORKDIR.value):
    raise app.UsageError("--out must not be the run's own --workdir")
  from deepseek_jax import hf
  from deepseek_jax.inference import decoding
  from deepseek_jax.data import corpus as corpus_lib
  try:
    model, variables, run_cfg, step = decoding.load_workdir(_WORKDIR.value, _STEP.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  try:
    hf.config_to_hf(model.cfg)   # refuses what HF cannot hold, before anything is written
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  tokenizer = corpus_lib.load_tokenizer(run_cfg.data, model.cfg.vocab_size)
  hf.save_checkpoint(out, model.cfg, variables, max_shard_bytes=max_bytes)
  hf.save_tokenizer(out, tokenizer)
  # Generation stops at our end-of-document token; there is no begin token.
  config = json.loads((out / "config.json").read_text())
  config.update(bos_token_id=None, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": None, "eos_token_id": tokenizer.eos_id,
       "pad_token_id": tokenizer.eos_id}, indent=2) + "\n")
  files = sorted(p.name for p in out.iterdir())
  size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
  print(f"exported {_WORKDIR.value} step {step} -> {out}: {size / 1e6:.1f} MB of tensors "
        f"in {len([f for f in files if f.endswith('.safetensors')])} file(s); "
        f"{', '.join(files)}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
