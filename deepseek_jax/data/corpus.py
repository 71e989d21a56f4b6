"""A run's corpus: its prepared folders found (or prepared on first use into the cache
directory), checked and opened as memory-mapped token streams, with their tokenizer.

Sources: "prepared" (data.paths: a folder written by `python -m experiments.prepare_data`,
or DIR1:W1,DIR2:W2 for a weighted mixture), "domains" (data/domains.py's embedded code,
prose and structured text, a mixture of equal weights), or the inputs prepared on first
use into the cache directory, through the same format: "stdlib" (the embedded default:
the source of the Python standard library that ships with the interpreter, ~1,800
files, ~31 MB on 3.11, one document per file: real text nobody here wrote, present on
every machine, with English prose in docstrings, comments and pydoc_data/topics.py) and
"files" (comma-separated local globs, one document per file). Their tokenizer
(data.tokenizer, tokenizers.py): a byte-level BPE trained on the training documents,
vocab = the model's vocab_size, <|eos|> (id 0) ending every document; or raw bytes
(ids 0..255, eos 256).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass

from absl import logging

from deepseek_jax.data import inputs as inputs_lib
from deepseek_jax.data import prepare, shards
from deepseek_jax.data.tokenizers import BPETokenizer, ByteTokenizer


def default_cache_dir() -> str:
  return os.environ.get("DEEPSEEK_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "deepseek_jax"))


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


def describe(corpus: Corpus) -> str:
  return json.dumps({"tokenizer_vocab": corpus.tokenizer.vocab_size,
                     "sources": [{"dir": d, "weight": w, "train_tokens": len(t),
                                  "val_tokens": len(v), "train_docs": t.n_docs,
                                  "val_docs": v.n_docs}
                                 for d, w, t, v in zip(corpus.dirs, corpus.weights,
                                                       corpus.train, corpus.val)]})
