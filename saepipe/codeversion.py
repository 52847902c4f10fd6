"""Code fingerprints, so that a change to saepipe's own code reruns the stages it affects.

Snakemake tracks inputs, params and the rule's script, but not library code. Every rule
therefore passes `code=fingerprint("saepipe.<stage module>")` as a param: a hash of the
source of that module and of every saepipe module it imports, transitively (found by
parsing imports, not by importing). Edit `saepipe/plots/frontier.py` and only the plot
rule reruns; edit `saepipe/saes/topk.py` and every SAE is retrained, then re-evaluated.
The hash ignores nothing (comments included): a deliberate, simple rule. To skip reruns
after a cosmetic edit, run `snakemake --touch` on the affected outputs.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PACKAGE = PACKAGE_ROOT.name


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(module: str, path: Path) -> set[str]:
    """saepipe modules imported by `module` (absolute and relative imports)."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # a module import also runs every parent package's __init__
    with_parents: set[str] = set()
    for name in found:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in with_parents if m.split(".")[0] == PACKAGE}


def module_closure(module: str) -> list[Path]:
    """Source files of `module` and every saepipe module it imports, sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imported_modules(name, path) - seen.keys())
    return sorted(set(seen.values()))


@cache
def fingerprint(module: str) -> str:
    """Short hash of the code a stage runs (see the module docstring)."""
    if _module_file(module) is None:
        raise ValueError(f"no module {module!r} inside {PACKAGE_ROOT}")
    digest = hashlib.sha256()
    for path in module_closure(module):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
