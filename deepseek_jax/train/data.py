"""Offline data: an embedded default corpus, a locally trained tokenizer, packed
sequences with segment ids, and a deterministic, checkpointable batch order.

Default corpus ("stdlib"): the source of the Python standard library that ships with the
interpreter (~1,800 files, ~31 MB on 3.11), one document per file. It is real text nobody
here wrote, present on every machine that runs this code, and includes English prose:
docstrings, comments, and pydoc_data/topics.py (the language reference). Other sources:
"files" (comma-separated local globs, one document per file) and "hf_local" (Hugging Face
`datasets` built from local files: json/jsonl/csv/parquet/txt, field "text").

Tokenizer: a byte-level BPE trained with `tokenizers` on the training documents (seconds),
vocab = the model's vocab_size, with one special token <|eos|> (id 0) ending every
document; or raw bytes ("bytes": ids 0..255, eos 256). Both the tokenizer and the token
stream are cached on disk, keyed by a hash of the inputs.

Batches: the token stream (train or validation) is cut into rows of seq_len + 1 tokens;
segment ids number the documents inside a row (0 is padding, never produced here) and
positions restart at each document. The row order of epoch e is a permutation drawn from
(seed, e), so the batch at step s is a pure function of (seed, s): the iterator's whole
state is the step, saved with every checkpoint, and each process slices its own rows of
the global batch. Grain would give the same guarantees through its index sampler; with
one in-memory array the plain index map is shorter and has no extra dependency.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
from absl import logging

EOS = "<|eos|>"


# Documents -------------------------------------------------------------------

def stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
  return [f for f in files if "site-packages" not in f and "dist-packages" not in f]


def _read(path):
  with open(path, encoding="utf-8", errors="replace") as fh:
    return fh.read()


def load_documents(source: str, paths: str | None = None) -> tuple[list[str], list[str]]:
  """(names, texts) of every document, in a fixed order."""
  if source == "stdlib":
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files()
    return [os.path.relpath(f, root) for f in files], [_read(f) for f in files]
  if not paths:
    raise ValueError(f"data.source={source!r} needs data.paths (comma-separated globs)")
  files = sorted({f for p in paths.split(",") for f in glob.glob(os.path.expanduser(p.strip()),
                                                                   recursive=True)
                  if os.path.isfile(f)})
  if not files:
    raise ValueError(f"data.paths={paths!r} matches no file")
  if source == "files":
    return files, [_read(f) for f in files]
  if source == "hf_local":
    try:
      import datasets  # optional: pip install datasets
    except ImportError as e:
      raise ValueError("data.source='hf_local' needs the `datasets` package "
                       "(pip install datasets)") from e
    ext = os.path.splitext(files[0])[1].lstrip(".")
    kind = {"jsonl": "json", "txt": "text"}.get(ext, ext)
    ds = datasets.load_dataset(kind, data_files=files, split="train")
    if "text" not in ds.column_names:
      raise ValueError(f"hf_local dataset has no 'text' column: {ds.column_names}")
    texts = list(ds["text"])
    return [f"{files[0]}#{i}" for i in range(len(texts))], texts
  raise ValueError(f"data.source must be stdlib, files or hf_local; got {source!r}")


def split_documents(names, texts, val_fraction: float):
  """A fixed held-out split by a hash of each document's name (not of the order)."""
  train, val = [], []
  for name, text in zip(names, texts):
    bucket = zlib.crc32(name.encode()) % 10_000
    (val if bucket < val_fraction * 10_000 else train).append(text)
  if not train or (val_fraction > 0 and not val):
    raise ValueError(f"data: split of {len(texts)} documents at val_fraction={val_fraction} "
                     "leaves an empty train or validation set")
  return train, val


# Tokenizers --------------------------------------------------------------------

class ByteTokenizer:
  eos_id = 256
  vocab_size = 257

  def encode_batch(self, texts):
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
  """A `tokenizers` byte-level BPE; id 0 is <|eos|>."""

  def __init__(self, tok):
    self.tok = tok
    self.eos_id = tok.token_to_id(EOS)
    self.vocab_size = tok.get_vocab_size()

  @classmethod
  def train(cls, texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return cls(tok)

  @classmethod
  def load(cls, path):
    from tokenizers import Tokenizer
    return cls(Tokenizer.from_file(path))

  def save(self, path):
    self.tok.save(path)

  def encode_batch(self, texts):
    return [e.ids for e in self.tok.encode_batch(texts)]

  def decode(self, ids):
    return self.tok.decode(list(ids))


def default_cache_dir() -> str:
  return os.environ.get("DEEPSEEK_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "deepseek_jax"))


def _atomic_save(path, write):
  tmp = f"{path}.tmp{os.getpid()}"
  write(tmp)
  os.replace(tmp, path)


# The packed dataset -------------------------------------------------------------

@dataclass
class Corpus:
  tokenizer: object
  train_tokens: np.ndarray     # token stream, each document ended by eos
  train_starts: np.ndarray     # int64 offset of each document in the stream
  val_tokens: np.ndarray
  val_starts: np.ndarray


_STREAMS = ("train_tokens", "train_starts", "val_tokens", "val_starts")


def _stream(tokenizer, texts):
  ids = tokenizer.encode_batch(texts)
  lens = np.array([len(x) + 1 for x in ids], np.int64)
  dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
  tokens = np.empty(int(lens.sum()), dtype)
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
  for x, at in zip(ids, starts):
    tokens[at:at + len(x)] = x
    tokens[at + len(x)] = tokenizer.eos_id
  return tokens, starts


def _cache_key(data_cfg, vocab_size: int, names, texts) -> str:
  h = hashlib.sha256()
  for x in (data_cfg.source, data_cfg.tokenizer, str(vocab_size), str(data_cfg.val_fraction)):
    h.update(x.encode())
  for name, text in zip(names, texts):
    h.update(name.encode())
    h.update(hashlib.sha256(text.encode("utf-8", "replace")).digest())
  return h.hexdigest()[:16]


def _tokenizer(data_cfg, vocab_size: int, cache: str, key: str, train_texts):
  if data_cfg.tokenizer == "bytes":
    tokenizer = ByteTokenizer()
  elif data_cfg.tokenizer == "bpe":
    tok_path = os.path.join(cache, f"tokenizer-{key}.json")
    if os.path.exists(tok_path):
      tokenizer = BPETokenizer.load(tok_path)
    else:
      logging.info("training a %d-token byte-level BPE on %d documents", vocab_size,
                   len(train_texts))
      tokenizer = BPETokenizer.train(train_texts, vocab_size)
      _atomic_save(tok_path, tokenizer.save)
  else:
    raise ValueError(f"data.tokenizer must be bpe or bytes; got {data_cfg.tokenizer!r}")
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                     f"{vocab_size}; raise model.vocab_size")
  return tokenizer


def load_tokenizer(data_cfg, vocab_size: int):
  """Only the tokenizer of load_corpus (from its cache; trained again if absent)."""
  if data_cfg.tokenizer == "bytes":
    return ByteTokenizer()
  names, texts = load_documents(data_cfg.source, data_cfg.get("paths"))
  cache = data_cfg.get("cache_dir") or default_cache_dir()
  os.makedirs(cache, exist_ok=True)
  train_texts, _ = split_documents(names, texts, data_cfg.val_fraction)
  return _tokenizer(data_cfg, vocab_size, cache,
                    _cache_key(data_cfg, vocab_size, names, texts), train_texts)


def load_corpus(data_cfg, vocab_size: int) -> Corpus:
  """Builds (or reads from cache) the tokenizer and the tokenized train/val streams."""
  names, texts = load_documents(data_cfg.source, data_cfg.get("paths"))
  cache = data_cfg.get("cache_dir") or default_cache_dir()
  os.makedirs(cache, exist_ok=True)
  key = _cache_key(data_cfg, vocab_size, names, texts)
  train_texts, val_texts = split_documents(names, texts, data_cfg.val_fraction)
  tokenizer = _tokenizer(data_cfg, vocab_size, cache, key, train_texts)

  stream_path = os.path.join(cache, f"tokens-{key}.npz")
  if os.path.exists(stream_path):
    with np.load(stream_path) as z:
      arrays = [z[k] for k in _STREAMS]
  else:
    arrays = [*_stream(tokenizer, train_texts), *_stream(tokenizer, val_texts)]

    def write(path):
      with open(path, "wb") as fh:
        np.savez(fh, **dict(zip(_STREAMS, arrays)))
    _atomic_save(stream_path, write)
  return Corpus(tokenizer, *arrays)


class PackedRows:
  """Rows of seq_len + 1 tokens cut from a stream, with segment ids and positions."""

  def __init__(self, tokens, starts, seq_len: int):
    self.width = seq_len + 1
    self.n_rows = len(tokens) // self.width
    if self.n_rows == 0:
      raise ValueError(f"the stream has {len(tokens)} tokens: not one row of {self.width}")
    self.tokens = tokens[:self.n_rows * self.width].reshape(self.n_rows, self.width)
    self.starts = starts

  def rows(self, idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx)
    offsets = idx[:, None] * self.width + np.arange(self.width)
    docs = np.searchsorted(self.starts, offsets, side="right")
    # Segment ids 1..n inside each row; positions restart where the document changes.
    change = np.concatenate([np.ones_like(docs[:, :1], bool), docs[:, 1:] != docs[:, :-1]], 1)
    segments = np.cumsum(change, axis=1).astype(np.int32)
    start = np.maximum.accumulate(np.where(change, np.arange(self.width), 0), axis=1)
    positions = (np.arange(self.width) - start).astype(np.int32)
    return {"tokens": self.tokens[idx].astype(np.int32), "segments": segments,
            "positions": positions}


class BatchSchedule:
  """The batch of step s: rows of an endless stream of per-epoch permutations, from the
  stream position of step s on: deterministic and stateless, a pure function of
  (seed, step) whatever the process count.

  One batch size B: step s takes positions [s B, (s + 1) B), an epoch being the first
  floor(n_rows / B) B rows of its permutation (the rest of the epoch's rows skipped).
  Batch-size stages (recipe.Recipe.stages, a ramp): step s of a stage that starts at
  step s0 and stream position p0 takes B_stage rows from p0 + (s - s0) B_stage on; an
  epoch is then floor(n_rows / G) G rows with G the gcd of the stage sizes (G = B with
  one stage: the rule above), and a batch may run from one epoch into the next.
  """

  def __init__(self, rows: PackedRows, batch_size: int, seed: int, stages=None):
    """stages: [(start_step, batch)] in step order, the first at step 0 (None: one
    stage of batch_size)."""
    stages = [(0, batch_size)] if stages is None else [(int(a), int(b)) for a, b in stages]
    if stages[0][0] != 0:
      raise ValueError("batch stages must start at step 0")
    biggest = max(b for _, b in stages)
    if rows.n_rows < biggest:
      raise ValueError(f"{rows.n_rows} rows cannot fill a batch of {biggest}")
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    gcd = math.gcd(*[b for _, b in stages])
    self.epoch_rows = rows.n_rows // gcd * gcd
    # (start step, stream position, batch) of every stage.
    self.stages, pos = [], 0
    for i, (start, batch) in enumerate(stages):
      if i:
        prev_start, prev_pos, prev_batch = self.stages[-1]
        pos = prev_pos + (start - prev_start) * prev_batch
      self.stages.append((start, pos, batch))
    self._perms = {}

  def _permutation(self, epoch):
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
          self.rows.n_rows)
    return self._perms[epoch]

  def batch_size_at(self, step: int) -> int:
    return [b for start, _, b in self.stages if start <= step][-1]

  def global_indices(self, step: int) -> np.ndarray:
    start, pos, batch = [st for st in self.stages if st[0] <= step][-1]
    first = pos + (step - start) * batch
    epoch, i = divmod(first, self.epoch_rows)
    head = self._permutation(epoch)[i:min(i + batch, self.epoch_rows)]
    if len(head) == batch:
      return head
    return np.concatenate([head, self._permutation(epoch + 1)[:batch - len(head)]])

  def batch(self, step: int, process_index: int = 0, process_count: int = 1):
    """This process's contiguous slice of the global batch of `step`."""
    idx = self.global_indices(step)
    per = len(idx) // process_count
    return self.rows.rows(idx[process_index * per:(process_index + 1) * per])


def validation_batches(rows: PackedRows, batch_size: int, n_batches: int | None,
                       process_index: int = 0, process_count: int = 1):
  """The fixed validation batches, in order (all full batches when n_batches is None)."""
  total = rows.n_rows // batch_size
  n = total if n_batches is None else min(n_batches, total)
  per = batch_size // process_count
  for b in range(n):
    start = b * batch_size + process_index * per
    yield rows.rows(np.arange(start, start + per))


def describe(corpus: Corpus) -> str:
  return json.dumps({"tokenizer_vocab": corpus.tokenizer.vocab_size,
                     "train_tokens": int(len(corpus.train_tokens)),
                     "val_tokens": int(len(corpus.val_tokens))})
