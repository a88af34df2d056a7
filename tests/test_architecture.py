"""The layering, checked on the source: the core reaches plugins only through registries, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Where each package's modules live in the source tree (the install maps the plugin folders into kubrpc).
PACKAGES = {"kubrpc": ROOT / "kubrpc", "kubrpc.transports": ROOT / "transports", "kubrpc.balancers": ROOT / "balancers"}
PLUGIN_PACKAGES = ("kubrpc.transports", "kubrpc.balancers")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> tuple[set[str], set[str]]:
    """The kubrpc modules that `name` imports: (when it runs, anywhere in it; only under TYPE_CHECKING)."""
    tree = ast.parse(MODULES[name].read_text())
    base = name if is_package(name) else name.rpartition(".")[0]
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    runtime: set[str] = set()
    typing: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` imports pkg.mod (and runs pkg/__init__, which is pkg's own business);
            # `from mod import name` imports mod.
            subs = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES]
            targets = subs if subs and len(subs) == len(node.names) else [module, *subs]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                (typing if id(node) in typing_only else runtime).add(target)
    return runtime, typing - runtime


EDGES = {name: imports(name) for name in MODULES}
#: What each module imports when it runs (at import time or later, in a function).
GRAPH = {name: runtime for name, (runtime, _) in EDGES.items()}
#: Everything each module names, TYPE_CHECKING imports included.
NAMES = {name: runtime | typing for name, (runtime, typing) in EDGES.items()}


def in_plugin(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PLUGIN_PACKAGES)


def test_the_core_imports_no_plugin_module() -> None:
    # Core modules reach transports and balancers only through their registries (the packages' __init__).
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in NAMES.items()
        if not in_plugin(name)
        for target in targets
        if in_plugin(target) and target not in PLUGIN_PACKAGES
    )
    assert not bad, "\n".join(bad)


def test_plugins_never_import_the_server_or_the_client() -> None:
    # Not even for types: a transport sees the server through kubrpc.interfaces.ServerCore.
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in NAMES.items()
        if in_plugin(name)
        for target in targets
        if target in ("kubrpc.server", "kubrpc.client", "kubrpc")
    )
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    # Imports that run (at import time or in a function); TYPE_CHECKING imports are for types only.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_imports() -> None:
    # Guards the walker itself: known edges of each kind are found.
    assert "kubrpc.interfaces" in GRAPH["kubrpc.server"]
    assert "kubrpc._limits" in GRAPH["kubrpc.transports.tcp"]
    assert "kubrpc.interfaces" in NAMES["kubrpc.transports.tcp"] - GRAPH["kubrpc.transports.tcp"]
    assert "kubrpc.transports" in GRAPH["kubrpc.server"]  # the registry, reached in a function
