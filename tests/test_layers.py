"""The package's modules form one-way layers: no import cycle (imports inside functions count
too), and no module or test reaches into another module's `_private` names."""

import ast
import glob
import os

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "llmjax")
# The standard library's documented functions whose names start with "_": public, not private.
DOCUMENTED = {"os._exit"}


def _imports(path: str) -> tuple[set[str], list[str]]:
    """(llmjax modules imported anywhere in the file, uses of other modules' private names)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    modules, aliases, private = set(), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("llmjax."):
                    modules.add(a.name.split(".")[1])
                    aliases[a.asname or a.name] = a.name.split(".")[1]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmjax"):
            parts = node.module.split(".")
            for a in node.names:
                if len(parts) == 1:  # from llmjax import data
                    modules.add(a.name)
                    aliases[a.asname or a.name] = a.name
                else:
                    modules.add(parts[1])
                    if a.name.startswith("_"):
                        private.append(f"from {node.module} import {a.name}")
    private_name = lambda name: name.startswith("_") and not name.startswith("__")
    for node in ast.walk(tree):
        # obj._x on anything but self or cls: a module's, another object's (tok._enc).
        if (
            isinstance(node, ast.Attribute)
            and private_name(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            and ast.unparse(node) not in DOCUMENTED
        ):
            private.append(f"{ast.unparse(node)} (line {node.lineno})")
        # getattr(obj, "_x") spells the same reach-through as a string.
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private_name(node.args[1].value)
        ):
            private.append(f"{ast.unparse(node)} (line {node.lineno})")
    return modules, private


def _modules() -> dict[str, str]:
    """Module name (dotted below llmjax/) -> path, for every llmjax/**/*.py."""
    paths = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    rel = lambda p: os.path.relpath(p, PACKAGE)[: -len(".py")].replace(os.sep, ".")
    return {rel(p).removesuffix(".__init__"): p for p in paths}


def test_no_import_cycles():
    graph = {}
    for name, path in _modules().items():
        top = name.split(".")[0]
        graph[top] = graph.get(top, set()) | (_imports(path)[0] - {top, "__init__"})
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(stack + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # The readers load workdirs through checkpoint.py; none of them imports the trainer.
    for reader in ("sample", "evaluate", "convert", "chat", "checkpoint"):
        assert "train" not in graph[reader], f"{reader} imports train"


def test_no_private_names_across_modules():
    files = list(_modules().values()) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    files += glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
    found = {os.path.relpath(p, ROOT): _imports(p)[1] for p in files}
    assert {p: uses for p, uses in found.items() if uses} == {}
