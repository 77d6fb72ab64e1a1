"""The package's layout: imports follow the pipeline's layers, and lazy imports say why.

docs/design.md#layers-and-imports: a module imports only modules of its own layer or a lower one,
so data flows one way (config -> train; plan -> store -> backends -> state -> launch -> collect ->
analysis -> views -> cli) and no module reaches upstream. Imports under TYPE_CHECKING count too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Lowest first; a module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("hptransfer", "hptransfer.errors", "hptransfer.files", "hptransfer.provenance"),
    ("hptransfer.config",),
    ("hptransfer.train",),
    ("hptransfer.sweeps", "hptransfer.sweeps.plan", "hptransfer.sweeps.store", "hptransfer.sweeps.tasks",
     "hptransfer.sweeps.runners", "hptransfer.sweeps.job"),
    ("hptransfer.sweeps.backends",),
    ("hptransfer.sweeps.state",),
    ("hptransfer.sweeps.launch", "hptransfer.sweeps.search"),
    ("hptransfer.sweeps.collect",),
    ("hptransfer.analysis",),
    ("hptransfer.views",),
    ("hptransfer.cli",),
]


def layer(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS and docs/design.md"
    return found


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported hptransfer module, line, inside a function)] for every .py under root/hptransfer."""
    files = sorted((root / "hptransfer").rglob("*.py"))
    known = {module_name(f, root) for f in files}
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for f in files:
        tree = ast.parse(f.read_text())
        in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                       for n in ast.walk(fn)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hptransfer":
                for alias in node.names:  # `from hptransfer.sweeps import plan` imports the module plan
                    sub = f"{node.module}.{alias.name}"
                    found.append((sub if sub in known else node.module, node.lineno, id(node) in in_function))
            elif isinstance(node, ast.Import):
                found += [(a.name, node.lineno, id(node) in in_function) for a in node.names
                          if a.name.split(".")[0] == "hptransfer"]
        out[module_name(f, root)] = found
    return out


def back_edges(root: Path) -> list[str]:
    """Every import of a module from a higher layer, as 'importer -> imported (line)'.

    One is allowed: the package top's lazy re-export of the library (`hptransfer.parameterize`, ...), an import
    inside its PEP 562 `__getattr__`. It is the public API's address, and lazy so `import hptransfer` stays light.
    """
    return [f"{mod} -> {target} (line {line})" for mod, found in imports(root).items()
            for target, line, lazy in found if layer(target) > layer(mod) and not (mod == "hptransfer" and lazy)]


def silent_lazy_imports(root: Path) -> list[str]:
    """Imports inside a function without a comment on their line (or the line above) saying why."""
    out = []
    for f in sorted((root / "hptransfer").rglob("*.py")):
        lines = f.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
            starts = {n.lineno for n in body}
            for node in body:
                first = node.lineno  # a run of imports shares one comment: find where the run starts
                while first - 1 in starts or (first > 1 and lines[first - 2].lstrip().startswith(("import ", "from "))):
                    first -= 1
                block = lines[first - 1: node.end_lineno]
                above = lines[first - 2].strip() if first > 1 else ""
                if not any("#" in ln for ln in block) and not above.startswith("#"):
                    out.append(f"{f.relative_to(root)}:{node.lineno}")
    return out


def test_no_module_reaches_upstream():
    assert back_edges(REPO) == []


def test_every_lazy_import_says_why():
    assert silent_lazy_imports(REPO) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_catch_a_back_edge_and_a_silent_lazy_import(tmp_path):
    root = write(tmp_path, {
        "hptransfer/__init__.py": "def __getattr__(name):\n    from hptransfer.train import param  # lazy\n",  # allowed
        "hptransfer/config/__init__.py": "",
        "hptransfer/config/schema.py": "from hptransfer.train.param import PRESETS\n",  # config reaching up
        "hptransfer/train/__init__.py": "",
        "hptransfer/train/param.py": "PRESETS = {}\n\n\ndef f():\n    import hptransfer.config.schema\n",
        "hptransfer/sweeps/__init__.py": "",
        "hptransfer/sweeps/plan.py": "from hptransfer.sweeps import state\n",  # plan reaching the observer
        "hptransfer/sweeps/state.py": "",
    })
    assert back_edges(root) == ["hptransfer.config.schema -> hptransfer.train.param (line 1)",
                                "hptransfer.sweeps.plan -> hptransfer.sweeps.state (line 1)"]
    assert silent_lazy_imports(root) == ["hptransfer/train/param.py:5"]


def test_every_module_has_a_layer():
    for mod in imports(REPO):
        layer(mod)
    with pytest.raises(AssertionError, match="in no layer"):
        layer("elsewhere.module")


def test_status_starts_without_torch_hydra_or_pandas():
    """`hpt status` is called in loops and by --watch: what it imports is measured by bench/startup.py,
    and this holds the line (a module-level import of the trainer or of Hydra would break it)."""
    probe = ("import sys; import hptransfer.cli, hptransfer.views, hptransfer.sweeps.state, hptransfer.sweeps.store; "
             "print(' '.join(m for m in ('torch', 'hydra', 'pandas', 'omegaconf', 'submitit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == []
