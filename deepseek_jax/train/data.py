"""Training data: prepared token streams (deepseek_jax.data), packed into rows with
segment ids, and a deterministic, checkpointable batch order.

Sources: "prepared" (data.paths: a folder written by `python -m experiments.prepare_data`),
or the inputs prepared on first use into the cache directory, through the same format:
"stdlib" (the embedded default: the source of the Python standard library that ships
with the interpreter, ~1,800 files, ~31 MB on 3.11, one document per file: real text
nobody here wrote, present on every machine, with English prose in docstrings, comments
and pydoc_data/topics.py) and "files" (comma-separated local globs, one document per
file). Their tokenizer (data.tokenizer): a byte-level BPE trained on the training
documents, vocab = the model's vocab_size, <|eos|> (id 0) ending every document; or raw
bytes (ids 0..255, eos 256).

Batches: the token stream (train or validation) is cut into rows of seq_len + 1 tokens;
segment ids number the documents inside a row (0 is padding, never produced here) and
positions restart at each document. The row order of epoch e is a permutation drawn from
(seed, e), so the batch at step s is a pure function of (seed, s): the iterator's whole
state is the step, saved with every checkpoint, and each process reads only its own rows
of the global batch from the memory-mapped shards.
"""

from __future__ import annotations

import hashlib
import functools
import json
import math
import os
import sys
import sysconfig
from dataclasses import dataclass

import numpy as np
from absl import logging

from deepseek_jax.data import inputs as inputs_lib
from deepseek_jax.data import prepare, shards

EOS = "<|eos|>"
COMPOSITIONS = ("mixed", "single_domain")   # how a batch's micro-batches draw on sources


# Tokenizers --------------------------------------------------------------------

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


def default_cache_dir() -> str:
  return os.environ.get("DEEPSEEK_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "deepseek_jax"))


# The packed dataset -------------------------------------------------------------

@dataclass
class Corpus:
  """A run's prepared data: one source, or a weighted mixture of sources."""
  tokenizer: object
  train: list                  # shards.TokenStream per source: documents back to back
  val: list
  weights: list                # per source (1.0 for one source)
  dirs: list                   # the prepared folders
  manifest: dict               # the first source's (all share the tokenizer)
  names: list = None           # per source: its domain (source=domains), else its folder


def _cache_key(data_cfg, vocab_size: int, files: list[str]) -> str:
  """The prepared default's folder: the inputs (paths, sizes, modification times), the
  tokenizer, the vocabulary and the split."""
  h = hashlib.sha256(shards.FORMAT.encode())
  for x in (data_cfg.source, data_cfg.tokenizer, str(vocab_size), str(data_cfg.val_fraction)):
    h.update(x.encode())
  for f in files:
    st = os.stat(f)
    h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
  return h.hexdigest()[:16]


def _input_files(data_cfg) -> tuple[list[str], str | None]:
  """(files, name root) of the stdlib / files sources (documents named relative to the
  stdlib root, or by absolute path for files: the split the in-memory path used)."""
  if data_cfg.source == "stdlib":
    return inputs_lib.stdlib_files(), sysconfig.get_paths()["stdlib"]
  if not data_cfg.get("paths"):
    raise ValueError(f"data.source={data_cfg.source!r} needs data.paths (comma-separated "
                     "globs)")
  try:
    return inputs_lib.expand(data_cfg.paths, "data.paths"), ""   # named by absolute path
  except inputs_lib.InputError as e:
    raise ValueError(str(e)) from None


def prepared_dirs(data_cfg, vocab_size: int) -> list[tuple[str, float]]:
  """[(prepared folder, weight)] of a run's data: data.paths for source=prepared
  ("DIR" or "DIR1:0.7,DIR2:0.3"), else the embedded or local-file inputs prepared on
  first use into the cache directory (the same format and reader either way)."""
  if data_cfg.source == "prepared":
    if not data_cfg.get("paths"):
      raise ValueError("data.source='prepared' needs data.paths: a folder written by "
                       "experiments.prepare_data (or DIR1:W1,DIR2:W2 for a mixture)")
    out = []
    for part in data_cfg.paths.split(","):
      directory, _, weight = part.strip().rpartition(":")
      if not directory or not _is_number(weight):
        directory, weight = part.strip(), "1"
      out.append((os.path.expanduser(directory), float(weight)))
    return out
  if data_cfg.source == "domains":
    return _domain_dirs(data_cfg, vocab_size)
  if data_cfg.source not in ("stdlib", "files"):
    raise ValueError(f"data.source must be stdlib, domains, files or prepared; got "
                     f"{data_cfg.source!r} (hf_local folders and jsonl/parquet files: "
                     "python -m experiments.prepare_data, then source=prepared)")
  if data_cfg.tokenizer not in ("bpe", "bytes"):
    raise ValueError(f"data.tokenizer must be bpe or bytes; got {data_cfg.tokenizer!r}")
  files, root = _input_files(data_cfg)
  cache = data_cfg.get("cache_dir") or default_cache_dir()
  out = os.path.join(cache, f"prepared-{_cache_key(data_cfg, vocab_size, files)}")
  if not os.path.exists(os.path.join(out, shards.MANIFEST)):
    spec = "bytes" if data_cfg.tokenizer == "bytes" else f"bpe:{vocab_size}"
    logging.info("preparing %d %s files (%s tokenizer) into %s", len(files),
                 data_cfg.source, spec, out)
    try:
      prepare.prepare(files, spec, out, val_fraction=data_cfg.val_fraction, root=root)
    except inputs_lib.InputError as e:
      raise ValueError(f"data: {e}") from None
  return [(out, 1.0)]


def _domain_dirs(data_cfg, vocab_size: int) -> list[tuple[str, float]]:
  """The embedded domains (data/domains.py: code, prose, structured), each written and
  prepared on first use into the cache directory: a mixture of equal weights."""
  from deepseek_jax.data import domains
  if data_cfg.tokenizer != "bytes":
    raise ValueError("data.source='domains' needs data.tokenizer='bytes' (one tokenizer "
                     "for the three domains; a BPE would be trained on each)")
  names = tuple(data_cfg.get("domains") or domains.DOMAINS)
  unknown = sorted(set(names) - set(domains.DOMAINS))
  if unknown:
    raise ValueError(f"data.domains: unknown {unknown}; choose from {domains.DOMAINS}")
  max_bytes = int(data_cfg.get("domain_bytes") or 8 << 20)
  cache = data_cfg.get("cache_dir") or default_cache_dir()
  key = hashlib.sha256(f"{domains.VERSION}\0{sys.version}\0{max_bytes}\0"
                       f"{data_cfg.val_fraction}".encode()).hexdigest()[:12]
  out = []
  for name in names:
    directory = os.path.join(cache, f"domain-{name}-{key}")
    if not os.path.exists(os.path.join(directory, shards.MANIFEST)):
      os.makedirs(cache, exist_ok=True)
      jsonl = os.path.join(cache, f"domain-{name}-{key}.jsonl")
      logging.info("writing the %s domain into %s", name, jsonl)
      domains.write_domain(name, jsonl, max_bytes)
      prepare.prepare([jsonl], "bytes", directory, val_fraction=data_cfg.val_fraction)
    out.append((directory, 1.0))
  return out


def source_names(data_cfg, dirs) -> list[str]:
  """A name per source of a run's data: the domain, or the prepared folder's name."""
  if data_cfg.source == "domains":
    from deepseek_jax.data import domains
    return list(data_cfg.get("domains") or domains.DOMAINS)
  return [os.path.basename(os.path.normpath(d)) for d, _ in dirs]


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def open_prepared(directory: str, vocab_size: int, verify: bool = True):
  try:
    manifest = shards.read_manifest(directory)
    if verify:
      shards.verify(directory, manifest)
  except shards.PreparedDataError as e:
    raise ValueError(f"data: {e}") from None
  tok = manifest["tokenizer"]
  if tok["vocab_size"] > vocab_size:
    raise ValueError(f"data: the tokenizer of {directory} has {tok['vocab_size']} tokens "
                     f"but model.vocab_size={vocab_size}; raise model.vocab_size")
  return manifest


def _tokenizer_of(directory: str, manifest: dict):
  tok = manifest["tokenizer"]
  if tok["kind"] == "bytes":
    return ByteTokenizer()
  return BPETokenizer.load(os.path.join(directory, "tokenizer.json"), tok["eos_id"],
                          tok["bos_id"])


def load_tokenizer(data_cfg, vocab_size: int):
  """The tokenizer a run's data was prepared with (the first source's, for a mixture)."""
  if data_cfg.tokenizer == "bytes" and data_cfg.source != "prepared":
    return ByteTokenizer()
  directory = prepared_dirs(data_cfg, vocab_size)[0][0]
  return _tokenizer_of(directory, open_prepared(directory, vocab_size, verify=False))


def load_corpus(data_cfg, vocab_size: int) -> Corpus:
  """The run's prepared data (built on first use for the stdlib / files sources), as
  memory-mapped train and validation streams, one per source of a mixture."""
  dirs = prepared_dirs(data_cfg, vocab_size)
  manifests = [open_prepared(d, vocab_size) for d, _ in dirs]
  for (d, _), m in zip(dirs[1:], manifests[1:]):
    if m["tokenizer"] != manifests[0]["tokenizer"]:
      raise ValueError(f"data.paths: {d} was prepared with another tokenizer than "
                       f"{dirs[0][0]} ({m['tokenizer']} vs {manifests[0]['tokenizer']}); "
                       "a mixture needs one tokenizer")
  train = [shards.TokenStream(d, m, "train") for (d, _), m in zip(dirs, manifests)]
  val = [shards.TokenStream(d, m, "val") for (d, _), m in zip(dirs, manifests)]
  if data_cfg.val_fraction > 0 and data_cfg.source != "prepared" and val[0].n_docs == 0:
    raise ValueError(f"data: the validation split of {train[0].n_docs} documents at "
                     f"data.val_fraction={data_cfg.val_fraction} is empty; raise "
                     "data.val_fraction")
  return Corpus(_tokenizer_of(dirs[0][0], manifests[0]), train, val,
                [w for _, w in dirs], [d for d, _ in dirs], manifests[0],
                source_names(data_cfg, dirs))


def packed_rows(streams, weights, seq_len: int, seed: int, shuffle: bool = True):
  """PackedRows of one stream, or a Mixture of several."""
  rows = [PackedRows(s, seq_len=seq_len) for s in streams]
  return rows[0] if len(rows) == 1 else Mixture(rows, weights, seed, shuffle)


class PackedRows:
  """Rows of seq_len + 1 tokens cut from a stream, with segment ids and positions.

  stream: a shards.TokenStream (memory-mapped shards), or a token array with `starts`
  (the offset of each document in it)."""

  def __init__(self, stream, starts=None, seq_len: int = None):
    if not isinstance(stream, shards.TokenStream):
      stream = shards.ArrayStream(np.asarray(stream), np.asarray(starts, np.int64))
    self.stream = stream
    self.width = seq_len + 1
    self.n_rows = len(stream) // self.width
    if self.n_rows == 0:
      raise ValueError(f"the stream has {len(stream)} tokens: not one row of {self.width}")

  def rows(self, idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx)
    offsets = idx[:, None] * self.width + np.arange(self.width)
    docs = self.stream.doc_ids(offsets)
    # Segment ids 1..n inside each row; positions restart where the document changes.
    change = np.concatenate([np.ones_like(docs[:, :1], bool), docs[:, 1:] != docs[:, :-1]], 1)
    segments = np.cumsum(change, axis=1).astype(np.int32)
    start = np.maximum.accumulate(np.where(change, np.arange(self.width), 0), axis=1)
    positions = (np.arange(self.width) - start).astype(np.int32)
    tokens = np.stack([self.stream.read(int(r) * self.width, (int(r) + 1) * self.width)
                       for r in idx]) if len(idx) else np.zeros((0, self.width), np.int32)
    return {"tokens": tokens.astype(np.int32), "segments": segments,
            "positions": positions}


class Mixture:
  """Rows of several sources (PackedRows of one width) interleaved by weight: the row at
  stream position p is a pure function of (seed, p).

  Positions come in blocks of BLOCK rows; in every block source k holds exactly n_k rows
  (BLOCK * w_k rounded by largest remainder), in an order drawn from (seed, block). Its
  r-th row overall is row r mod N_k of its own permutation for epoch r // N_k (drawn from
  (seed, k, epoch)), so each source runs through its own epochs at its own pace and its
  position in the mixture (`locate`) is reproducible. shuffle=False (validation): blocks
  and sources in order.
  """

  BLOCK = 1024

  def __init__(self, sources, weights, seed: int, shuffle: bool = True):
    weights = np.asarray(weights, np.float64)
    if len(sources) != len(weights) or (weights <= 0).any():
      raise ValueError(f"data.paths: mixture weights must be > 0; got {weights.tolist()}")
    if len({r.width for r in sources}) != 1:
      raise ValueError("mixture sources must have one row width")
    share = weights / weights.sum() * self.BLOCK
    counts = np.floor(share).astype(np.int64)
    for k in np.argsort(-(share - counts), kind="stable")[:self.BLOCK - counts.sum()]:
      counts[k] += 1
    if (counts == 0).any():
      raise ValueError(f"data.paths: a weight below 1/{self.BLOCK} of the total: "
                       f"{weights.tolist()}")
    self.sources, self.counts, self.seed, self.shuffle = sources, counts, seed, shuffle
    self.weights = weights / weights.sum()
    self.width = sources[0].width
    # Validation (no shuffle): the positions before a source would repeat a row.
    # Training: the sources' rows together (sources wrap around at their own pace).
    self.n_rows = (int(min(r.n_rows // c for r, c in zip(sources, counts)) * self.BLOCK)
                   if not shuffle else sum(r.n_rows for r in sources))
    # Memos shared by the loader's threads (functools.lru_cache is thread-safe): the
    # blocks around the current position, each source's current and next epoch.
    self._block = functools.lru_cache(64)(self._new_block)
    self._permutation = functools.lru_cache(4 * len(sources))(self._new_permutation)

  def _new_block(self, b: int):
    """(source of each slot, rank of the slot among its source's slots) of block b."""
    slots = np.repeat(np.arange(len(self.counts)), self.counts)
    if self.shuffle:
      slots = np.random.default_rng([self.seed, 1 << 30, b]).permutation(slots)
    rank = np.zeros(self.BLOCK, np.int64)
    for k in range(len(self.counts)):
      rank[slots == k] = np.arange(self.counts[k])
    return slots, rank

  def _new_permutation(self, k: int, epoch: int):
    n = self.sources[k].n_rows
    return (np.random.default_rng([self.seed, k, epoch]).permutation(n) if self.shuffle
            else np.arange(n))

  def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
    """(source, position within the source's own stream of rows) of each position."""
    positions = np.asarray(positions, np.int64)
    src = np.empty(positions.shape, np.int64)
    pos = np.empty(positions.shape, np.int64)
    for i, p in enumerate(positions.reshape(-1)):
      b, j = divmod(int(p), self.BLOCK)
      slots, rank = self._block(b)
      src.reshape(-1)[i] = slots[j]
      pos.reshape(-1)[i] = b * self.counts[slots[j]] + rank[j]
    return src, pos

  def rows(self, positions) -> dict[str, np.ndarray]:
    return self.source_rows(*self.locate(positions))

  def single_domain_rows(self, step: int, batch: int, microbatches: int, lo: int, hi: int):
    """Rows lo..hi-1 of step `step`'s batch composed one source a micro-batch: row i
    belongs to micro-batch i mod M (train/step.py's strided split), global micro-batch
    j = step M + i mod M reads source j mod K, each source running through its own
    stream (micro-batch j // K of it) at its own pace: domains rotate over
    micro-batches and steps, and the batch is a pure function of (seed, step)."""
    M, K = microbatches, len(self.sources)
    i = np.arange(lo, hi, dtype=np.int64)
    j = step * M + i % M
    return self.source_rows(j % K, (j // K) * (batch // M) + i // M)

  def source_rows(self, src, pos) -> dict[str, np.ndarray]:
    """The rows at positions `pos` of the sources `src` (each its own epochs)."""
    src, pos = np.asarray(src), np.asarray(pos)
    parts, order = [], []
    for k in np.unique(src):
      sel = np.flatnonzero(src == k)
      n = self.sources[k].n_rows
      idx = [self._permutation(int(k), int(q) // n)[int(q) % n] for q in pos[sel]]
      parts.append(self.sources[k].rows(np.asarray(idx, np.int64)))
      order.append(sel)
    order = np.argsort(np.concatenate(order), kind="stable")
    return {key: np.concatenate([p[key] for p in parts])[order] for key in parts[0]}


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

  def __init__(self, rows: PackedRows, batch_size: int, seed: int, stages=None,
               composition: str = "mixed", microbatches: int = 1):
    """stages: [(start_step, batch)] in step order, the first at step 0 (None: one
    stage of batch_size). composition "single_domain" (a Mixture, one stage): each
    micro-batch of `microbatches` from one source (Mixture.single_domain_rows); "mixed":
    the sources shuffled together."""
    stages = [(0, batch_size)] if stages is None else [(int(a), int(b)) for a, b in stages]
    if stages[0][0] != 0:
      raise ValueError("batch stages must start at step 0")
    if composition not in COMPOSITIONS:
      raise ValueError(f"data.composition must be one of {COMPOSITIONS}; got "
                       f"{composition!r}")
    if composition == "single_domain":
      if not isinstance(rows, Mixture):
        raise ValueError("data.composition='single_domain' needs several sources (a "
                         "mixture, e.g. data.source='domains')")
      if len(stages) > 1 or microbatches < 1 or batch_size % microbatches:
        raise ValueError(f"data.composition='single_domain' needs one batch size divisible "
                         f"by an explicit microbatches (batch_size={batch_size}, "
                         f"microbatches={microbatches}, {len(stages)} batch stage(s))")
    self.composition, self.microbatches = composition, microbatches
    biggest = max(b for _, b in stages)
    if rows.n_rows < biggest:
      raise ValueError(f"{rows.n_rows} rows cannot fill a batch of {biggest}")
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    gcd = math.gcd(*[b for _, b in stages])
    self.epoch_rows = rows.n_rows // gcd * gcd   # (unused for a Mixture)
    # (start step, stream position, batch) of every stage.
    self.stages, pos = [], 0
    for i, (start, batch) in enumerate(stages):
      if i:
        prev_start, prev_pos, prev_batch = self.stages[-1]
        pos = prev_pos + (start - prev_start) * prev_batch
      self.stages.append((start, pos, batch))
    # A thread-safe memo of the current and neighbouring epochs' permutations.
    self._permutation = functools.lru_cache(3)(self._new_permutation)

  def _new_permutation(self, epoch):
    return np.random.default_rng([self.seed, epoch]).permutation(self.rows.n_rows)

  def batch_size_at(self, step: int) -> int:
    return [b for start, _, b in self.stages if start <= step][-1]

  def global_indices(self, step: int) -> np.ndarray:
    start, pos, batch = [st for st in self.stages if st[0] <= step][-1]
    first = pos + (step - start) * batch
    if isinstance(self.rows, Mixture):   # the mixture orders its own rows
      return np.arange(first, first + batch)
    epoch, i = divmod(first, self.epoch_rows)
    head = self._permutation(epoch)[i:min(i + batch, self.epoch_rows)]
    if len(head) == batch:
      return head
    return np.concatenate([head, self._permutation(epoch + 1)[:batch - len(head)]])

  def batch(self, step: int, process_index: int = 0, process_count: int = 1):
    """This process's contiguous slice of the global batch of `step`."""
    if self.composition == "single_domain":
      per = self.batch_size // process_count
      return self.rows.single_domain_rows(step, self.batch_size, self.microbatches,
                                          process_index * per, (process_index + 1) * per)
    idx = self.global_indices(step)
    per = len(idx) // process_count
    return self.rows.rows(idx[process_index * per:(process_index + 1) * per])


class Prefetcher:
  """batch(step) for steps taken in order, built ahead by a Grain iterator.

  `make(step)` (BatchSchedule.batch with this process's slice) is a pure function of
  the step, so the loader is Grain's `MapDataset.range(stop).map(make)` read through
  its thread-prefetching iterator (`ReadOptions(num_threads=threads,
  prefetch_buffer_size=depth)`): `get(s)` returns make(s) while steps s + 1 .. s + depth
  are read on the threads (numpy's gathers and the memory-mapped reads release the
  GIL). The iterator's state is its next index, i.e. the step, so a get() out of order
  (a resume, a jump back) moves it there (`set_state`) and nothing else is saved.
  depth 0: built in the caller, nothing in the background (the reference path)."""

  def __init__(self, make, depth: int = 2, threads: int = 1, stop: int | None = None):
    """stop: the first step never asked for (the run's total): nothing is built past it."""
    if depth < 0 or threads < 1:
      raise ValueError(f"prefetch depth must be >= 0 and threads >= 1; got {depth}, "
                       f"{threads}")
    self.make, self.it = make, None
    if depth:
      import grain
      steps = grain.MapDataset.range(sys.maxsize if stop is None else stop).map(make)
      self.it = iter(steps.to_iter_dataset(
          grain.ReadOptions(num_threads=threads, prefetch_buffer_size=depth)))

  def get(self, step: int):
    if self.it is None:
      return self.make(step)
    if self.it.get_state()["next_index"] != step:
      self.it.set_state({"next_index": step})   # cancels what was read ahead
    return next(self.it)

  def close(self):
    if self.it is not None:
      self.it.close()
      self.it = None


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
                     "sources": [{"dir": d, "weight": w, "train_tokens": len(t),
                                  "val_tokens": len(v), "train_docs": t.n_docs,
                                  "val_docs": v.n_docs}
                                 for d, w, t, v in zip(corpus.dirs, corpus.weights,
                                                       corpus.train, corpus.val)]})
