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
    from deepseek_jax.data.corpus import default_cache_dir
    jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


USAGE_EXIT = 2   # a user's mistake (flags, config values, paths): one line, this status


def fail(message):
  """A user's mistake with the flags: the line, a pointer to the help, USAGE_EXIT."""
  import sys
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                   "Pass --helpfull to see help on flags.\n")
  sys.exit(USAGE_EXIT)


def define_config_overrides(config, source: str, help_string: str):
  """--config.PATH=VALUE overrides of `config` (a ConfigDict an experiment builds its
  runs from, made by `source`), typed by it, as experiments.train takes them: config_flags'
  DEFINE_config_dict, whose overrides the experiment reads with
  config_flags.get_override_values(flags.FLAGS["config"]). ml_collections reads the
  command line for them while defining the flag, so a field the config lacks fails here,
  at import: in one line naming it and the nearest real fields, as in run()."""
  import sys
  from ml_collections import config_flags
  known = _config_paths(config.to_dict())
  try:
    holder = config_flags.DEFINE_config_dict("config", config, help_string,
                                             lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    fail(_unknown_path(_override_paths(sys.argv), known, source)
         or f"--config: {type(e).__name__}: {e}")
  flags.FLAGS["config"].default_as_str = repr(source)   # not the whole config in --help
  _BUILT_IN_CONFIG.append(source)
  return holder


_BUILT_IN_CONFIG = []   # define_config_overrides's source: --config=FILE is refused


def run(main):
  """absl's app.run(main), where a bad flag exits with USAGE_EXIT after one line, and a
  `--config.PATH=VALUE` override naming no field of the config gives a line naming it
  and the nearest real fields (ml_collections raises an AttributeError or KeyError under
  three tracebacks instead)."""
  from absl import app

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      if _BUILT_IN_CONFIG and "Overriding config is not allowed" in str(e):
        fail(f"--config=...: this experiment builds its runs from {_BUILT_IN_CONFIG[0]}; "
             "give fields to change as --config.PATH=VALUE")
      fail(unknown_config_override(argv) or str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      message = unknown_config_override(argv)
      if message is None:
        raise
      fail(f"{message} ({type(e).__name__}: {e})")

  app.run(main, flags_parser=parse)


def _config_paths(node, prefix=""):
  out = []
  for key, value in node.items():
    path = f"{prefix}{key}"
    out.append(path)
    if isinstance(value, dict):
      out += _config_paths(value, path + ".")
  return out


def _override_paths(argv) -> list[str]:
  return [a[len("--config."):].split("=", 1)[0] for a in argv[1:]
          if a.startswith("--config.")]


def unknown_config_override(argv) -> str | None:
  """The message for the first --config.PATH override of argv that names no field of
  the --config file's config, or None (then the failure is something else)."""
  import importlib.util
  spec = None
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(args):
      spec = args[i + 1]
  overrides = _override_paths(argv)
  if spec is None or not overrides:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_for_message", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  except Exception:   # the config itself is what fails: absl's own message says so
    return None
  return _unknown_path(overrides, _config_paths(config), path)


def _unknown_path(overrides, known, source: str) -> str | None:
  """The message for the first of `overrides` (dotted paths) not in `known`, or None."""
  import difflib
  for override in overrides:
    if override in known:
      continue
    parts = override.split(".")
    # The first missing name along the path: a section or the field itself.
    depth = next(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in known)
    parent, name = ".".join(parts[:depth - 1]), parts[depth - 1]
    what = "section" if depth < len(parts) else "field"
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    near = difflib.get_close_matches(override, known, n=3, cutoff=0.6) or siblings[:8]
    where = f"section '{parent}'" if parent else "the config"
    return (f"--config.{override}: {where} has no {what} '{name}' ({source}); nearest: "
            + ", ".join(f"--config.{n}" for n in near))
  return None
