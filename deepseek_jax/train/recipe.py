"""A run's schedules as functions of tokens seen, declared as phases (V3 report 4.2).

The config's `schedule` section holds one phase string per schedule; an empty string
keeps the step-based settings small configs use (optimizer.warmup_steps and
decay_start_frac, batch_size, mtp_lambda_switch_step, balance.bias_freeze_frac).
Phases are separated by ";" and each reads

    [constant|linear|cosine] VALUE [-> VALUE] [for|until LENGTH]

"for" gives the phase's length, "until" the total tokens at its end; the last phase may
leave it out (it runs to the end of training). LENGTH is a token count with an optional
K/M/B/T suffix (4.3T = 4.3e12 tokens) or "N steps". V3's recipe then reads like the
report's paragraph:

    lr          linear 0 -> 2.2e-4 for 2000 steps; constant 2.2e-4 until 10T;
                cosine 2.2e-4 -> 2.2e-5 for 4.3T; constant 2.2e-5 for 333B;
                constant 7.3e-6 for 167B
    batch_size  3072 for 117.25B; 6144 for 117.25B; ...; 15360
    mtp_lambda  0.3 until 10T; 0.1
    bias_rate   0.001 until 14.3T; 0

Batch-size phases are constants (each a stage: its own compiled program); a stage ends
at the first step boundary at or past its token count, so tokens and steps map exactly
both ways (`tokens_at_step`, `step_at_tokens`). A step's learning rate is the schedule's
value at the tokens seen at the END of that step (so a warmup's first step is not lr 0,
as optimizer.warmup_steps has it). mtp_lambda and bias_rate take at most two constant
phases: their switch becomes a step (the first step at or past the switch's tokens), which
is the form the train step already reads (hparams mtp_lambda_switch_step,
bias_freeze_step).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re

import jax.numpy as jnp

SHAPES = ("constant", "linear", "cosine")
SCHEDULES = ("lr", "batch_size", "mtp_lambda", "bias_rate")
_SUFFIX = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}
_PHASE = re.compile(
    r"^\s*(?:(?P<shape>[a-z]+)\s+)?(?P<a>[-+0-9.eE]+)\s*(?:->\s*(?P<b>[-+0-9.eE]+))?"
    r"\s*(?:(?P<kind>for|until)\s+(?P<n>[0-9.eE+]+)\s*(?P<unit>[KMBT]|steps?)?)?\s*$")


def parse_tokens(text: str) -> float:
  """"10T", "333B", "4.3e12", "12M" -> a token count."""
  m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMBT]?)\s*", text)
  if not m:
    raise ValueError(f"{text!r} is not a token count (like 10T, 333B, 4.3e12)")
  return float(m[1]) * _SUFFIX[m[2]]


@dataclasses.dataclass(frozen=True)
class Phase:
  shape: str
  start: float
  end: float
  kind: str | None        # "for" | "until" | None (to the end)
  length: float | None    # tokens, or steps when unit == "steps"
  unit: str               # "tokens" | "steps"


def parse(name: str, text: str) -> list[Phase]:
  """The phases of one schedule string; a clear error naming the schedule and phase."""
  phases = []
  parts = [p for p in text.split(";") if p.strip()]
  for i, part in enumerate(parts):
    m = _PHASE.match(part)
    if not m:
      raise ValueError(f"schedule.{name}: cannot read phase {i + 1} {part.strip()!r}; a "
                       "phase reads '[constant|linear|cosine] VALUE [-> VALUE] "
                       "[for|until LENGTH]', LENGTH like 10T, 333B or '2000 steps'")
    shape = m["shape"] or ("constant" if m["b"] is None else "linear")
    if shape not in SHAPES:
      raise ValueError(f"schedule.{name}: phase {i + 1} has shape {shape!r}; known: {SHAPES}")
    start = float(m["a"])
    end = float(m["b"]) if m["b"] is not None else start
    if shape == "constant" and end != start:
      raise ValueError(f"schedule.{name}: phase {i + 1} is constant but goes {start} -> {end}")
    unit = "steps" if (m["unit"] or "").startswith("step") else "tokens"
    length = None
    if m["kind"]:
      length = float(m["n"]) * (_SUFFIX[m["unit"] or ""] if unit == "tokens" else 1)
      if length <= 0 and m["kind"] == "for":
        raise ValueError(f"schedule.{name}: phase {i + 1} has length {length}")
    elif i < len(parts) - 1:
      raise ValueError(f"schedule.{name}: only the last phase may leave out its length "
                       f"(phase {i + 1} of {len(parts)}: {part.strip()!r})")
    phases.append(Phase(shape, start, end, m["kind"], length, unit))
  return phases


@dataclasses.dataclass(frozen=True)
class Stage:
  """A batch-size stage: steps [start_step, end_step) at `batch` sequences per step."""
  batch: int
  start_step: int
  start_tokens: int
  end_step: int | None     # None: to the end of training


class Recipe:
  """The schedules of one run config (its `schedule` section, seq_len, batch_size)."""

  def __init__(self, cfg):
    sched = cfg.get("schedule") or {}
    self.seq_len = int(cfg.seq_len)
    self.texts = {k: (sched.get(k) or "").strip() for k in SCHEDULES}
    unknown = set(sched.keys()) - set(SCHEDULES)
    if unknown:
      raise ValueError(f"schedule: unknown field(s) {sorted(unknown)}; known: {SCHEDULES}")
    self.stages = self._stages(cfg)
    self._starts = [s.start_step for s in self.stages]
    self.lr_phases = self._bounded("lr") if self.texts["lr"] else None
    self.total_tokens = self.lr_phases[-1][1] if self.lr_phases else None
    self.switches = {k: self._switch(k) for k in ("mtp_lambda", "bias_rate")}

  # Batch stages and the step <-> tokens map --------------------------------------------
  def _stages(self, cfg) -> list[Stage]:
    if not self.texts["batch_size"]:
      return [Stage(int(cfg.batch_size), 0, 0, None)]
    stages, step, tokens = [], 0, 0
    phases = parse("batch_size", self.texts["batch_size"])
    for i, p in enumerate(phases):
      if p.shape != "constant" or p.start != int(p.start) or p.start <= 0:
        raise ValueError("schedule.batch_size: every phase is a constant positive whole "
                         f"number of sequences (a stage); phase {i + 1} is not")
      if p.unit == "steps":
        raise ValueError("schedule.batch_size: give stage lengths in tokens, not steps")
      batch = int(p.start)
      if p.kind is None:
        stages.append(Stage(batch, step, tokens, None))
        break
      end_tokens = p.length if p.kind == "until" else tokens + p.length
      per_step = batch * self.seq_len
      n = max(math.ceil((end_tokens - tokens) / per_step), 1)  # ends on a step boundary
      stages.append(Stage(batch, step, tokens, step + n))
      step, tokens = step + n, tokens + n * per_step
    if stages[-1].end_step is not None:  # the last stage's batch runs on
      last = stages[-1]
      stages.append(Stage(last.batch, last.end_step, tokens, None))
    return stages

  @property
  def batch_sizes(self) -> list[int]:
    return sorted({s.batch for s in self.stages})

  def stage_at_step(self, step: int) -> Stage:
    return self.stages[bisect.bisect_right(self._starts, step) - 1]

  def tokens_at_step(self, step: int) -> int:
    """Tokens seen before step `step` runs (exact integers)."""
    s = self.stage_at_step(step)
    return s.start_tokens + (step - s.start_step) * s.batch * self.seq_len

  def step_at_tokens(self, tokens: float) -> int:
    """The first step that starts with at least `tokens` seen."""
    i = max(j for j, s in enumerate(self.stages) if s.start_tokens <= tokens)
    s = self.stages[i]
    return s.start_step + math.ceil((tokens - s.start_tokens) / (s.batch * self.seq_len))

  def step_of_token(self, tokens: float) -> int:
    """The step in progress when the run has seen `tokens` (the one that starts at or
    before it and ends after it)."""
    step = self.step_at_tokens(tokens)
    return step if self.tokens_at_step(step) == tokens else step - 1

  @property
  def total_steps(self) -> int | None:
    return None if self.total_tokens is None else self.step_at_tokens(self.total_tokens)

  # The learning rate -------------------------------------------------------------------
  def _to_tokens(self, phase: Phase, start_tokens: float) -> float:
    if phase.unit == "steps":
      start_step = self.step_at_tokens(start_tokens)
      end = phase.length if phase.kind == "until" else start_step + phase.length
      return float(self.tokens_at_step(int(end)))
    return phase.length if phase.kind == "until" else start_tokens + phase.length

  def _bounded(self, name) -> list[tuple[float, float, Phase]]:
    """[(start_tokens, end_tokens, phase)]; every phase must end (the run's length)."""
    out, t = [], 0.0
    for i, p in enumerate(parse(name, self.texts[name])):
      if p.kind is None:
        raise ValueError(f"schedule.{name}: the last phase needs a length (for/until): "
                         "the learning-rate schedule fixes the run's total tokens")
      end = self._to_tokens(p, t)
      if end <= t:
        raise ValueError(f"schedule.{name}: phase {i + 1} ends at {end:.4g} tokens, not "
                         f"after its start at {t:.4g}")
      out.append((t, end, p))
      t = end
    return out

  def lr_at_tokens(self, tokens: float) -> float:
    """The learning rate in force at `tokens` (host, float64)."""
    for t0, t1, p in self.lr_phases:
      if tokens < t1 or (t0, t1, p) == self.lr_phases[-1]:
        f = min(max((tokens - t0) / (t1 - t0), 0.0), 1.0)
        return _shape(p, f, math)
    raise AssertionError

  def lr_schedule(self):
    """optax schedule: step -> lr at the tokens seen at the end of that step (jittable;
    tokens in float32, so a boundary is placed to within ~1e-7 of the run)."""
    starts = jnp.asarray([s.start_step for s in self.stages], jnp.float32)
    tok0 = jnp.asarray([s.start_tokens for s in self.stages], jnp.float32)
    per = jnp.asarray([s.batch * self.seq_len for s in self.stages], jnp.float32)
    phases = self.lr_phases

    def schedule(step):
      end = jnp.asarray(step, jnp.float32) + 1.0
      i = jnp.clip(jnp.searchsorted(starts, end, side="right") - 1, 0, len(self.stages) - 1)
      tokens = tok0[i] + (end - starts[i]) * per[i]
      values, conds = [], []
      for t0, t1, p in phases:
        f = jnp.clip((tokens - t0) / (t1 - t0), 0.0, 1.0)
        values.append(_shape(p, f, jnp))
        conds.append(tokens < t1)
      return jnp.select(conds, values, values[-1])
    return schedule

  # Two-phase switches ---------------------------------------------------------------
  def _switch(self, name):
    """(first value, later value, switch tokens) or None for an empty schedule."""
    if not self.texts[name]:
      return None
    phases = parse(name, self.texts[name])
    if len(phases) > 2 or any(p.shape != "constant" for p in phases):
      raise ValueError(f"schedule.{name}: one or two constant phases ('A until N; B'), "
                       f"as the train step switches it once; got {self.texts[name]!r}")
    first = phases[0]
    if len(phases) == 1:
      return first.start, first.start, None
    return first.start, phases[1].start, self._to_tokens(first, 0.0)

  def value_at_tokens(self, name: str, tokens: float) -> float | None:
    sw = self.switches[name]
    if sw is None:
      return None
    a, b, at = sw
    return a if at is None or tokens < at else b

  def switch_step(self, name: str) -> int:
    """The first step whose update uses the later value (-1: never switches)."""
    sw = self.switches[name]
    return -1 if sw is None or sw[2] is None else self.step_at_tokens(sw[2])

  def stage(self, spec: str | None) -> Stage:
    """A batch-size stage by its number in the ramp ("1" the first), by a token count it
    covers ("200B", "1.5T"), or the largest ("largest", None): what experiments.compile
    compiles (the largest is the one that must fit)."""
    spec = (spec or "largest").strip()
    if spec == "largest":
      return max(self.stages, key=lambda s: (s.batch, s.start_step))
    if spec.isdigit() and 1 <= int(spec) <= len(self.stages):
      return self.stages[int(spec) - 1]
    try:
      tokens = parse_tokens(spec)
    except ValueError:
      raise ValueError(f"stage {spec!r}: give a stage number 1..{len(self.stages)}, a token "
                       "count such as 200B, or 'largest'") from None
    return self.stage_at_step(self.step_of_token(tokens))

  # Reporting -----------------------------------------------------------------------
  def point(self, tokens: float) -> dict:
    return {"tokens": tokens, "step": self.step_of_token(tokens),
            "lr": self.lr_at_tokens(tokens) if self.lr_phases else None,
            "batch_size": self.stage_at_step(self.step_of_token(tokens)).batch,
            "mtp_lambda": self.value_at_tokens("mtp_lambda", tokens),
            "bias_rate": self.value_at_tokens("bias_rate", tokens)}

  def boundaries(self) -> list[dict]:
    """Every phase boundary of every schedule, in token order, with the values in force
    just after it."""
    marks = {0.0: ["start"]}
    for i, (t0, t1, p) in enumerate(self.lr_phases or []):
      last = i == len(self.lr_phases) - 1
      marks.setdefault(t1, []).append("end of training" if last else f"lr {p.shape} ends")
    for s in self.stages[1:]:
      marks.setdefault(float(s.start_tokens), []).append(f"batch -> {s.batch}")
    for name in ("mtp_lambda", "bias_rate"):
      sw = self.switches[name]
      if sw and sw[2] is not None:
        marks.setdefault(sw[2], []).append(f"{name} -> {sw[1]:g}")
    rows = []
    for t in sorted(marks):
      row = self.point(min(t, self.total_tokens or t))
      row["events"] = ", ".join(marks[t])
      rows.append(row)
    return rows


def _shape(p: Phase, f, np_like):
  if p.shape == "constant":
    return p.start + 0 * f
  if p.shape == "linear":
    return p.start + (p.end - p.start) * f
  return p.end + (p.start - p.end) * 0.5 * (1 + np_like.cos(math.pi * f))
