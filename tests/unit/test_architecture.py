"""The package's folders are its architecture, and its imports keep to it.

Every import statement of orchestrator/ (module level and inside functions alike) is read
with ast: a pipeline layer imports only itself and the layers before it, nothing but the
CLI reaches the sandbox, nothing reaches the test doubles, and the scripts that run on hosts
import only the standard library.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "orchestrator"

# The one-way data path, first to last (README "Layout"). `errors` is shared by all.
LAYERS = ["errors", "config", "knowledge", "facts", "plan", "run", "mirror", "verify",
          "report", "workflows", "cli"]
# Beside the pipeline: built on it, used only by the CLI (`--hosts sandbox`).
SANDBOX = "sandbox"
# Copied to hosts and run by their own python3: the standard library only.
HOST_SCRIPTS = {"orchestrator.verify.hostcollect": set(),
                "orchestrator.verify.deviceallow": set(),
                "orchestrator.verify.gpu_smoke": {"orchestrator.verify.deviceallow"}}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0]
                node_module = f"{base}.{node.module}" if node.module else base
            else:
                node_module = node.module or ""
            names.add(node_module)
            # `from orchestrator.verify import bench` imports the module verify.bench.
            names.update(f"{node_module}.{alias.name}" for alias in node.names)
    return names


MODULES = _modules()
GRAPH = {name: {i for i in _imports(path, name) if i in MODULES or i.startswith("doubles")}
         for name, path in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_belongs_to_a_layer_or_the_sandbox() -> None:
    stray = [m for m in MODULES if m != "orchestrator" and _part(m) not in [*LAYERS, SANDBOX]]
    assert not stray, f"modules outside the layers of README's Layout: {stray}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m) in LAYERS))
def test_pipeline_imports_point_downward_only(module: str) -> None:
    rank = LAYERS.index(_part(module))
    upward = sorted(i for i in GRAPH[module]
                    if i != "orchestrator" and _part(i) in LAYERS
                    and LAYERS.index(_part(i)) > rank)
    assert not upward, f"{module} imports later layers: {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_cli_reaches_the_sandbox_and_nothing_the_test_doubles(module: str) -> None:
    imported = GRAPH[module]
    assert not [i for i in imported if i.startswith("doubles")]
    if module != "orchestrator.cli" and _part(module) != SANDBOX:
        assert not [i for i in imported if _part(i) == SANDBOX], module


@pytest.mark.parametrize(("module", "allowed"), sorted(HOST_SCRIPTS.items()))
def test_host_side_scripts_need_only_the_standard_library(module: str,
                                                          allowed: set[str]) -> None:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            top.add(node.module.split(".")[0])
    # Imports of the host's env (torch, triton) run in child programs, as text: not here.
    assert top - set(sys.stdlib_module_names) - {"orchestrator", "deviceallow"} == set()
    assert {i for i in GRAPH[module] if i in MODULES} <= allowed | {"orchestrator",
                                                                    "orchestrator.verify"}


def test_the_readme_layout_names_every_folder_of_the_package() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    folders = sorted(p.name for p in PACKAGE.iterdir()
                     if p.is_dir() and (p / "__init__.py").exists())
    missing = [f for f in folders if f"{f}/" not in layout]
    assert not missing, f"README Layout misses {missing}"
