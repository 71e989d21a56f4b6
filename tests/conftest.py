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
# The tests' programs are tiny: compiling them is most of the suite's time and running
# them little. LLVM's optimisation level 0 compiles XLA:CPU programs about twice as fast
# (a 12-step tiny training run: 51 s -> 30 s, the same losses); it changes no HLO, so
# every sharding, fusion and program the tests check is the one users get
# (docs/history.md, "Fast feedback"). Subprocesses inherit it (train_helpers.subprocess_env).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAG

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


# pytest.ini runs two xdist workers that take whole files in collection order, two files
# each to start: the longest files go first, paired so that neither worker starts with
# two long ones (measured durations: docs/history.md, "Fast feedback"). Within a file the order
# is unchanged.
_LONG_FILES_FIRST = ("tests/train/test_train.py", "tests/test_bench.py",
                     "tests/train/test_aot.py", "tests/test_balancing.py",
                     "tests/test_hf.py")


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return next((i for i, f in enumerate(_LONG_FILES_FIRST) if path.endswith(f)),
                len(_LONG_FILES_FIRST))
  items.sort(key=rank)
