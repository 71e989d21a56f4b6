"""What the processes of a multi-host run agree on outside the compiled steps.

A host-level wait (one process prepares data, or compiles slower than the others) is a
barrier of jax.distributed's coordination service, not a device collective: the first
collective over a set of CPU devices opens a Gloo communicator whose key-value lookups
give up after a minute ("Gloo context initialization failed: DEADLINE_EXCEEDED"), so a
process that waits there for a slow peer can die. The coordination barrier waits as long
as it is told and names what it waited for.
"""

from __future__ import annotations

import jax
import numpy as np

# How long a process waits for the others at a barrier (data preparation on first use,
# compilation on a loaded host) before the run stops with a message.
BARRIER_TIMEOUT_S = 3600


class PeerTimeout(RuntimeError):
  """A process did not reach a barrier in time."""


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S):
  """Every process waits here until all arrive (one process: returns at once)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:   # not started by jax.distributed (cannot happen with >1 process)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
    return
  try:
    client.wait_at_barrier(name, int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 (the service's own error, re-raised with context)
    raise PeerTimeout(
        f"process {jax.process_index()} waited {timeout_s:.0f} s at '{name}' and not every "
        f"one of the {jax.process_count()} processes arrived (one crashed or is stuck: see "
        f"its log): {str(e).splitlines()[0]}") from None


def any_process(flag: bool) -> bool:
  """flag of this process, or True if it is set in any process (a preemption signal can
  reach the hosts at different steps: all must stop at the same one)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))
