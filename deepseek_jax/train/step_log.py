"""A train step's metrics, from the device to the log.

The loop pulls step s's metrics after step s+1 is dispatched (StepLog.pull) and records
them (StepLog.record): a skipped step (non-finite loss or gradient norm, which the train
step did not apply) is logged, and too many in a row stop the run before anything saves;
a gradient norm stuck at exactly 0 is warned about; tokens/s, MFU and the ETA are
measured over each logging window, evaluation and saving left out.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import logging


class NonFiniteLoss(FloatingPointError):
  pass


class ZeroGradWatch:
  """A gradient norm of exactly 0 for `steps` steps in a row: the model has stopped
  learning while the loss stays finite (the non-finite check does not see it)."""

  def __init__(self, steps: int = 3):
    self.steps, self.run = steps, 0

  def __call__(self, step: int, loss: float, grad_norm: float) -> str | None:
    self.run = self.run + 1 if grad_norm == 0.0 else 0
    if self.run != self.steps:
      return None
    return (f"gradient norm exactly 0 for {self.steps} steps in a row (steps "
            f"{step - self.steps + 1}-{step}, loss {loss:.4f}): the model has stopped "
            "learning (saturated or dead activations, often a learning rate far too high)")


def window_rates(tokens: float, seconds: float, flops_per_token: float,
                 peak_flops: float) -> dict:
  """tokens_per_s and mfu of a logging window that trained `tokens` in `seconds`."""
  return {"tokens_per_s": tokens / seconds,
          "mfu": tokens * flops_per_token / seconds / peak_flops}


def eta_seconds(elapsed: float, steps_done: int, steps_left: int) -> float:
  """The time the steps left take at the run's mean pace so far."""
  return elapsed / steps_done * steps_left


class StepLog:
  """Pulls and records each step's metrics (see the module docstring).

  groups: the parameter groups in the train step's "grad_finite" order; n_moe_layers:
  the main model's MoE layers (MaxVio's mean leaves the MTP rows out); ckpt: asked for
  the latest saved step when the run stops on skipped steps."""

  def __init__(self, cfg, *, writer, recipe, ckpt, groups, n_moe_layers: int,
               flops_per_token: float, peak_flops: float, start_step: int):
    self.cfg, self.writer, self.recipe, self.ckpt = cfg, writer, recipe, ckpt
    self.groups, self.n_moe = groups, n_moe_layers
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.zero_grads = ZeroGradWatch()
    self.skipped_run: list[int] = []    # the current run of skipped steps
    self.last: dict = {}
    self.t_start = time.perf_counter()
    self.start_step = start_step
    self.pulled = self.window = self.t_start
    self.since = start_step

  def pull(self, pending) -> dict:
    """Host copy of the metrics of `pending` = (step, device metrics)."""
    s, dev_metrics = pending
    m = jax.device_get(dev_metrics)
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if m["skipped"]:   # the step's own test: loss or gradient norm not finite
      self._skipped(s, loss, gnorm, m)
    else:
      self.skipped_run.clear()
    stalled = self.zero_grads(s, loss, gnorm)
    if stalled:
      logging.warning("%s", stalled)
    if "maxvio" in m:
      m["maxvio_mean"] = float(np.mean(m["maxvio"][:self.n_moe]))
    now = time.perf_counter()
    m["step_time"] = now - self.pulled
    self.pulled = now
    return m

  def _skipped(self, s: int, loss: float, gnorm: float, m: dict) -> None:
    """Logs skipped step s; more than cfg.max_skipped_steps in a row raise NonFiniteLoss
    (the state holds no update of a skipped step, so the latest checkpoint is sound)."""
    what = " and ".join(name for name, v in (("loss", loss), ("gradient norm", gnorm))
                        if not math.isfinite(v)) or "update"
    bad = [g for g, fin in zip(self.groups, np.asarray(m.get("grad_finite", []))) if not fin]
    where = f" (non-finite gradients in {', '.join(bad)})" if bad else ""
    self.skipped_run.append(s)
    limit = self.cfg.max_skipped_steps
    if len(self.skipped_run) > limit:
      self.ckpt.wait()
      saved = self.ckpt.steps()
      raise NonFiniteLoss(
          f"non-finite {what} at step {s}{where}: {len(self.skipped_run)} step(s) in a row "
          f"(steps {self.skipped_run[0]}-{s}) were skipped, more than max_skipped_steps="
          f"{limit}; training stopped. The skipped steps changed nothing; the latest "
          f"checkpoint is step {saved[-1] if saved else None} in {self.ckpt.directory} "
          "(its parameters are finite; a diverging run can still hold huge ones there: "
          "lower the learning rate before resuming from it)")
    logging.warning("step %d skipped: non-finite %s (loss %s, gradient norm %s)%s; "
                    "parameters and optimizer state left as they were", s, what, loss,
                    gnorm, where)

  def record(self, s: int, m: dict, extra=None, console: bool = False, now=None) -> None:
    """Writes step s's metrics (plus `extra`, e.g. an evaluation's); every log_every
    steps, or when `console`, with the window's tokens/s and MFU and a console line."""
    m.update(extra or {})
    if console or (s + 1) % self.cfg.log_every == 0:
      now = now or time.perf_counter()
      steps, dt = s + 1 - self.since, now - self.window
      if steps > 0 and dt > 0:
        tokens = self.recipe.tokens_at_step(s + 1) - self.recipe.tokens_at_step(self.since)
        m.update(window_rates(tokens, dt, self.flops_per_token, self.peak_flops))
      self.window, self.since = now, s + 1
      eta = eta_seconds(now - self.t_start, s + 1 - self.start_step,
                        self.cfg.total_steps - s - 1)
      self.writer.console(s + 1, m, eta)
    self.writer.write(s, m)
    self.last = m

  def paused(self, step: int) -> None:
    """Evaluation or saving ran until now: not training time."""
    self.pulled = self.window = time.perf_counter()
    self.since = step
