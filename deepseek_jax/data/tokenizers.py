"""The tokenizers a prepared dataset's manifest names, for encoding and decoding text
outside the preparation (prompts, passkeys, Hugging Face export): raw bytes (ids 0..255,
eos 256), or a `tokenizers` tokenizer (our byte-level BPE trained on the training
documents, vocab = the model's vocab_size, <|eos|> as id 0 ending every document; or a
Hugging Face tokenizer.json).
"""

from __future__ import annotations

import numpy as np

EOS = "<|eos|>"


class ByteTokenizer:
  eos_id = 256
  vocab_size = 257

  def encode_batch(self, texts):
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
  """A `tokenizers` tokenizer: our byte-level BPE (id 0 is <|eos|>) or a Hugging Face
  tokenizer.json, with the end-of-document id its prepared data used."""

  def __init__(self, tok, eos_id: int | None = None, bos_id: int | None = None):
    self.tok = tok
    self.eos_id = tok.token_to_id(EOS) if eos_id is None else eos_id
    self.bos_id = bos_id
    self.vocab_size = tok.get_vocab_size()

  @classmethod
  def load(cls, path, eos_id: int | None = None, bos_id: int | None = None):
    from tokenizers import Tokenizer
    return cls(Tokenizer.from_file(path), eos_id, bos_id)

  def save(self, path):
    self.tok.save(path)

  def encode_batch(self, texts):
    return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids):
    return self.tok.decode(list(ids))
