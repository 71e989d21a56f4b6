"""Checkpoints: orbax CheckpointManager holding the train state (params, optimizer, the
balancing bias, the step) and a JSON record (the config and the data position).

The data position is the step itself (batches.BatchSchedule is a pure function of the step),
so restoring the state restores the iterator exactly. Saves are asynchronous; orbax
writes each step to a temporary directory and renames it when complete, so a killed save
leaves no half-written "latest". A latest step that fails to restore anyway (a corrupt
file) is skipped with a warning in favour of the one before; nothing is deleted. When
training resumes past it, the corrupt step is moved aside to WORKDIR/corrupt_checkpoints/
(kept for inspection), so that the step is saved again when training reaches it: orbax
skips a save at or below the newest step on disk, and did so silently before.

A save is reported ("checkpoint at step N saved") only once its background write has
finished and the step's folder is on disk: the loop polls after every step. A write that
fails (a full disk, a quota, a lost mount) stops the run at that poll with one
CheckpointNotSaved naming the cause, the free space and the newest complete step (it used
to surface at the next save, steps after "checkpoint at step N" had been logged, repeated
by every later wait).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from deepseek_jax.model.config import RETIRED_FIELDS
from deepseek_jax.train import multihost

CONFIG_FILE = "config.json"
# Fields that may change between runs in one workdir: they do not change the math (and
# are no part of a run's identity: ablation.runner.config_key).
RESUMABLE_CHANGES = ("log_every", "eval_every", "eval_batches", "final_eval_batches",
                     "checkpoint_every", "keep_checkpoints", "data.prefetch",
                     "data.loader_threads", "data.cache_dir",
                     # the layout (context parallelism at another size: the same math)
                     # and the run a new stage started from (used before any checkpoint)
                     "mesh", "init_from")
# Fields that may change on resume though they change the steps still to train: a longer
# (or shorter) run moves the end of the learning-rate schedule and the bias freeze
# (fractions of total_steps); the loop logs what the change does (loop.describe_resume).
SCHEDULE_CHANGES = ("total_steps",)


def resumable(path: str) -> bool:
  """A config field (dotted path) a run may change on resume: it changes no number (a
  removed model field, config.RETIRED_FIELDS, at the only value it could still hold)."""
  return (path in RESUMABLE_CHANGES or path.split(".")[0] in RESUMABLE_CHANGES
          or path.removeprefix("model.") in RETIRED_FIELDS)


class WorkdirConflict(ValueError):
  pass


class CheckpointNotSaved(RuntimeError):
  pass


class WorkdirBusy(RuntimeError):
  pass


LOCK_FILE = "train.lock"


class WorkdirLock:
  """An exclusive flock on WORKDIR/train.lock for as long as a training runs in it (on
  process 0: the other processes of a job share its workdir). A second training of the
  same workdir is refused by name instead of interleaving its metrics with the first's.
  The kernel drops the lock when its process dies, so a killed run leaves no stale lock.
  (flock is advisory and local: two hosts on a network file system are not covered.)"""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fh = None

  def __enter__(self):
    import fcntl
    import socket
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fh = open(self.path, "a+")
    try:
      fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      fh.seek(0)
      holder = fh.read().strip() or "another process"
      fh.close()
      raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another training "
                        f"({holder}); wait for it, or use another --workdir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    self.fh = fh
    return self

  def __exit__(self, *exc):
    import fcntl
    if self.fh is not None:
      fcntl.flock(self.fh, fcntl.LOCK_UN)
      self.fh.close()
      self.fh = None


def read_config(workdir: str) -> dict | None:
  """The config a workdir's run recorded (config.json), or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def _write_config(workdir: str, cfg_dict: dict):
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(f"{path}.tmp", "w") as fh:
      json.dump(cfg_dict, fh, indent=1, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def check_workdir_config(workdir: str, cfg_dict: dict) -> bool:
  """Records the config on first use; on reuse, refuses a different one except in the
  fields RESUMABLE_CHANGES and SCHEDULE_CHANGES, and records the new values (True:
  resuming)."""
  os.makedirs(workdir, exist_ok=True)
  old = read_config(workdir)
  if old is None:
    _write_config(workdir, cfg_dict)
    return False
  diffs = sorted(_diff(old, json.loads(json.dumps(cfg_dict))))
  hard = [d for d in diffs if not resumable(d) and d not in SCHEDULE_CHANGES]
  if hard:
    raise WorkdirConflict(
        f"workdir {workdir} holds a run of a different config (differs in: "
        f"{', '.join(hard[:10])}). Use a new --workdir, or the same config to resume "
        f"(changes allowed: {', '.join(RESUMABLE_CHANGES + SCHEDULE_CHANGES)}); the "
        "saved run is left untouched.")
  if diffs:
    logging.warning("resuming %s with changed %s", workdir, ", ".join(diffs))
    _write_config(workdir, cfg_dict)
  return True


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


class Checkpointer:
  def __init__(self, workdir: str, keep: int, async_save: bool = True,
               training: bool = False):
    """training: the run that holds the workdir lock. It removes the STEP.orbax-
    checkpoint-tmp folders a write that never finished left (killed, disk full): they
    hold no complete step. A reader (generate, export) must not: the folder may be the
    live write of a training running beside it."""
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=training))
    self.pending = None    # the step whose background write is not confirmed yet
    self.failed = False

  def save(self, step: int, state, meta: dict, force: bool = False):
    """Starts writing `step` (asynchronously); poll() / confirm() report it saved."""
    self.confirm()        # the previous write must have landed first
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:   # the synchronous part (folders, metadata) failed
      raise self._not_saved(step, e) from None
    if not saved:   # orbax's policy refused it: never report a save that did not happen
      raise CheckpointNotSaved(
          f"checkpoint step {step} was not saved in {self.directory}: the newest step "
          f"there is {self.manager.latest_step()}. Steps on disk: {self.steps()}")
    self.pending = step

  def poll(self):
    """Confirms the pending write if it has finished (does not block): the step is
    logged as saved, or CheckpointNotSaved is raised. Returns the confirmed step."""
    if self.pending is not None and not self.manager.is_saving_in_progress():
      return self.confirm()
    return None

  def confirm(self):
    """Blocks until the pending write has finished; logs the step as saved once its
    folder is complete on disk, or raises CheckpointNotSaved. Returns the step."""
    if self.pending is None:
      return None
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._not_saved(step, e) from None
    if not os.path.isdir(os.path.join(self.directory, str(step))):
      raise self._not_saved(step, None)
    logging.info("checkpoint at step %d saved -> %s", step, self.directory)
    return step

  def _not_saved(self, step: int, error) -> CheckpointNotSaved:
    self.failed = True
    cause = "its folder is missing after the write" if error is None else _root_cause(error)
    try:
      free = f"{shutil.disk_usage(self.directory).free / 2**30:.2f} GiB free there"
    except OSError:
      free = "free space unknown"
    complete = [s for s in self.steps() if s != step]
    last = complete[-1] if complete else None
    saved = (f"the newest complete checkpoint is step {last}; free space (or fix the "
             f"path) and rerun the same command to resume from it" if last is not None
             else "no checkpoint is complete yet; free space (or fix the path) and rerun "
             "the same command to start over")
    return CheckpointNotSaved(
        f"checkpoint step {step} could not be written to {self.directory}: {cause} "
        f"({free}). Training stopped: {saved} (the incomplete write is removed then).")

  def wait(self):
    self.confirm()

  def steps(self):
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state, set_aside_corrupt: bool = False):
    """(state, meta, step) of the newest checkpoint that restores, or None if none.
    set_aside_corrupt (training): the newer steps that did not restore are moved to
    WORKDIR/corrupt_checkpoints/ so that training saves them again."""
    steps = self.steps()
    corrupt = []
    for step in reversed(steps):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # a corrupt step: fall back, keep the files for inspection
        logging.warning("checkpoint step %d in %s does not restore (%s: %s); "
                        "falling back to the previous one", step, self.directory,
                        type(e).__name__, str(e)[:300])
        corrupt.append(step)
        continue
      if corrupt and set_aside_corrupt:
        self._set_aside(corrupt)
      return out.state, out.meta, step
    if steps:
      raise RuntimeError(f"no checkpoint in {self.directory} restores (steps {steps}); "
                         "refusing to start over a saved run")
    return None

  def restore_step(self, step: int, abstract_state):
    """(state, meta, step) of checkpoint `step`; a clear error naming the saved steps
    when there is none."""
    steps = self.steps()
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; saved "
                              f"steps: {steps or 'none'}")
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out.state, out.meta, step

  def restore_parts(self, step: int | None, abstract_parts: dict):
    """{name: subtree} of the saved state's top-level fields in abstract_parts (e.g.
    params and expert_bias, not the optimizer) at `step` (None: the latest), read
    without the rest; (parts, step)."""
    steps = self.steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'}"
                              f" in {self.directory}; saved steps: {steps or 'none'}")
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype), abstract_parts)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_parts, restore_args=restore_args, partial_restore=True)))
    return dict(out.state), step

  def _set_aside(self, steps):
    dest = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    if jax.process_index() == 0:
      os.makedirs(dest, exist_ok=True)
      for step in steps:
        to = os.path.join(dest, f"{step}-{int(time.time())}")
        os.replace(os.path.join(self.directory, str(step)), to)
        logging.warning("moved the corrupt checkpoint step %d to %s (kept for "
                        "inspection); it will be saved again when training reaches it",
                        step, to)
    multihost.barrier("deepseek_jax_corrupt_checkpoints_moved")
    self.manager.reload()

  def close(self):
    """Confirms the last write and closes; after a failed write, closes without waiting
    on it again (orbax would raise and log the same error once more)."""
    if self.failed:
      return
    try:
      self.confirm()
    finally:
      if not self.failed:
        self.manager.close()


def _root_cause(error: BaseException) -> str:
  """The innermost message of an exception chain (orbax wraps the OSError of a full disk
  in several layers of thread and future errors)."""
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    nxt = error.__cause__ or error.__context__
    if nxt is None:
      break
    error = nxt
  text = str(error).strip().splitlines()
  detail = f"{type(error).__name__}: {text[0] if text else ''}"
  # The operating system's reason first (tensorstore reports it as os_error_code='28').
  code = getattr(error, "errno", None)
  if code is None:
    found = re.search(r"os_error_code='?(\d+)", str(error))
    code = int(found.group(1)) if found else None
  reason = f"{os.strerror(code)} (errno {code}); " if code else ""
  return reason + (detail if len(detail) <= 300 else detail[:300] + "...")
