"""The layout is the architecture, and these are the rules docs/layout.md states:

1. Three layers, each importing only from the ones before it: the core (liera/*.py, generators/, layers/), the
   integrations (liera/integrations/), the applications (liera/apps/).
2. Inside the core, each file imports only files listed before it in CORE_ORDER (the order docs/layout.md lists).
3. No file imports a private name (one starting with "_") from another liera module.
4. The import graph of the library has no cycle.
Imports inside functions count as well (a lazy import is still a dependency); the package face's lazy export map
(liera/__init__.py) is the one exception to rule 1, since it is how liera.export_peft reaches an integration.
"""
import ast
import subprocess
import sys
from pathlib import Path

import liera

ROOT = Path(liera.__file__).parent
DOCS = ROOT.parent / "docs" / "layout.md"
# the core, in dependency order: a module may import only modules before it (a package counts as one entry)
CORE_ORDER = ["liera.version", "liera.group", "liera.sparsity", "liera.names", "liera.generators", "liera.config",
              "liera.layers", "liera.autograd", "liera.weight", "liera.interception", "liera.lifecycle", "liera.targeting", "liera.saved", "liera.io",
              "liera.model", "liera"]
LAYERS = {"core": 0, "integrations": 1, "apps": 2}


def module_name(path: Path) -> str:
    parts = ("liera",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("integrations", "apps") else "core"


def core_entry(module: str) -> str:
    """The CORE_ORDER entry a core module belongs to (liera.generators.lora -> liera.generators)."""
    return next(e for e in sorted(CORE_ORDER, key=len, reverse=True) if module == e or module.startswith(e + "."))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported liera module, imported names) for every import in a file, relative imports resolved, names of
    `from x import a` checked against the file system (a submodule is a module, else a name)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            if not module.startswith("liera"):
                continue
            names = []
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() or (ROOT.parent / sub.replace(".", "/")).is_dir():
                    out.append((sub, []))
                else:
                    names.append(alias.name)
            if names:
                out.append((module, names))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("liera")]
    return out


FILES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__main__.py")  # __main__ is `python -m liera`: an app
GRAPH = {module_name(p): imports(p) for p in FILES}


def test_no_upward_import_between_layers():
    bad = []
    for module, deps in GRAPH.items():
        for dep, _ in deps:
            if LAYERS[layer_of(dep)] > LAYERS[layer_of(module)] and module != "liera":
                bad.append(f"{module} -> {dep}")
    assert bad == []


def test_package_face_reaches_integrations_only_through_its_lazy_map():
    deps = {d for d, _ in GRAPH["liera"] if layer_of(d) != "core"}
    assert deps <= {"liera.integrations.hira"}, deps
    code = ("import sys, liera; liera.LieRAModel; "
            "print(sorted(m for m in sys.modules if m.startswith(('liera.apps', 'liera.integrations'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_core_files_import_only_files_listed_before_them():
    assert len([m for m in GRAPH if layer_of(m) == "core"]) > 20
    bad = []
    for module, deps in GRAPH.items():
        if layer_of(module) != "core" or module == "liera":
            continue
        mine = CORE_ORDER.index(core_entry(module))
        for dep, _ in deps:
            if layer_of(dep) == "core" and core_entry(dep) != core_entry(module) and CORE_ORDER.index(core_entry(dep)) > mine:
                bad.append(f"{module} -> {dep}")
    assert bad == []


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{module}: from {dep} import {name}" for module, deps in GRAPH.items() for dep, names in deps
           for name in names if name.startswith("_") and not name.startswith("__") and dep != module]
    assert bad == []


def test_the_import_graph_has_no_cycle():
    edges = {m: {d for d, _ in deps if d in GRAPH and d != m} for m, deps in GRAPH.items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a cycle
    edges = {m: {d for d in ds if not (d.startswith(m + ".") and m in ("liera",) + tuple(
        module_name(p) for p in FILES if p.name == "__init__.py"))} for m, ds in edges.items()}
    state: dict = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in edges:
        if start not in state:
            visit(start, [start])


def test_docs_list_the_core_in_this_order():
    text = DOCS.read_text()
    positions = [text.index(f"  {name.split('.')[-1] if name != 'liera' else '__init__'}") for name in CORE_ORDER]
    assert positions == sorted(positions), "docs/layout.md lists the core files in CORE_ORDER"


def test_public_imports_keep_working():
    from liera.integrations import LieRASaveCallback, LieRATrainer, export_peft  # noqa: F401

    assert liera.export_peft is export_peft and callable(liera.import_peft)
    assert callable(liera.find_targets) and callable(liera.LieRAModel.weight_changes)
