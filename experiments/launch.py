"""Flags and start-up shared by the entry points: multi-host, simulated devices, and a
console that shows the project's own lines."""

import logging as py_logging
import os

from absl import flags
from absl import logging

_COORD = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
_AUTO = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with "
                          "auto-detection (TPU pods, SLURM, ...).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices "
                                    "(per process), e.g. 8 to try a mesh on a laptop.")


_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
              + os.sep for d in ("deepseek_jax", "experiments", "configs"))


class _ProjectLines(py_logging.Filter):
  """Passes the project's own records and every warning or error; drops third-party
  INFO/DEBUG records (orbax's renames and thread joins, jax's backend probing)."""

  def filter(self, record):
    return (record.levelno >= py_logging.WARNING
            or os.path.abspath(record.pathname).startswith(_OURS))


def quiet_console():
  """Third-party INFO logs off the console unless asked for with absl's verbosity flags
  (--verbosity=1 / -v 1 shows everything, as absl does by default)."""
  handler = logging.get_absl_handler()
  for f in list(handler.filters):
    if isinstance(f, _ProjectLines):
      handler.removeFilter(f)
  if flags.FLAGS["verbosity"].present or flags.FLAGS.verbosity > 0:
    return
  handler.addFilter(_ProjectLines())


def init_distributed():
  """Sets up devices and jax.distributed before anything touches a JAX backend."""
  quiet_console()
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
    from deepseek_jax.train.data import default_cache_dir
    jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
