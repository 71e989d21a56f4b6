"""Tokenize raw inputs into a prepared dataset (shards.py), in worker processes, without
holding the corpus in memory; deterministic and resumable.

Shards: whole-file documents (.txt, .py, ...) are grouped `docs_per_shard` files to a
shard in sorted order; each record file (.jsonl, .parquet, a saved dataset) is a shard of
its own. A shard depends only on its own files, so the output is byte-identical whatever
the number of workers, and a killed preparation, run again, keeps every shard whose
entry (shard-NNNNN.json) was written and prepares the rest.

Tokenizer SPEC: "bytes" (ids 0..255, eos 256); "bpe:VOCAB" (a byte-level BPE trained on
the training split's documents, up to `bpe_sample_bytes` of them in document order, with
<|eos|> as id 0: what the in-memory path always trained); or a Hugging Face
`tokenizer.json` (or a folder holding one, whose tokenizer_config.json names bos/eos and
add_bos_token). Every document is framed [bos] + tokens + eos, bos only where the
tokenizer's convention adds one (DeepSeek-V3's does); the framing is in the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass

import numpy as np
from absl import logging

from deepseek_jax.data import inputs as inputs_lib
from deepseek_jax.data import shards

EOS = "<|eos|>"
PLAN = "prepare.json"     # the preparation's own parameters, for a resumed run


# Tokenizers ---------------------------------------------------------------------

@dataclass
class Framing:
  """A tokenizer and how a document is framed: [bos] + ids + eos."""
  kind: str                 # bytes | bpe | hf
  vocab_size: int
  eos_id: int
  bos_id: int | None
  tok: object = None        # a tokenizers.Tokenizer (bpe, hf)

  def encode_batch(self, texts) -> list[np.ndarray]:
    if self.kind == "bytes":
      ids = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    else:
      ids = [np.asarray(e.ids, np.int64)
             for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
    head = [] if self.bos_id is None else [self.bos_id]
    return [np.concatenate([head, x, [self.eos_id]]).astype(np.int64) for x in ids]

  def identity(self, directory: str) -> dict:
    path = os.path.join(directory, "tokenizer.json")
    return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "sha256": shards.sha256_file(path) if self.kind != "bytes" else "bytes"}


def load_framing(directory: str, manifest_tokenizer: dict) -> Framing:
  """The tokenizer of a prepared dataset, as its manifest describes it."""
  kind = manifest_tokenizer["kind"]
  tok = None
  if kind != "bytes":
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  return Framing(kind, manifest_tokenizer["vocab_size"], manifest_tokenizer["eos_id"],
                 manifest_tokenizer["bos_id"], tok)


def _special_token(config: dict, key: str):
  value = config.get(key)
  return value.get("content") if isinstance(value, dict) else value


def make_framing(spec: str, out: str, train_texts=None, bos_token=None, eos_token=None
                 ) -> Framing:
  """Resolves SPEC into out/tokenizer.json and its framing. train_texts: a callable
  giving the BPE's training texts (only called for bpe:VOCAB without a saved one)."""
  from tokenizers import Tokenizer
  saved = os.path.join(out, "tokenizer.json")
  if spec == "bytes":
    return Framing("bytes", 257, 256, None)
  if spec.startswith("bpe:"):
    try:
      vocab = int(spec[4:])
    except ValueError:
      raise inputs_lib.InputError(f"--tokenizer={spec}: bpe:VOCAB takes an integer "
                                  "vocabulary size, e.g. bpe:8192") from None
    if vocab < 258:
      raise inputs_lib.InputError(f"--tokenizer={spec}: a byte-level BPE needs at least "
                                  "258 tokens (256 bytes, <|eos|>, one merge)")
    if os.path.exists(saved):     # a resumed preparation keeps its tokenizer
      tok = Tokenizer.from_file(saved)
    else:
      tok = train_bpe(train_texts(), vocab)
      tmp = f"{saved}.tmp{os.getpid()}"
      tok.save(tmp)
      os.replace(tmp, saved)
    return Framing("bpe", tok.get_vocab_size(), tok.token_to_id(EOS), None, tok)
  # A Hugging Face tokenizer.json, or a folder holding one.
  path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise inputs_lib.InputError(
        f"--tokenizer={spec}: not bytes, bpe:VOCAB, a tokenizer.json nor a folder holding "
        "one")
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:
    raise inputs_lib.InputError(f"--tokenizer={path} does not load as a Hugging Face "
                                f"tokenizer.json ({type(e).__name__}: {e})") from None
  config = {}
  config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if os.path.exists(config_path):
    with open(config_path) as fh:
      config = json.load(fh)
  eos = eos_token or _special_token(config, "eos_token")
  bos = bos_token or (_special_token(config, "bos_token")
                      if config.get("add_bos_token", False) else None)
  ids = {}
  for role, token in (("eos", eos), ("bos", bos)):
    if token is None:
      continue
    ids[role] = tok.token_to_id(token)
    if ids[role] is None:
      raise inputs_lib.InputError(f"the {role} token {token!r} is not in {path}'s "
                                  f"vocabulary; pass --{role}_token")
  if "eos" not in ids:
    raise inputs_lib.InputError(f"{path}: no eos token (tokenizer_config.json names none);"
                                " pass --eos_token to name the end-of-document token")
  if os.path.abspath(path) != os.path.abspath(saved):
    shutil.copyfile(path, saved)
    if os.path.exists(config_path):
      shutil.copyfile(config_path, os.path.join(out, "tokenizer_config.json"))
  return Framing("hf", tok.get_vocab_size(), ids["eos"], ids.get("bos"), tok)


def train_bpe(texts, vocab_size: int):
  """A byte-level BPE with <|eos|> as id 0 (the in-memory path's tokenizer)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


# The split ------------------------------------------------------------------------

DEFAULT_VAL_FRACTION = 0.01
SPLIT_METHOD = "crc32(document name) % 10000 < val_fraction * 10000"
# When that holds out no document of a corpus of two or more (a small corpus, a small
# fraction), the first document of the first shard is held out: deterministic, and every
# such corpus gets a validation split (that document was in the BPE's training sample).
FALLBACK_METHOD = "the hash held out none: the first document of shard {index}"


def is_validation(name: str, val_fraction: float) -> bool:
  """A fixed held-out split by a hash of the document's name (not of the order)."""
  return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def describe_split(manifest: dict) -> dict:
  """How a prepared dataset's validation split was made (the manifest's "split")."""
  forced = [e["index"] for e in manifest["shards"] if e.get("held_out_first")]
  return {"method": SPLIT_METHOD, "val_fraction": manifest["val_fraction"],
          "fallback": FALLBACK_METHOD.format(index=forced[0]) if forced else None}


# Shards ----------------------------------------------------------------------------

def plan_shards(files: list[str], docs_per_shard: int) -> list[list[str]]:
  plan, group = [], []
  for f in files:
    if inputs_lib.is_record_file(f):
      if group:
        plan.append(group)
        group = []
      plan.append([f])
    else:
      group.append(f)
      if len(group) == docs_per_shard:
        plan.append(group)
        group = []
  if group:
    plan.append(group)
  return plan


ENCODE_BATCH = 512   # documents tokenized (and held) at a time


def prepare_shard(job) -> dict:
  """One shard: its files' documents tokenized in batches and streamed to disk."""
  out, index, files, root, framing_desc, opts = job
  framing = framing_desc if isinstance(framing_desc, Framing) else load_framing(out, framing_desc)
  dtype = shards.token_dtype(framing.vocab_size)
  counts = inputs_lib.Counts()
  tmp = {s: [f"{p}.tmp{os.getpid()}" for p in shards.shard_files(out, s, index)]
         for s in shards.SPLITS}
  fhs = {s: open(tmp[s][0], "wb") for s in shards.SPLITS}
  starts = {s: [] for s in shards.SPLITS}
  size = {s: 0 for s in shards.SPLITS}
  text_bytes = {s: 0 for s in shards.SPLITS}
  try:
    batch = []

    seen = [0]

    def flush():
      for (name, text), ids in zip(batch, framing.encode_batch([t for _, t in batch])):
        held = opts.get("hold_out_first") and seen[0] == 0
        seen[0] += 1
        split = "val" if held or is_validation(name, opts["val_fraction"]) else "train"
        starts[split].append(size[split])
        size[split] += len(ids)
        text_bytes[split] += len(text.encode("utf-8", "replace"))
        ids.astype(dtype).tofile(fhs[split])
      batch.clear()

    for path in files:
      for name, text in inputs_lib.documents(path, root, opts["text_field"],
                                             opts["on_malformed"], counts):
        batch.append((name, text))
        if len(batch) == ENCODE_BATCH:
          flush()
    flush()
  finally:
    for fh in fhs.values():
      fh.close()
  entry = {"index": index, "files": [os.path.relpath(f, root) if root else f for f in files],
           "text_bytes": sum(text_bytes.values()), "empty": counts.empty, "malformed": counts.malformed,
           "malformed_at": counts.malformed_at, "splits": {},
           "held_out_first": bool(opts.get("hold_out_first"))}
  for split in shards.SPLITS:
    bin_path, idx_path = shards.shard_files(out, split, index)
    np.asarray(starts[split], np.int64).tofile(tmp[split][1])
    os.replace(tmp[split][0], bin_path)
    os.replace(tmp[split][1], idx_path)
    entry["splits"][split] = {"docs": len(starts[split]), "tokens": size[split],
                              "text_bytes": text_bytes[split],
                              "sha256_bin": shards.sha256_file(bin_path),
                              "sha256_idx": shards.sha256_file(idx_path)}
  shards.write_json_atomic(shards.shard_entry_path(out, index), entry)
  return entry


def _bpe_texts(files, root, opts, sample_bytes):
  """The BPE's training texts: training-split documents in order, up to sample_bytes."""
  texts, total = [], 0
  for path in files:
    for name, text in inputs_lib.documents(path, root, opts["text_field"], "skip"):
      if is_validation(name, opts["val_fraction"]):
        continue
      texts.append(text)
      total += len(text)
      if total >= sample_bytes:
        return texts
  return texts


def _fallback_shard(entries: list[dict], val_fraction: float) -> int | None:
  """The shard whose first document is held out when the hash split held out none of two
  or more documents (and val_fraction asks for a split): the first that holds one."""
  if val_fraction <= 0 or any(e["splits"]["val"]["docs"] for e in entries):
    return None
  if sum(e["splits"]["train"]["docs"] for e in entries) < 2:
    return None
  return next(e["index"] for e in entries if e["splits"]["train"]["docs"])


def prepare(inputs: str | list[str], tokenizer: str, out: str, *, workers: int = 1,
            val_fraction: float = DEFAULT_VAL_FRACTION, text_field: str = "text",
            on_malformed: str = "skip", docs_per_shard: int = 1024,
            bpe_sample_bytes: int = 256 << 20, bos_token: str | None = None,
            eos_token: str | None = None, root: str | None = None) -> dict:
  """Prepares `inputs` (comma-separated globs, or a list of files) into `out`; returns
  the manifest. Rerun on the same `out`, it completes a killed preparation."""
  if not 0 <= val_fraction < 1:
    raise inputs_lib.InputError(f"--val_fraction must be in [0, 1); got {val_fraction}")
  if on_malformed not in ("skip", "error"):
    raise inputs_lib.InputError(f"--on_malformed must be skip or error; got {on_malformed!r}")
  files = inputs_lib.expand(inputs) if isinstance(inputs, str) else sorted(inputs)
  # Documents are named relative to root (None: the inputs' common folder; "": by
  # absolute path); the validation split hashes the names.
  root = inputs_lib.common_root(files) if root is None else root
  rel = (lambda f: os.path.relpath(f, root)) if root else (lambda f: f)
  os.makedirs(out, exist_ok=True)
  _record_plan(out, {"inputs": [rel(f) for f in files], "root": root,
                     "tokenizer": tokenizer, "val_fraction": val_fraction,
                     "text_field": text_field, "docs_per_shard": docs_per_shard,
                     "bpe_sample_bytes": bpe_sample_bytes, "bos_token": bos_token,
                     "eos_token": eos_token})
  opts = {"val_fraction": val_fraction, "text_field": text_field,
          "on_malformed": on_malformed}
  framing = make_framing(tokenizer, out,
                         lambda: _bpe_texts(files, root, opts, bpe_sample_bytes),
                         bos_token, eos_token)
  identity = framing.identity(out)
  groups = plan_shards(files, docs_per_shard)
  entries, todo = _finished_shards(out, len(groups))
  t0 = time.perf_counter()
  desc = {k: identity[k] for k in ("kind", "vocab_size", "eos_id", "bos_id")}
  jobs = [(out, i, groups[i], root, framing if workers <= 1 else desc, opts) for i in todo]
  entries.update((e["index"], e) for e in _run_shards(jobs, workers))
  ordered = [entries[i] for i in range(len(groups))]
  fallback = _fallback_shard(ordered, val_fraction)
  if fallback is not None:   # tokenized again, its first document held out
    logging.info("prepare_data: the hash split held out no document; holding out the "
                 "first document of shard %d", fallback)
    entries[fallback] = prepare_shard((out, fallback, groups[fallback], root, framing,
                                       {**opts, "hold_out_first": True}))
    ordered[fallback] = entries[fallback]
  seconds = time.perf_counter() - t0
  manifest = _manifest(ordered, identity, framing, val_fraction, text_field, len(files))
  if manifest["totals"]["train"]["docs"] == 0:
    raise inputs_lib.InputError(f"--inputs {inputs!r}: no non-empty training document "
                                f"({manifest['empty_documents']} empty, "
                                f"{manifest['malformed_records']} malformed)")
  shards.write_json_atomic(os.path.join(out, shards.MANIFEST), manifest)
  manifest["seconds"] = seconds   # this invocation's tokenizing time (not saved)
  return manifest


def _record_plan(out: str, plan: dict) -> None:
  """Writes the preparation's plan into `out`, or checks that a started one (resumed
  here) had the same."""
  plan_path = os.path.join(out, PLAN)
  if os.path.exists(plan_path):
    with open(plan_path) as fh:
      old = json.load(fh)
    if old != plan:
      differs = sorted(k for k in plan if old.get(k) != plan[k])
      raise inputs_lib.InputError(
          f"--out={out} holds a preparation of other inputs or settings (differs in: "
          f"{', '.join(differs)}); use another --out, or the same command to resume it")
  else:
    shards.write_json_atomic(plan_path, plan)


def _finished_shards(out: str, n_shards: int):
  """({index: entry} of the shards a killed preparation finished, [indices to do])."""
  entries, todo = {}, []
  for index in range(n_shards):
    path = shards.shard_entry_path(out, index)
    if os.path.exists(path):
      with open(path) as fh:
        entries[index] = json.load(fh)
    else:
      todo.append(index)
  if entries:
    logging.info("prepare_data: %d of %d shards already done in %s", len(entries),
                 n_shards, out)
  return entries, todo


def _run_shards(jobs, workers: int) -> list[dict]:
  """prepare_shard over jobs, in `workers` spawned processes when there are several."""
  if workers <= 1 or len(jobs) <= 1:
    return list(map(prepare_shard, jobs))
  import multiprocessing
  pool = multiprocessing.get_context("spawn").Pool(workers)
  try:
    return list(pool.imap_unordered(prepare_shard, jobs))
  finally:
    pool.close()
    pool.join()


def _manifest(ordered, identity, framing, val_fraction: float, text_field: str,
              n_inputs: int) -> dict:
  """The prepared dataset's manifest, from its shard entries in order."""
  totals = {s: {k: sum(e["splits"][s][k] for e in ordered)
                for k in ("docs", "tokens", "text_bytes")} for s in shards.SPLITS}
  manifest = {"format": shards.FORMAT, "tokenizer": identity,
              "dtype": np.dtype(shards.token_dtype(framing.vocab_size)).name,
              "framing": ("[bos] " if framing.bos_id is not None else "") + "tokens eos",
              "val_fraction": val_fraction, "text_field": text_field,
              "n_inputs": n_inputs, "shards": ordered, "totals": totals,
              "text_bytes": sum(e["text_bytes"] for e in ordered),
              "empty_documents": sum(e["empty"] for e in ordered),
              "malformed_records": sum(e["malformed"] for e in ordered)}
  manifest["split"] = describe_split(manifest)
  return manifest
