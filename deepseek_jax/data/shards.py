"""The prepared-data format: token shards, memory-mapped, with a manifest.

A prepared dataset is a folder:
  manifest.json             the tokenizer (kind, sha256, vocab, bos/eos ids, framing), the
                            token dtype, the split, per-shard counts and checksums
  tokenizer.json            the tokenizer (BPE and Hugging Face tokenizers; none for bytes)
  SPLIT-NNNNN.bin           the shard's token stream of that split (train, val): every
                            document framed ([bos] tokens eos), back to back
  SPLIT-NNNNN.idx           int64 offset of each document in the .bin
  shard-NNNNN.json          the shard's entry, written last: a shard with one is complete

Megatron's .bin/.idx idea rather than ArrayRecord: training cuts rows of seq_len + 1 from
the concatenated stream (documents packed across rows, PackedRows' semantics), so the
natural unit is a flat token array, and numpy's memmap reads any row with no copy, no
extra dependency and no per-record overhead. Memory stays flat in the corpus size: only
the manifest and each shard's page cache are touched.

TokenStream is the reader: the splits' shards concatenated, as one stream with
documents, read by global offset.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

FORMAT = "deepseek_jax.prepared/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class PreparedDataError(ValueError):
  pass


def shard_files(directory: str, split: str, index: int) -> tuple[str, str]:
  stem = os.path.join(directory, f"{split}-{index:05d}")
  return stem + ".bin", stem + ".idx"


def shard_entry_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard-{index:05d}.json")


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.uint32


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def write_json_atomic(path: str, obj):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    what = ("its preparation did not finish (rerun the same prepare_data command to "
            "complete it)" if any(f.startswith("shard-") for f in _listdir(directory))
            else "prepare one with python -m experiments.prepare_data")
    raise PreparedDataError(f"{directory} is not a prepared dataset (no {MANIFEST}): {what}")
  with open(path) as fh:
    manifest = json.load(fh)
  if manifest.get("format") != FORMAT:
    raise PreparedDataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def _listdir(directory):
  try:
    return os.listdir(directory)
  except OSError:
    return []


def verify(directory: str, manifest: dict, checksums: bool = True):
  """Every shard file present with the manifest's size (and checksum): a clear error
  naming the first missing or corrupt file."""
  itemsize = np.dtype(manifest["dtype"]).itemsize
  for entry in manifest["shards"]:
    for split, info in entry["splits"].items():
      for path, size, digest in zip(shard_files(directory, split, entry["index"]),
                                    (info["tokens"] * itemsize, info["docs"] * 8),
                                    (info["sha256_bin"], info["sha256_idx"])):
        if not os.path.exists(path):
          raise PreparedDataError(f"{path} is missing from the prepared dataset "
                                  f"{directory}; rerun prepare_data to rebuild it")
        if os.path.getsize(path) != size or (checksums and sha256_file(path) != digest):
          raise PreparedDataError(f"{path} is corrupt ({'size' if os.path.getsize(path) != size else 'checksum'} "
                                  f"differs from {MANIFEST}); delete it and its "
                                  f"shard-{entry['index']:05d}.json, then rerun "
                                  "prepare_data to rebuild it")


class TokenStream:
  """One split of a prepared dataset: its shards' token streams back to back, read by
  global offset without loading them (memmap)."""

  def __init__(self, directory: str, manifest: dict, split: str):
    self.dtype = np.dtype(manifest["dtype"])
    self.tokens, self.starts, sizes, docs = [], [], [0], [0]
    for entry in manifest["shards"]:
      info = entry["splits"][split]
      if not info["tokens"]:
        continue
      bin_path, idx_path = shard_files(directory, split, entry["index"])
      self.tokens.append(np.memmap(bin_path, self.dtype, "r", shape=(info["tokens"],)))
      self.starts.append(np.memmap(idx_path, np.int64, "r", shape=(info["docs"],)))
      sizes.append(info["tokens"])
      docs.append(info["docs"])
    self.offsets = np.cumsum(sizes)           # the first token of each shard
    self.doc_offsets = np.cumsum(docs)        # the first document of each shard
    self.n_tokens = int(self.offsets[-1])
    self.n_docs = int(self.doc_offsets[-1])

  def __len__(self):
    return self.n_tokens

  def __getitem__(self, key: slice) -> np.ndarray:
    start, stop, step = key.indices(self.n_tokens)
    return self.read(start, stop)[::step]

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream (across shard boundaries)."""
    if stop <= start:
      return np.zeros(0, self.dtype)
    out, at = [], start
    shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
    while at < stop:
      base = int(self.offsets[shard])
      end = min(stop, int(self.offsets[shard + 1]))
      out.append(np.asarray(self.tokens[shard][at - base:end - base]))
      at, shard = end, shard + 1
    return out[0] if len(out) == 1 else np.concatenate(out)

  def doc_ids(self, offsets: np.ndarray) -> np.ndarray:
    """The global index of the document holding each offset (any shape)."""
    flat = np.asarray(offsets).reshape(-1)
    shard = np.searchsorted(self.offsets, flat, side="right") - 1
    out = np.empty(flat.shape, np.int64)
    for s in np.unique(shard):
      sel = shard == s
      local = flat[sel] - self.offsets[s]
      out[sel] = self.doc_offsets[s] + np.searchsorted(self.starts[s], local,
                                                       side="right") - 1
    return out.reshape(np.shape(offsets))


class ArrayStream:
  """An in-memory token array with its document offsets, read like a TokenStream."""

  def __init__(self, tokens: np.ndarray, starts: np.ndarray):
    self.tokens, self.starts = tokens, starts
    self.n_tokens, self.n_docs = len(tokens), len(starts)

  def __len__(self):
    return self.n_tokens

  def read(self, start: int, stop: int) -> np.ndarray:
    return self.tokens[start:stop]

  def doc_ids(self, offsets: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.starts, offsets, side="right") - 1
