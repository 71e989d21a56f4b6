"""StepLog: the tokens/s, MFU and ETA arithmetic, and the skipped-step rule, on numbers
worked out by hand (no training)."""

import types

import numpy as np
import pytest

from deepseek_jax.train import step_log


def test_window_rates_and_eta_by_hand():
  # 1,000 tokens in 2 s at 6e6 FLOPs a token on a 1e10 FLOP/s machine: 500 tokens/s,
  # 3e9 FLOP/s of model work, MFU 0.3.
  assert step_log.window_rates(1000, 2.0, 6e6, 1e10) == pytest.approx(
      {"tokens_per_s": 500.0, "mfu": 0.3})
  # 5 steps took 10 s: the 20 left take 40 s.
  assert step_log.eta_seconds(10.0, 5, 20) == pytest.approx(40.0)


class _Writer:
  def __init__(self):
    self.lines, self.rows = [], []

  def console(self, step, m, eta):
    self.lines.append((step, dict(m), eta))

  def write(self, step, m):
    self.rows.append(step)


class _Recipe:
  """A ramp: 100 tokens a step before step 4, 300 after."""
  def tokens_at_step(self, s):
    return 100 * min(s, 4) + 300 * max(s - 4, 0)


class _Ckpt:
  directory = "/nowhere/checkpoints"
  def wait(self):
    pass
  def steps(self):
    return [2]


def _log(start_step=2, **cfg):
  cfg = types.SimpleNamespace(**{"log_every": 3, "total_steps": 12, "max_skipped_steps": 1,
                                 **cfg})
  return step_log.StepLog(cfg, writer=_Writer(), recipe=_Recipe(), ckpt=_Ckpt(),
                          groups=["embed", "layer_0"], n_moe_layers=1,
                          flops_per_token=2.0, peak_flops=1000.0, start_step=start_step)


def test_record_measures_each_window_across_a_ramp():
  log = _log(start_step=3)
  log.window = log.t_start = 100.0          # the run resumed at step 3 at t = 100 s
  log.record(3, {"loss": 1.0}, now=101.0)   # (3 + 1) % log_every 3 != 0: written, not shown
  assert log.writer.lines == [] and log.writer.rows == [3]
  log.record(5, {"loss": 1.0}, now=104.0)   # (5 + 1) % 3 == 0: the window of steps 3-5
  step, m, eta = log.writer.lines[-1]
  # tokens_at_step(6) - tokens_at_step(3) = 1000 - 300 = 700 tokens in 4 s
  assert step == 6 and m["tokens_per_s"] == pytest.approx(175.0)
  assert m["mfu"] == pytest.approx(175.0 * 2.0 / 1000.0)
  assert eta == pytest.approx(4.0 / 3 * 6)  # 3 steps in 4 s; steps 6..11 left
  log.paused(6)                             # an evaluation ran: not training time
  log.window = 110.0
  log.record(8, {"loss": 1.0}, now=113.0)   # steps 6-8: 900 tokens in 3 s
  assert log.writer.lines[-1][1]["tokens_per_s"] == pytest.approx(300.0)


def _metrics(loss, gnorm, skipped, finite=(True, True)):
  return {"loss": np.float32(loss), "grad_norm": np.float32(gnorm),
          "skipped": np.bool_(skipped), "grad_finite": np.array(finite),
          "maxvio": np.array([0.5, 9.0])}


def test_skipped_steps_stop_the_run_past_the_limit_and_name_the_group():
  log = _log(max_skipped_steps=1)
  m = log.pull((3, _metrics(2.0, 1.0, False)))
  assert m["maxvio_mean"] == pytest.approx(0.5)   # the MTP row left out
  log.pull((4, _metrics(float("nan"), 1.0, True)))          # one skipped: logged only
  log.pull((5, _metrics(2.0, 1.0, False)))                  # a good step resets the run
  log.pull((6, _metrics(2.0, float("inf"), True, (True, False))))
  with pytest.raises(step_log.NonFiniteLoss, match=r"gradient norm at step 7 \(non-finite "
                     r"gradients in layer_0\).*steps 6-7.*latest checkpoint is step 2"):
    log.pull((7, _metrics(2.0, float("inf"), True, (True, False))))
