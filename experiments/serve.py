"""Serve many prompts with continuous batching over the paged latent cache.

  python -m experiments.serve --workdir=RUN --prompts=prompts.jsonl --out=out.jsonl
  python -m experiments.serve --hf_dir=DIR --prompts=prompts.jsonl --out=out.jsonl \
      --slots=8 --max_new_tokens=64 --temperature=0.8 --top_p=0.95
  python -m experiments.serve --workdir=RUN --prompts=F --out=O --compare   # vs alone
  python -m experiments.serve --workdir=RUN --prompts=F --out=O --cache_dtype=fp8
  python -m experiments.serve --workdir=RUN --prompts=F --out=O --speculative \
      --draft_depth=2      # MTP drafts, the last module chained past the trained depth

--prompts holds one {"prompt": text} a line; --out gets one line a prompt, in input
order: {"prompt", "completion", "completion_ids"}. The last lines printed give tokens/s,
the page pool's use and the compile time (inference/engine.py); with --speculative, the
tokens a round and the drafts' acceptance. --compare also decodes
each prompt alone (experiments.generate's path), prints the tokens/s ratio and, when
greedy, whether every completion is the same.
"""

import json
import sys

from absl import app, flags

from experiments import inference_model, launch

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face DeepSeek-V3 folder.")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL file: one {\"prompt\": text} a line.")
_OUT = flags.DEFINE_string("out", None, "JSONL file to write the completions to.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests decoded together.")
_PAGE = flags.DEFINE_integer("page_size", 16, "Positions per cache page.")
_PAGES = flags.DEFINE_integer("pages", None, "Pages in the pool (default: slots x the "
                              "longest request's pages).")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", None, ["float32", "bfloat16", "fp8"],
                                 "Page dtype (default: the compute dtype); fp8: FlashMLA's "
                                 "layout, c_kv in e4m3 with a scale per 128 values.")
_STEPS_PER_CALL = flags.DEFINE_integer("steps_per_call", 16, "Decode steps (speculative: "
                                       "rounds) one device call runs at most.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Decode with the MTP modules as "
                                  "drafters (greedy output unchanged).")
_DRAFT_DEPTH = flags.DEFINE_integer("draft_depth", None, "--speculative: drafts a round "
                                    "(default: the model's MTP depth; more chains the "
                                    "last module).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "--hf_dir only: parameter and compute dtype.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop a request at the tokenizer's "
                                 "eos.")
_COMPARE = flags.DEFINE_bool("compare", False, "Also decode each prompt alone; print the "
                             "speed ratio and whether the outputs agree.")
flags.mark_flags_as_required(["prompts", "out"])


def read_prompts(path: str) -> list[str]:
  """The "prompt" of each line of a JSONL file; ValueError naming the bad line."""
  texts = []
  with open(path) as fh:
    for n, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ValueError(f'{path}:{n}: expected {{"prompt": "text"}}, got {line.strip()[:80]}')
      texts.append(row["prompt"])
  if not texts:
    raise ValueError(f"{path} holds no prompts")
  return texts


def main(argv):
  del argv
  launch.quiet_console()
  if _MAX_NEW.value < 1 or _SLOTS.value < 1 or _PAGE.value < 1:
    raise app.UsageError("--max_new_tokens, --slots and --page_size must be >= 1")
  if _DRAFT_DEPTH.value is not None and (_DRAFT_DEPTH.value < 1 or not _SPECULATIVE.value):
    raise app.UsageError("--draft_depth needs --speculative and a value >= 1")
  from deepseek_jax.inference import decoding
  from deepseek_jax.inference.engine import Engine
  from deepseek_jax.inference.sampling import Sampling
  try:
    texts = read_prompts(_PROMPTS.value)
    model, variables, tokenizer, trained_len, label = inference_model.load_model(
        _WORKDIR.value, _HF_DIR.value, _DTYPE.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  except OSError as e:
    raise app.UsageError(f"cannot read {e.filename}: {e.strerror}") from None
  if tokenizer is None:
    raise app.UsageError(f"no tokenizer.json in {_HF_DIR.value}: serve needs text prompts "
                         "and a tokenizer")
  prompts = [list(map(int, ids)) for ids in tokenizer.encode_batch(texts)]
  if min(map(len, prompts)) < 1:
    raise app.UsageError("every prompt needs at least one token (an empty prompt line?)")
  longest = max(map(len, prompts)) + _MAX_NEW.value
  if longest > trained_len:
    print(f"# warning: {longest} tokens of context go past the {trained_len} the model "
          "was trained at", file=sys.stderr)
  print(f"# {label}: {len(prompts)} prompts", file=sys.stderr)
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  eos = getattr(tokenizer, "eos_id", None) if _STOP_AT_EOS.value else None
  try:
    engine = Engine(model, variables, slots=_SLOTS.value, max_len=longest, sampling=sampling,
                    page_size=_PAGE.value, n_pages=_PAGES.value, seed=_SEED.value, eos_id=eos,
                    cache_dtype=_CACHE_DTYPE.value, speculative=_SPECULATIVE.value,
                    draft_depth=_DRAFT_DEPTH.value, steps_per_call=_STEPS_PER_CALL.value)
    served = engine.serve(prompts, _MAX_NEW.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with open(_OUT.value, "w") as fh:
    for text, ids in zip(texts, served.tokens):
      fh.write(json.dumps({"prompt": text, "completion": tokenizer.decode(ids),
                           "completion_ids": ids}) + "\n")
  print(f"# served: {served.summary()}", file=sys.stderr)
  if _COMPARE.value:
    # Alone: the dense cache, in the served dtype (fp8 pages: against the compute dtype).
    dense_dtype = None if _CACHE_DTYPE.value == "fp8" else _CACHE_DTYPE.value
    alone, seconds = [], 0.0
    for p in prompts:
      g = decoding.generate(model, variables, [p], _MAX_NEW.value, sampling,
                            seed=_SEED.value, eos_id=eos, cache_dtype=dense_dtype)
      alone.append(g.tokens[0])
      seconds += g.prefill_s + g.decode_s
    rate = sum(map(len, alone)) / seconds
    print(f"# one at a time: {sum(map(len, alone))} tokens in {seconds:.2f} s: {rate:.1f} "
          f"tok/s; served / alone {served.tokens_per_s / rate:.2f}x", file=sys.stderr)
    if sampling.greedy:
      same = sum(a == b for a, b in zip(alone, served.tokens))
      tokens = sum(a == b for x, y in zip(alone, served.tokens) for a, b in zip(x, y))
      print(f"# same completions: {same} of {len(prompts)} ({tokens} of "
            f"{sum(map(len, alone))} tokens in place)"
            + ("; fp8 pages against the compute dtype's" if dense_dtype is None
               and _CACHE_DTYPE.value == "fp8" else ""), file=sys.stderr)


if __name__ == "__main__":
  launch.run(main)
