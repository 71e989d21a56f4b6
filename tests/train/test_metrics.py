"""metrics.jsonl: a half-written last line, and the records a resume keeps; the measured
matmul peak (the MFU denominator)."""

import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
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


def test_matmul_peak_is_2n3_over_the_median_time(monkeypatch):
  """measure_matmul_peak's arithmetic on a clock that gives the 5 timed calls 0.5, 2, 0.25,
  8 and 1 s: 2 n^3 FLOPs over the median (1 s; the mean would be 2.35 s, the fastest
  0.25 s), one device's worth on CPU."""
  ticks = iter(np.cumsum([0.0, 0.5, 1.0, 2.0, 1.0, 0.25, 1.0, 8.0, 1.0, 1.0]))
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
  assert metrics.measure_matmul_peak(n=64, repeats=5) == 2.0 * 64 ** 3 / 1.0
  assert next(ticks, None) is None          # every tick used: 5 calls timed, none else


def test_matmul_peak_is_a_real_rate():
  """Unpatched: positive, and within a factor of 20 of the rate of the same matmul timed
  here (the best of 5; the machine is shared, so only the order of magnitude)."""
  n = 256
  peak = metrics.measure_matmul_peak(n=n, repeats=5)
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
  assert 0 < peak < float("inf")
  assert (2 * n ** 3 / best) / 20 < peak < 20 * (2 * n ** 3 / best)


def _timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t
