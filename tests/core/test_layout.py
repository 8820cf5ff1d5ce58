"""The layout is the architecture: the library core never imports an application or an integration."""
import ast
import subprocess
import sys
from pathlib import Path

import liera

ROOT = Path(liera.__file__).parent
# __main__.py is `python -m liera`, the command line's entry point (an application by definition)
CORE = [p for p in ROOT.rglob("*.py") if not {"apps", "integrations"} & set(p.relative_to(ROOT).parts)
        and p.name != "__main__.py"]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the liera modules a file imports at module level or in a class (relative imports
    resolved). Imports inside functions are the lazy forwarding of liera.export_peft: checked at run time
    by the next test."""
    package = ".".join(("liera",) + path.relative_to(ROOT).parent.parts)
    names = set()
    tree = ast.parse(path.read_text())
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("liera")}


def test_core_files_import_no_application_or_integration():
    assert len(CORE) > 20
    bad = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                            if m.startswith(("liera.apps", "liera.integrations")))
           for p in CORE}
    assert {k: v for k, v in bad.items() if v} == {}


def test_import_liera_loads_only_the_core():
    code = "import sys, liera; print(sorted(m for m in sys.modules if m.startswith(('liera.apps', 'liera.integrations'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_imports_keep_working():
    from liera.integrations import LieRASaveCallback, LieRATrainer, export_peft  # noqa: F401

    assert liera.export_peft is export_peft and callable(liera.import_peft)
