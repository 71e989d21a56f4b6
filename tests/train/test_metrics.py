"""metrics.jsonl: a half-written last line, and the records a resume keeps."""

import json

import pytest

from deepseek_jax.train import metrics


def _write(path, records, tail=""):
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_half_written_last_line_is_dropped_and_a_damaged_middle_line_named(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write(path, [{"step": 0, "loss": 5.0}, {"step": 1, "loss": 4.0}], tail='{"step": 2, "lo')
  assert [r["step"] for r in metrics.read_records(str(path))] == [0, 1]
  path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
    metrics.read_records(str(path))


def test_resume_keeps_the_records_of_the_checkpointed_steps_only(tmp_path):
  """A checkpoint after 4 steps holds records 0..3 (records count steps from 0): a resume
  must drop record 4 and later, which the rerun writes again, and the torn line."""
  _write(tmp_path / "metrics.jsonl", [{"step": s} for s in range(6)], tail='{"st')
  writer = metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True)
  try:
    writer.truncate_after(4)
    writer.write(4, {"loss": 1.0})
  finally:
    writer.close()
  assert [r["step"] for r in metrics.read_records(str(tmp_path / "metrics.jsonl"))] == \
      [0, 1, 2, 3, 4]
