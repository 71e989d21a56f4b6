"""Shared test setup: CPU only, and the numpy references importable from any test file."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU compile tests (test_aot.py) load libtpu in this process and in subprocesses.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Eight simulated CPU devices for the mesh tests; single-device code still runs on one.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

# A persistent XLA cache shared by this session's tests and the subprocesses they start:
# many tests compile the same tiny train step, so only the first one pays for it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deepseek_jax_xla_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
