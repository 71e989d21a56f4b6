"""Our tokenizers -> the tokenizer.json and tokenizer_config.json Hugging Face reads."""

from __future__ import annotations

import json
import pathlib


def save_tokenizer(path, tokenizer) -> None:
  """Our tokenizer (data/tokenizers.py: BPETokenizer or ByteTokenizer) -> tokenizer.json and
  tokenizer_config.json that `AutoTokenizer.from_pretrained` reads offline: the same ids
  (our byte tokenizer becomes a byte-level BPE without merges whose ids are the byte
  values), the end-of-document token the data was prepared with (<|eos|> for ours) and
  its begin token where it has one (a Hugging Face tokenizer's, e.g. DeepSeek-V3's)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from deepseek_jax.data.tokenizers import EOS, ByteTokenizer
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if isinstance(tokenizer, ByteTokenizer):
    byte_char = _bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    vocab[EOS] = tokenizer.eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    eos, bos = EOS, None
  else:
    tok = tokenizer.tok
    eos = tok.id_to_token(tokenizer.eos_id)
    bos = None if tokenizer.bos_id is None else tok.id_to_token(tokenizer.bos_id)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
      "bos_token": bos, "pad_token": eos, "add_bos_token": bos is not None,
      "add_eos_token": False, "clean_up_tokenization_spaces": False,
      "model_max_length": 1 << 30}, indent=2) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (what byte-level BPE vocabularies use)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out
