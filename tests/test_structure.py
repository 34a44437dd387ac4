"""The house rules a reader relies on: each module imports only from its own
layer or the ones below it, and no module grows past what one sitting reads."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "st_keras")

# Lower layers first: layouts -> ops -> layers -> models -> sample/evaluate
# -> train/export. Helpers that import nothing of st_keras (data, cli_types,
# multi_worker, serving_client) sit at the bottom, where anything may use
# them; config and the run directory sit between the model and what runs it.
LAYERS = (
    ("layouts", "data", "cli_types", "multi_worker", "serving_client"),
    ("ops", "plotting"),
    ("layers",),
    ("models",),
    ("config", "run_dir", "training_log", "checkpoints"),
    ("sample", "evaluate", "run_control"),
    ("train", "export"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 450


def _modules():
  """(top-level name, path) of every module of the package but its
  __init__ (which imports the public modules for Keras's registry)."""
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      path = os.path.join(root, name)
      if name.endswith(".py") and path != os.path.join(PACKAGE,
                                                       "__init__.py"):
        top = os.path.relpath(path, PACKAGE).split(os.sep)[0]
        yield top.removesuffix(".py"), path


def _imported(path):
  """Top-level st_keras modules that the module at `path` imports."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (
        node.module or "").split(".")[0] == "st_keras":
      parts = node.module.split(".")
      found.update([parts[1]] if len(parts) > 1 else
                   [alias.name for alias in node.names])
    elif isinstance(node, ast.Import):
      found.update(alias.name.split(".")[1] for alias in node.names
                   if alias.name.startswith("st_keras."))
  return found


MODULES = sorted(_modules())


def test_every_module_has_a_layer():
  assert {top for top, _ in MODULES} <= set(RANK), (
      "a new module needs its place in LAYERS")


@pytest.mark.parametrize("top,path", MODULES,
                         ids=[os.path.relpath(p, PACKAGE) for _, p in MODULES])
def test_imports_go_down_the_layers(top, path):
  upward = sorted(m for m in _imported(path) if RANK[m] > RANK[top])
  assert not upward, f"{top} (layer {RANK[top]}) imports {upward}"


@pytest.mark.parametrize("top,path", MODULES,
                         ids=[os.path.relpath(p, PACKAGE) for _, p in MODULES])
def test_modules_stay_readable(top, path):
  del top
  with open(path, encoding="utf-8") as f:
    lines = sum(1 for _ in f)
  assert lines <= MAX_LINES, f"{path}: {lines} lines"


def test_the_import_scan_sees_upward_imports(tmp_path):
  """The scan finds every form of import the rules are about."""
  source = tmp_path / "m.py"
  source.write_text("from st_keras import train, models as m\n"
                    "from st_keras.layers import attention\n"
                    "import st_keras.ops.pure_tf\n"
                    "def f():\n  from st_keras.export import main\n"
                    "from . import sibling\n")
  assert _imported(str(source)) == {"train", "models", "layers", "ops",
                                    "export"}
