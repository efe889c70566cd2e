"""Imports point one way: storage ← preprocessing ← network ← engine ← flows ← cli (docs/design.md).

Every module of the four packages is parsed with `ast`; a module may import its own layer or a lower
one, never a higher one, and the module-level import graph has no cycle. A function-local import
of a project module is refused (it is how cycles hide) unless its line says `# heavy:` (a module
that pulls torch into a process that otherwise never needs it), and a function-local import of a
third-party library must say why on its line (heavy or optional dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "preprocessing", "xmask3d", "flows")

# The layers, bottom-up. A module's layer is the first prefix that matches its dotted name.
LAYERS = (
    ("storage",),
    ("preprocessing",),
    ("xmask3d.network",),
    ("xmask3d.engine",),
    ("flows",),
    ("xmask3d.cli", "xmask3d"),  # the command line (and the package's own __init__)
)
# cli.py defers whole commands' imports so `xmask3d --help` and input checks stay fast.
LOCAL_PROJECT_IMPORTS_ALLOWED = {"xmask3d.cli"}


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module}: in no layer; add its package to LAYERS and docs/design.md")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}


def imported_modules(node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """Project modules an import statement loads (``from pkg import mod`` counts as ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level or node.module is None:
            return []
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n in known]


def scan(path: Path, known: set[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str, bool]]]:
    """(top-level project imports, function-local imports as (line, module, is_project))."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: list[tuple[int, str]] = []
    local: list[tuple[int, str, bool]] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top += [(node.lineno, m) for m in imported_modules(node, known)]
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks and the like
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    top += [(sub.lineno, m) for m in imported_modules(sub, known)]
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                project = imported_modules(sub, known)
                name = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                local += [(sub.lineno, m, True) for m in project] or [(sub.lineno, name or "", False)]
    return top, local


def upward_imports(root: Path = ROOT) -> list[str]:
    modules = project_modules(root)
    known = set(modules)
    problems = []
    for name, path in modules.items():
        top, local = scan(path, known)
        for line, target in top + [(line, m) for line, m, is_project in local if is_project]:
            if layer_of(target) > layer_of(name):
                problems.append(f"{path.relative_to(root)}:{line}: {name} imports {target} (a higher layer)")
    return problems


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    modules = project_modules(root)
    known = set(modules)
    graph = {name: sorted({m for _, m in scan(path, known)[0] if m != name})
             for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            # `from pkg import mod` also imports pkg/__init__; a package importing its own child is fine
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_module_level_imports_have_no_cycle():
    assert import_cycles() == []


def test_function_local_imports_are_only_commented_third_party_ones():
    modules = project_modules()
    known = set(modules)
    problems = []
    for name, path in modules.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for line, target, is_project in scan(path, known)[1]:
            if is_project and name not in LOCAL_PROJECT_IMPORTS_ALLOWED and "# heavy:" not in lines[line - 1]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: function-local import of {target}")
            elif not is_project and "#" not in lines[line - 1]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: local import of {target} without a "
                                "comment saying why it is deferred")
    assert problems == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    return tmp_path


def test_a_planted_upward_import_is_reported(tmp_path):
    root = _plant(tmp_path, {
        "storage/dataset.py": "from xmask3d.engine.train import train\n",
        "xmask3d/engine/train.py": "from storage.dataset import Dataset\n",
        "xmask3d/network/model.py": "def build():\n    from xmask3d.engine import train\n",
    })
    problems = upward_imports(root)
    assert any("storage.dataset imports xmask3d.engine.train" in p for p in problems)
    assert any("xmask3d.network.model imports xmask3d.engine.train" in p for p in problems)
    assert not any(p.startswith("xmask3d/engine/train.py") for p in problems)


def test_a_planted_cycle_is_reported(tmp_path):
    root = _plant(tmp_path, {
        "xmask3d/engine/evaluate.py": "from xmask3d.engine.panels import render\n",
        "xmask3d/engine/panels.py": "from xmask3d.engine.evaluate import predict\n",
    })
    assert import_cycles(root) == [["xmask3d.engine.evaluate", "xmask3d.engine.panels",
                                    "xmask3d.engine.evaluate"]]


@pytest.mark.parametrize("module", ["storage.store", "preprocessing.pipeline", "xmask3d.network.model",
                                    "xmask3d.engine.train", "flows.preprocess"])
def test_layer_of_known_modules(module):
    expected = {"storage.store": 0, "preprocessing.pipeline": 1, "xmask3d.network.model": 2,
                "xmask3d.engine.train": 3, "flows.preprocess": 4}
    assert layer_of(module) == expected[module]


def test_the_training_step_imports_no_tracking_or_storage_stack():
    """The step benchmark's imports (the step, the model, the synthetic batch) load without MLflow,
    Zarr, Prefect or Dask, which a lent GPU machine does not have installed."""
    probe = ("import sys; import xmask3d.engine.step, xmask3d.network.model, xmask3d.network.losses, "
             "tests.model.synthetic_batch; print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert "torch" in loaded and "spconv" in loaded
    assert not loaded & {"mlflow", "zarr", "numcodecs", "prefect", "dask", "distributed", "obstore"}, loaded
