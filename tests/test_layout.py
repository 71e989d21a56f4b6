"""The library's layering, read from the source (every import, function-level ones too).

Layers, lowest first; a module may import its own layer and those below it, never above:
  model/      the architecture (config, layers, MLA, MoE and its dispatch, blocks, MTP)
  data/       raw inputs, tokenizing into prepared shards, their reader, tokenizers, a
              run's corpus (beside model/: neither imports the other)
  balancing   the headline concept: bias update, balance losses, MaxVio (on MoEStats)
  train/      batches, sharding, losses, the pure step, the loop, checkpoints, metrics
  inference/  decode loops over the latent cache, speculative decoding, sampling (it
              loads trained runs through train/'s checkpoints)
  hf          Hugging Face import/export (beside inference/: neither imports the other)
  ablation/, bench/   experiments built on everything above

Two rules of the layering have their own test, for the message: measurement code (bench/)
never reaches the model, the data or the training (a counter or timer in a program the
training step runs would change it), and the entry points (experiments/*.py) stay thin:
flags and a call into the library, no long functions.
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "deepseek_jax"
EXPERIMENTS = PKG.parent / "experiments"
LAYERS = {"model": 0, "data": 0, "balancing": 1, "train": 2, "inference": 3, "hf": 3, "ablation": 4,
          "bench": 4}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The library modules `path` imports (`from pkg import mod` resolves to pkg.mod)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name and name != "deepseek_jax":
        out.add(name)
  return out


def _graph():
  """{module: library modules it imports}, the package's empty __init__ left out."""
  files = {_module_name(p): p for p in PKG.rglob("*.py")}
  files.pop("deepseek_jax")
  modules = set(files)
  return {m: _imports(p, modules) - {m} for m, p in files.items()}


def _layer(module: str) -> str:
  return module.split(".")[1]


def test_every_module_is_in_a_layer():
  unknown = sorted({_layer(m) for m in _graph()} - set(LAYERS))
  assert not unknown, f"modules outside the layer table: {unknown}"


def test_no_upward_import():
  upward = [(m, d) for m, deps in _graph().items() for d in deps
            if LAYERS[_layer(d)] > LAYERS[_layer(m)]
            or (LAYERS[_layer(d)] == LAYERS[_layer(m)] and _layer(d) != _layer(m))]
  assert not upward, f"imports from a higher (or sibling) layer: {upward}"


def test_model_imports_only_model():
  graph = _graph()
  outside = [(m, d) for m, deps in graph.items() if _layer(m) == "model"
             for d in deps if _layer(d) != "model"]
  assert not outside


def test_model_data_and_train_never_import_bench():
  """Also implied by the layer numbers (bench/ is the top layer); stated on its own so
  that a benchmark helper moved into the model fails with this message."""
  graph = _graph()
  reach = [(m, d) for m, deps in graph.items() if _layer(m) in ("model", "data", "train")
           for d in deps if _layer(d) == "bench"]
  assert not reach, (f"benchmark code imported by the model, data or training: {reach}; "
                     "keep counters and timers in deepseek_jax/bench/ and pass them what "
                     "they measure")


# Entry points hold flags and a call; logic longer than this lives in the library.
MAX_ENTRY_FUNCTION_LINES = 40
# Entry-point functions already longer, at their present length (they may only shrink).
LONG_ENTRY_FUNCTIONS = {"compile.py:main": 42, "generate.py:main": 64, "serve.py:main": 63}


def test_entry_points_stay_thin():
  long = []
  for path in sorted(EXPERIMENTS.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        name, lines = f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1
        if lines > LONG_ENTRY_FUNCTIONS.get(name, MAX_ENTRY_FUNCTION_LINES):
          long.append(f"{name} ({lines} lines)")
  assert not long, (f"entry-point functions over {MAX_ENTRY_FUNCTION_LINES} lines: {long}; "
                    "move the logic into deepseek_jax/ (importable, testable) and leave "
                    "flags and a call in experiments/")


def test_no_import_cycle():
  graph = _graph()
  state = {}

  def visit(m, path):
    if state.get(m) == "done":
      return
    if state.get(m) == "open":
      cycle = path[path.index(m):] + [m]
      pytest.fail("import cycle: " + " -> ".join(cycle))
    state[m] = "open"
    for d in sorted(graph[m]):
      visit(d, path + [m])
    state[m] = "done"

  for m in sorted(graph):
    visit(m, [])


def test_the_checker_sees_a_planted_cycle(tmp_path, monkeypatch):
  """The cycle check is not vacuous: a graph with a planted circle fails it."""
  monkeypatch.setattr(__import__(__name__), "_graph", lambda: {
      "deepseek_jax.model.a": {"deepseek_jax.model.b"},
      "deepseek_jax.model.b": {"deepseek_jax.model.a"}})
  with pytest.raises(pytest.fail.Exception, match="import cycle"):
    test_no_import_cycle()
