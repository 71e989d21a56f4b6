"""Raw inputs of `experiments.prepare_data`: which files, and the documents in each.

Formats, by extension: `.jsonl` / `.json` (one JSON record per line, its text in
`text_field`), `.parquet` (a column `text_field`; needs pyarrow), a folder written by
`datasets.Dataset.save_to_disk` (its arrow files; needs pyarrow), anything else is plain
text: one document per file.

Documents are named for the validation split (a hash of the name, as the in-memory path
always did): a whole-file document by its path relative to the inputs' common folder, a
record by that path and its line (or row) number. The order is fixed: files sorted, then
lines in file order, so the same inputs always give the same documents.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass, field

RECORD_EXTS = (".jsonl", ".json", ".parquet")


def stdlib_files() -> list[str]:
  """The Python install's standard-library sources (the embedded corpus), sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
  return [f for f in files if "site-packages" not in f and "dist-packages" not in f]


class InputError(ValueError):
  """Bad input, named by file (and line): the message says what to do."""


@dataclass
class Counts:
  """What a pass over the inputs skipped, by reason."""
  empty: int = 0
  malformed: int = 0
  malformed_at: list = field(default_factory=list)   # the first few "file:line"

  def add(self, other: "Counts"):
    self.empty += other.empty
    self.malformed += other.malformed
    self.malformed_at = (self.malformed_at + other.malformed_at)[:10]


def expand(inputs: str, name: str = "--inputs") -> list[str]:
  """The files of comma-separated globs (folders of `save_to_disk` datasets are kept as
  one entry), sorted; a glob that matches nothing is an error naming it (and `name`, the
  flag or field that gave the globs)."""
  files = set()
  for pattern in [p.strip() for p in inputs.split(",") if p.strip()]:
    matched = glob.glob(os.path.expanduser(pattern), recursive=True)
    found = [m for m in matched if os.path.isfile(m) or _is_saved_dataset(m)]
    if not found:
      raise InputError(f"{name}: {pattern!r} matches no file"
                       + (" (only folders: give a glob of the files inside, e.g. "
                          f"{os.path.join(pattern, '*.jsonl')!r})" if matched else ""))
    files.update(os.path.abspath(f) for f in found)
  if not files:
    raise InputError(f"{name} is empty: give comma-separated globs of text files")
  return sorted(files)


def _is_saved_dataset(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json"))


def common_root(files: list[str]) -> str:
  root = os.path.commonpath(files) if files else ""
  return root if os.path.isdir(root) else os.path.dirname(root)


def is_record_file(path: str) -> bool:
  return _is_saved_dataset(path) or path.endswith(RECORD_EXTS)


def documents(path: str, root: str, text_field: str = "text", on_malformed: str = "skip",
              counts: Counts | None = None):
  """Yields (name, text) of the documents in one input. Empty documents are skipped and
  counted; a malformed record is skipped and counted (on_malformed="skip") or stops with
  its file and line (on_malformed="error")."""
  counts = Counts() if counts is None else counts
  rel = os.path.relpath(path, root) if root else path
  if not is_record_file(path):
    text = _read_text(path)
    if text.strip():
      yield rel, text
    else:
      counts.empty += 1
    return
  for where, record in _records(path):
    if isinstance(record, Exception):
      _malformed(f"{path}:{where}", f"{type(record).__name__}: {record}", on_malformed,
                 counts)
      continue
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
      _malformed(f"{path}:{where}", f"no string field {text_field!r} (fields: "
                 f"{sorted(record)[:8] if isinstance(record, dict) else type(record).__name__})"
                 "; set --text_field", on_malformed, counts)
      continue
    if not text.strip():
      counts.empty += 1
      continue
    yield f"{rel}#{where}", text


def _malformed(where: str, why: str, on_malformed: str, counts: Counts):
  if on_malformed == "error":
    raise InputError(f"{where}: {why}. Fix the record, or pass --on_malformed=skip to "
                     "skip and count such records")
  counts.malformed += 1
  if len(counts.malformed_at) < 10:
    counts.malformed_at.append(where)


def _read_text(path: str) -> str:
  with open(path, "rb") as fh:
    raw = fh.read()
  if b"\x00" in raw[:8192]:
    raise InputError(f"{path}: not a text file (it holds NUL bytes); --inputs takes "
                     "text, .jsonl/.json (one record per line) or .parquet files")
  return raw.decode("utf-8", errors="replace")


def _records(path: str):
  """(line or row number from 1, record or the exception that parsing it raised)."""
  if path.endswith((".jsonl", ".json")):
    with open(path, "rb") as fh:
      for i, line in enumerate(fh, 1):
        if not line.strip():
          continue
        try:
          yield i, json.loads(line)
        except ValueError as e:
          yield i, e
    return
  try:
    import pyarrow.parquet as pq
    import pyarrow as pa
  except ImportError:
    raise InputError(f"{path}: reading parquet and saved datasets needs pyarrow "
                     "(pip install pyarrow)") from None
  if _is_saved_dataset(path):
    tables = [pa.ipc.open_stream(f).read_all()
              for f in sorted(glob.glob(os.path.join(path, "*.arrow")))]
  else:
    tables = [pq.read_table(path)]
  row = 0
  for table in tables:
    for batch in table.to_batches():
      for record in batch.to_pylist():
        row += 1
        yield row, record
