"""Token-based schedules (train/recipe.py): V3's recipe pinned to the report's numbers,
the jitted learning rate against the step-based schedule it generalises, batch-size
stages in the data order, and clear errors."""

import json
import math
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import common, deepseek_v3_671b
from deepseek_jax.model import config as model_config
from deepseek_jax.train import batches as batches_lib
from deepseek_jax.train import recipe
from deepseek_jax.train import step as train_step
from train_helpers import subprocess_env

T, B = 1e12, 1e9
SEQ = 4096


def _v3():
  return deepseek_v3_671b.get_config()


def test_v3_recipe_is_the_reports_paragraph():
  """SPEC.md section 6 / report 4.2, numbers typed from the report, not from the config:
  warmup over 2K steps to 2.2e-4, constant until 10T, cosine to 2.2e-5 over 4.3T, 333B at
  2.2e-5, 167B at 7.3e-6 (14.8T in all); batch 3,072 -> 15,360 over the first 469B;
  MTP lambda 0.3 for the first 10T then 0.1; bias rate 0.001 until the last 500B."""
  r = recipe.Recipe(_v3())
  assert r.total_tokens == 14.8 * T
  lr = r.lr_at_tokens
  first_batch_tokens = 3072 * SEQ
  assert lr(0) == 0.0
  assert lr(1000 * first_batch_tokens) == pytest.approx(2.2e-4 / 2, rel=1e-9)  # mid-warmup
  assert lr(2000 * first_batch_tokens) == pytest.approx(2.2e-4)
  for t in (1 * T, 5 * T, 9.99 * T):
    assert lr(t) == pytest.approx(2.2e-4)
  assert lr(10 * T + 4.3 * T / 2) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # cosine midpoint
  assert lr(10 * T + 4.3 * T / 4) == pytest.approx(
      2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
  for t in (14.3 * T, 14.3 * T + 332 * B):
    assert lr(t) == pytest.approx(2.2e-5)
  for t in (14.3 * T + 334 * B, 14.8 * T - 1):
    assert lr(t) == pytest.approx(7.3e-6)
  # The ramp: 3,072 sequences at the start, 15,360 once 469B tokens are seen (the last
  # stages end on step boundaries, each at most one of its steps past its share).
  assert r.point(0)["batch_size"] == 3072
  assert r.point(470 * B)["batch_size"] == 15360
  assert 469 * B <= r.stages[-1].start_tokens < 469 * B + (3072 + 6144 + 9216 + 12288) * SEQ
  assert [s.batch for s in r.stages][0] == 3072 and max(r.batch_sizes) == 15360
  assert r.point(9.99 * T)["mtp_lambda"] == 0.3 and r.point(10.01 * T)["mtp_lambda"] == 0.1
  assert r.point(14.29 * T)["bias_rate"] == 0.001 and r.point(14.31 * T)["bias_rate"] == 0
  # The freeze covers the last 500B tokens (to within a step of 15,360 x 4,096).
  freeze = train_step.balance_hparams(_v3())["bias_freeze_step"]
  assert abs(r.total_tokens - r.tokens_at_step(freeze) - 500 * B) <= 15360 * SEQ


def test_v3_steps_by_hand():
  """The step count of V3's ramp summed by hand: each 117.25B-token stage rounded up to
  whole steps, then 15,360-sequence steps to 14.8T."""
  steps, tokens = 0, 0
  for batch in (3072, 6144, 9216, 12288):
    n = math.ceil(117.25 * B / (batch * SEQ))
    steps, tokens = steps + n, tokens + n * batch * SEQ
  total = steps + math.ceil((14.8 * T - tokens) / (15360 * SEQ))
  c = _v3()
  assert c.total_steps == total
  r = recipe.Recipe(c)
  assert r.tokens_at_step(steps) == tokens and r.stage_at_step(steps).batch == 15360
  h = train_step.balance_hparams(c)
  assert h["mtp_lambda_switch_step"] == steps + math.ceil((10 * T - tokens) / (15360 * SEQ))
  assert (h["mtp_lambda"], h["mtp_lambda_late"], h["bias_rate"]) == (0.3, 0.1, 0.001)


def _run_cfg(lr="", batch="", seq=16, batch_size=4, total_steps=50):
  c = common.base_config(model_config.tiny())
  c.seq_len, c.batch_size, c.total_steps = seq, batch_size, total_steps
  c.schedule.lr, c.schedule.batch_size = lr, batch
  return c


def test_jitted_lr_equals_the_step_based_schedule_it_generalises():
  """The step-based warmup-constant-cosine (optimizer.warmup_steps, decay_start_frac,
  min_lr_ratio) written as phases gives the same learning rate, through the jitted
  schedule the optimizer uses. One convention differs: the recipe evaluates every phase
  at the tokens seen at the END of the step (as the step-based warmup does), the
  step-based cosine at its start; so in the cosine the recipe's step s is the step-based
  step s + 1 (and the recipe reaches the floor at the last step, not one after it)."""
  c = _run_cfg(total_steps=50)
  c.optimizer.update(peak_lr=1e-3, warmup_steps=10, decay_start_frac=0.6, min_lr_ratio=0.1)
  per_step = c.batch_size * c.seq_len
  c.schedule.lr = (f"linear 0 -> 1e-3 for 10 steps; constant 1e-3 until {30 * per_step}; "
                   f"cosine 1e-3 -> 1e-4 for {20 * per_step}")
  old = jax.jit(train_step.lr_schedule(c.optimizer, c.total_steps))
  new = jax.jit(recipe.Recipe(c).lr_schedule())
  steps = np.arange(55)
  np.testing.assert_allclose([float(new(s)) for s in steps],
                             [float(old(s if s < 30 else s + 1)) for s in steps],
                             rtol=2e-6, atol=1e-12)
  # Both against values worked by hand (neither schedule's code): warmup 1e-3 (s + 1) / 10,
  # the peak, then 1e-4 + 9e-4 (1 + cos(pi f)) / 2 with f the decay's fraction: the
  # recipe's f = (s + 1 - 30) / 20 (tokens at the step's end), the step-based one's
  # f = (s - 30) / 20; both hold the floor past the end.
  cos = lambda f: 1e-4 + 4.5e-4 * (1 + math.cos(math.pi * f))
  by_hand_new = {0: 1e-4, 4: 5e-4, 8: 9e-4, 9: 1e-3, 20: 1e-3, 28: 1e-3, 29: 1e-3,
                 30: cos(0.05), 34: 1e-4 + 4.5e-4 * (1 + 0.5 ** 0.5), 39: 5.5e-4,
                 44: cos(0.75), 48: cos(0.95), 49: 1e-4, 54: 1e-4}
  by_hand_old = {0: 1e-4, 4: 5e-4, 9: 1e-3, 29: 1e-3, 30: 1e-3, 35: cos(0.25),
                 40: 5.5e-4, 49: cos(0.95), 50: 1e-4, 54: 1e-4}
  for f, by_hand in ((new, by_hand_new), (old, by_hand_old)):
    got = {s: float(f(s)) for s in by_hand}
    assert got == pytest.approx(by_hand, rel=2e-6, abs=1e-12)


def _v3_lr_by_hand(s: int) -> float:
  """V3's learning rate at the end of step s, typed from the report (SPEC 6), with no
  Recipe: batch 3,072 / 6,144 / 9,216 / 12,288 / 15,360 sequences of 4,096 from steps
  0 / 9,319 / 13,979 / 17,086 / 19,416 (117.25B tokens a stage, a stage's last step
  completed: ceil(117.25e9 / (batch x 4,096)) steps); warmup 0 -> 2.2e-4 over 2,000
  steps; constant to 10T tokens; cosine to 2.2e-5 over 4.3T; 2.2e-5 for 333B; 7.3e-6."""
  starts, batches = [0, 9319, 13979, 17086, 19416], [3072, 6144, 9216, 12288, 15360]
  ends = starts[1:] + [math.inf]
  tokens = sum(max(0, min(s + 1, e) - a) * b * 4096 for a, e, b in zip(starts, ends, batches))
  if s < 2000:
    return 2.2e-4 * (s + 1) / 2000
  if tokens < 10e12:
    return 2.2e-4
  if tokens < 14.3e12:
    f = (tokens - 10e12) / 4.3e12
    return 2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5) * (1 + math.cos(math.pi * f))
  return 2.2e-5 if tokens < 14.3e12 + 333e9 else 7.3e-6


def test_jitted_lr_follows_tokens_through_a_batch_ramp():
  """With a ramp, steps and tokens stop being proportional: the jitted lr at step s is
  V3's schedule at the tokens seen at the end of step s, computed by hand (float32 to
  ~1e-7), through every stage and phase boundary; the host schedule agrees."""
  c = _v3()
  r = recipe.Recipe(c)
  f = r.lr_schedule()
  assert [st.start_step for st in r.stages] == [0, 9319, 13979, 17086, 19416]
  for s in (0, 1, 1999, 2000, 9318, 9319, 13979, 19416, 170905, 170906, 200000, 239252,
            239253, 244545, c.total_steps - 1):
    want = _v3_lr_by_hand(s)
    assert float(f(s)) == pytest.approx(want, rel=2e-6, abs=1e-12), s
    assert r.lr_at_tokens(r.tokens_at_step(s + 1)) == pytest.approx(want, rel=1e-9), s


def test_batch_stages_read_the_stream_in_order():
  """Stage sizes 2 then 4 over 10 rows (gcd 2: epochs of 10 rows): step s reads stream
  positions [2s, 2s + 2) for s < 3, then 4 rows at a time from position 6, running from
  one epoch's permutation into the next; one stage reads as it always did."""
  rows = batches_lib.PackedRows(np.arange(10 * 5, dtype=np.int32) % 7, np.arange(0, 50, 5), 4)
  assert rows.n_rows == 10
  perm = [np.random.default_rng([3, e]).permutation(10) for e in range(3)]
  staged = batches_lib.BatchSchedule(rows, 4, 3, stages=[(0, 2), (3, 4)])
  stream = np.concatenate(perm)
  for s, (lo, hi) in enumerate([(0, 2), (2, 4), (4, 6), (6, 10), (10, 14), (14, 18)]):
    np.testing.assert_array_equal(staged.global_indices(s), stream[lo:hi], err_msg=str(s))
  assert [staged.batch_size_at(s) for s in range(5)] == [2, 2, 2, 4, 4]
  # One stage of 4: 2 batches an epoch (the 2 leftover rows of each epoch skipped).
  plain = batches_lib.BatchSchedule(rows, 4, 3)
  for s, (e, i) in enumerate([(0, 0), (0, 4), (1, 0), (1, 4)]):
    np.testing.assert_array_equal(plain.global_indices(s), perm[e][i:i + 4])
  # A process reads its contiguous half of the global batch.
  np.testing.assert_array_equal(staged.batch(3, 1, 2)["tokens"],
                                rows.rows(stream[8:10])["tokens"])


@pytest.mark.parametrize("field,text,match", [
    ("lr", "linear 0 -> 1e-3 for ten steps", "cannot read phase 1"),
    ("lr", "constant 1e-3; constant 1e-4 for 10T", "only the last phase"),
    ("lr", "constant 1e-3 for 5T; constant 1e-4", "needs a length"),
    ("lr", "wiggle 1e-3 for 5T", "shape 'wiggle'"),
    ("lr", "constant 1e-3 until 5T; constant 1e-4 until 4T", "ends at"),
    ("batch_size", "linear 8 -> 16 for 1T; 16", "constant positive whole"),
    ("mtp_lambda", "0.3 until 1T; 0.2 until 2T; 0.1", "one or two constant"),
    ("bias_rate", "0.001 until 1T; 0.0005", "must be 0"),
])
def test_bad_schedules_are_refused_by_name(field, text, match):
  c = _run_cfg()
  c.schedule[field] = text
  with pytest.raises(ValueError, match=f"schedule.{field}.*{match}|{match}"):
    recipe.Recipe(c)
    train_step.balance_hparams(c)


def test_schedule_command_reports_v3_points(tmp_path):
  out = tmp_path / "recipe.json"
  r = subprocess.run([sys.executable, "-m", "experiments.schedule",
                      "--config=configs/deepseek_v3_671b.py", f"--out={out}",
                      f"--plot={tmp_path / 'recipe.png'}",
                      "--at_tokens=0,469B,10T,14.3T,14.5T,14.7T"],
                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "end of training" in r.stdout and "batch -> 15360" in r.stdout
  pts = json.loads(out.read_text())["points"]
  assert [p["tokens"] for p in pts] == [0, 469 * B, 10 * T, 14.3 * T, 14.5 * T, 14.7 * T]
  assert [p["batch_size"] for p in pts][:1] == [3072]
  assert [p["batch_size"] for p in pts][2:] == [15360] * 4
  assert [p["lr"] for p in pts][1:] == pytest.approx([2.2e-4, 2.2e-4, 2.2e-5, 2.2e-5, 7.3e-6])
  assert [p["mtp_lambda"] for p in pts] == [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]
  assert [p["bias_rate"] for p in pts] == [0.001, 0.001, 0.001, 0, 0, 0]
  assert (tmp_path / "recipe.png").stat().st_size > 10_000
