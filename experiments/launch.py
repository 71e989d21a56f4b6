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
    # Cross-process collectives on CPU devices (localhost tests, CPU clusters); the
    # option only concerns the CPU backend, and must be set before it starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORD.value,
                               num_processes=_NPROC.value, process_id=_PID.value)
  elif _AUTO.value:
    jax.distributed.initialize()
  enable_compilation_cache()


def enable_compilation_cache():
  """A persistent XLA cache (runs of the same shapes skip compilation), unless set."""
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    from deepseek_jax.data import default_cache_dir
    jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
