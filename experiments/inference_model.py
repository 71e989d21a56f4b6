"""The model an inference entry point runs (experiments.generate, experiments.serve):
a training run's checkpoint or a Hugging Face folder, with its tokenizer."""

import os


def load_model(workdir: str | None = None, hf_dir: str | None = None,
               dtype: str = "float32"):
  """(model, variables, tokenizer or None, the context it was trained at, a label) from a
  training run (workdir) or a Hugging Face folder (hf_dir: its tokenizer.json if there
  is one, and YaRN's original length x factor as the trained context)."""
  if bool(workdir) == bool(hf_dir):
    raise ValueError("give exactly one of --workdir and --hf_dir")
  from deepseek_jax.inference import decoding
  if workdir:
    from deepseek_jax.data import corpus as corpus_lib
    model, variables, run_cfg, step = decoding.load_workdir(workdir)
    tokenizer = corpus_lib.load_tokenizer(run_cfg.data, model.cfg.vocab_size)
    return model, variables, tokenizer, int(run_cfg.seq_len), f"{workdir}: step {step}"
  from deepseek_jax import hf
  model, variables = hf.load_checkpoint(hf_dir, dtype=dtype)
  tokenizer = None
  path = os.path.join(hf_dir, "tokenizer.json")
  if os.path.exists(path):
    from deepseek_jax.data.tokenizers import BPETokenizer
    tokenizer = BPETokenizer.load(path)
  trained = int(model.cfg.rope_original_max_len * model.cfg.rope_factor)
  return model, variables, tokenizer, trained, hf_dir
