"""Generate text from a training checkpoint or an imported Hugging Face checkpoint.

  python -m experiments.generate --workdir=/tmp/small --prompt="def main(" --max_new_tokens=64
  python -m experiments.generate --workdir=DIR --prompt="import os" --temperature=0.8 \
      --top_p=0.95 --seed=1
  python -m experiments.generate --workdir=DIR --prompt="class " --speculative  # MTP drafts
  python -m experiments.generate --hf_dir=HF_DIR --prompt_ids=1,2,3 --max_new_tokens=16

Tokens are printed as they are produced (one prompt); a closing line gives tokens/s and
the KV cache size. --speculative needs a model trained with MTP modules (mtp_depth >= 1);
--compare also runs plain decoding and prints the speed-up.
"""

import sys

from absl import app, flags

from experiments import inference_model, launch

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (checkpoints/, "
                               "config.json).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face DeepSeek-V3 folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text (repeat for a batch).")
_PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", [], "Prompt as comma-separated ids "
                                        "(repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Draft with the MTP modules.")
_DRAFT_DEPTH = flags.DEFINE_integer("draft_depth", None, "--speculative: drafts a round "
                                    "(default: the model's MTP depth; more chains the "
                                    "last module).")
_COMPARE = flags.DEFINE_bool("compare", False, "Also run plain decoding; print speed-up.")
_NAIVE = flags.DEFINE_bool("naive", False, "Re-expand K and V from the cache (no weight "
                           "absorption), for comparison.")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", None, ["float32", "bfloat16", "float16"],
                                 "KV cache dtype (default: the compute dtype).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "--hf_dir only: parameter and compute dtype.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop a row at the tokenizer's eos.")


def main(argv):
  del argv
  launch.quiet_console()
  if _MAX_NEW.value < 1:
    raise app.UsageError(f"--max_new_tokens must be >= 1; got {_MAX_NEW.value}")
  if bool(_WORKDIR.value) == bool(_HF_DIR.value):
    raise app.UsageError("give exactly one of --workdir and --hf_dir")
  from deepseek_jax.inference import decoding, speculative
  from deepseek_jax.inference.sampling import Sampling

  try:
    model, variables, tokenizer, trained_len, label = inference_model.load_model(
        _WORKDIR.value, _HF_DIR.value, _DTYPE.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print(f"# {label}", file=sys.stderr)
  if (_SPECULATIVE.value or _COMPARE.value) and model.cfg.mtp_depth < 1:
    raise app.UsageError("--speculative/--compare need a model with MTP modules "
                         "(mtp_depth >= 1)")
  if _DRAFT_DEPTH.value is not None and _DRAFT_DEPTH.value < 1:
    raise app.UsageError(f"--draft_depth must be >= 1; got {_DRAFT_DEPTH.value}")
  drafter = (model, variables)
  if model.cfg.mtp_depth >= 1:
    drafter = speculative.with_draft_depth(model, variables,
                                           _DRAFT_DEPTH.value or model.cfg.mtp_depth)
  prompts = [[int(t) for t in p.split(",") if t.strip()] for p in _PROMPT_IDS.value]
  if _PROMPT.value:
    if tokenizer is None:
      raise app.UsageError(f"no tokenizer.json in {_HF_DIR.value}: use --prompt_ids")
    prompts += tokenizer.encode_batch(list(_PROMPT.value))
  if not prompts:
    raise app.UsageError("give --prompt or --prompt_ids")
  prompts = [list(map(int, p)) for p in prompts]
  try:
    for w in decoding.check_generation(model.cfg, [len(p) for p in prompts], _MAX_NEW.value,
                                       trained_len, _CACHE_DTYPE.value):
      print(f"# warning: {w}", file=sys.stderr)
  except ValueError as e:
    raise app.UsageError(str(e)) from None

  decode = (lambda ids: tokenizer.decode(ids)) if tokenizer else (
      lambda ids: " ".join(map(str, ids)) + " ")
  stream = _Stream(decode) if len(prompts) == 1 else None
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  kw = dict(seed=_SEED.value, absorb=not _NAIVE.value, cache_dtype=_CACHE_DTYPE.value,
            eos_id=getattr(tokenizer, "eos_id", None) if _STOP_AT_EOS.value else None)
  plain = lambda **more: decoding.generate(model, variables, prompts, _MAX_NEW.value,
                                          sampling, **kw, **more)
  spec = lambda **more: speculative.speculative_generate(*drafter, prompts, _MAX_NEW.value,
                                                         sampling, **kw, **more)
  result = (spec if _SPECULATIVE.value else plain)(on_tokens=stream)
  if stream is None:
    for p, out in zip(prompts, result.tokens):
      print(repr(decode(p)), "->", repr(decode(out)))
  else:
    print()
  print(f"# {'speculative' if _SPECULATIVE.value else 'plain'}: {result.summary()}",
        file=sys.stderr)
  if _COMPARE.value:
    base = (plain if _SPECULATIVE.value else spec)()
    print(f"# {'plain' if _SPECULATIVE.value else 'speculative'}: {base.summary()}",
          file=sys.stderr)
    if sampling.greedy:
      print(f"# same tokens: {base.tokens == result.tokens}", file=sys.stderr)


class _Stream:
  """Prints the text of one row as tokens arrive (re-decoding the whole row, so that
  multi-byte characters split over tokens come out whole)."""

  def __init__(self, decode):
    self.decode, self.ids, self.shown = decode, [], ""

  def __call__(self, new_rows):
    self.ids.extend(new_rows[0])
    text = self.decode(self.ids)
    if text.startswith(self.shown):
      sys.stdout.write(text[len(self.shown):])
      sys.stdout.flush()
      self.shown = text


if __name__ == "__main__":
  app.run(main)
