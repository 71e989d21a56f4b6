"""Flags and start-up shared by the entry points: multi-host and simulated devices."""

import os

from absl import flags

_COORD = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
_AUTO = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with "
                          "auto-detection (TPU pods, SLURM, ...).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices "
                                    "(per process), e.g. 8 to try a mesh on a laptop.")


def init_distributed():
  """Sets up devices and jax.distributed before anything touches a JAX backend."""
  if _CPU_DEVICES.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
  import jax
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _COORD.value or _NPROC.value:
    if None in (_COORD.value, _NPROC.value, _PID.value):
      raise flags.ValidationError("--coordinator_address, --num_processes and --process_id "
                                  "go together")
    if jax.default_backend() == "cpu" or _CPU_DEVICES.value:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORD.value,
                               num_processes=_NPROC.value, process_id=_PID.value)
  elif _AUTO.value:
    jax.distributed.initialize()
