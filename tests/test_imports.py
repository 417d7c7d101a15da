"""The import structure of ``lowrank``, read statically (AST of every module, imports inside
functions included): no cycles, no test oracles, no function-level ``lowrank`` imports, and
every edge points down the declared layers (``LAYERS``).

Nothing here imports ``lowrank``: the files are parsed, so a cycle that Python tolerates at
run time (an import inside a function) is found as well.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lowrank"

# Bottom to top: a module may import modules of its own layer or of the layers before it.
# A name covers the module and everything under it (``lowrank.adapters`` covers
# ``lowrank.adapters.lora``); the longest name that matches decides. The package itself
# (``lowrank``, its __init__) is matched exactly. A new module must be placed here (some
# names are placed ahead of the modules, e.g. ``lowrank.formats.hf_model``, ``lowrank.tasks``).
LAYERS = [
    ["lowrank._version", "lowrank.backend", "lowrank.nn.validate"],   # where arrays live
    ["lowrank.files.storage", "lowrank.files.untrusted", "lowrank.files.schema", "lowrank.files.json_arrays",
     "lowrank.text.corpus", "lowrank.text.tokenizer", "lowrank.files.locate",
     "lowrank.text.datasets", "lowrank.files.gguf_file", "lowrank.text.tokenizer_files",
     "lowrank.text.chat_template"],                                      # host-side files and text
    ["lowrank.nn.module", "lowrank.ops", "lowrank.nn.decompose", "lowrank.nn.optim",
     "lowrank.nn.hooks"],
    ["lowrank.nn.layers", "lowrank.models"],
    ["lowrank.adapters"],
    ["lowrank.parallel"],                                      # data parallel only
    ["lowrank.training.trainer", "lowrank.training.update_check", "lowrank.quant"],   # quant: NF4 frozen bases
    ["lowrank.formats.adapter_dir", "lowrank.formats.checkpoint", "lowrank.formats.hf_model", "lowrank.formats.peft_names",
     "lowrank.formats.peft_lycoris", "lowrank.formats.peft_dir", "lowrank.formats.gguf_model"],            # PEFT-format adapter dirs
    ["lowrank.app.run_dir", "lowrank.app.workflows", "lowrank.tasks", "lowrank.classify"],
    ["lowrank.multi"],                                         # many adapters, one base
    ["lowrank.app.cli", "lowrank.app.cli_parser", "lowrank.app.demo", "lowrank.app.bench", "lowrank",
     "lowrank.app.sentiment_demo", "lowrank.app.classify_cli", "lowrank.app.chat_cli"],   # front ends
]

# Test oracles and the frameworks they use: the library never imports them.
FORBIDDEN = {"reference", "tests", "torch", "peft", "transformers"}

# Violations fixed on other branches of this round (remove an entry once it is merged; the
# test fails while an entry is listed that no longer occurs, so none outlives its fix).
PENDING: set[str] = set()   # violations accepted while their fix is on its way (none now)


@dataclass
class Import:
    """One import statement of a module: the lowrank modules it loads (``targets``), the
    top-level names it imports (``tops``: ``lowrank``, ``numpy``, ...), where, and how."""

    source: str
    path: Path
    node: ast.stmt
    targets: list
    tops: set
    in_function: bool
    relative: bool

    def where(self) -> str:
        parts = self.path.parts
        inside = parts[len(parts) - 1 - parts[::-1].index("lowrank"):]   # lowrank/...
        return f"{'/'.join(inside)}:{self.node.lineno}"

    def text(self) -> str:
        if isinstance(self.node, ast.Import):
            return "import " + ", ".join(a.name for a in self.node.names)
        return (f"from {'.' * self.node.level}{self.node.module or ''} import "
                + ", ".join(a.name for a in self.node.names))


def module_names(root=ROOT) -> dict:
    """Dotted module name -> file, for every module under ``root`` (the lowrank/ folder)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _walk(tree, in_function=False):
    """Import nodes with whether they sit inside a function body."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
        yield from _walk(node, inside)


def _loaded(name: str, modules: dict) -> list:
    """The lowrank modules that importing ``name`` runs: it and every package above it."""
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules]


def imports_of(source: str, modules: dict) -> list:
    path = modules[source]
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found = []
    for node, in_function in _walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            tops, relative = {n.split(".")[0] for n in names}, False
        else:
            relative = node.level > 0
            if relative:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            tops = {stem.split(".")[0]}
            # ``from package import name``: name is a submodule or an attribute of package
            names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem
                     for a in node.names]
        targets = []
        for name in names:
            for m in _loaded(name, modules):
                # a module's own packages are already loading when its body runs: only a
                # name the statement itself gives (``from . import x``) counts for them
                implicit = m != name and source.startswith(m + ".")
                if m not in targets and not implicit and m != source:
                    targets.append(m)
        found.append(Import(source, path, node, targets, tops, in_function, relative))
    return found


def import_graph(root=ROOT):
    modules = module_names(root)
    return modules, {m: imports_of(m, modules) for m in modules}


def layer_of(module: str):
    best, layer = None, None
    for i, names in enumerate(LAYERS):
        for name in names:
            covers = module == name if name == "lowrank" else \
                module == name or module.startswith(name + ".")
            if covers and (best is None or len(name) > len(best)):
                best, layer = name, i
    return layer


def cycles(graph) -> list:
    """``(cycle, component)``: one shortest cycle through each strongly connected component of
    the import graph (the modules that import each other, directly or not)."""
    edges = {m: sorted({t for imp in imps for t in imp.targets}) for m, imps in graph.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):   # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        # start at the lowest member: its edge up is the likely mistake
        start = min(component, key=lambda m: (layer_of(m) is None, layer_of(m) or 0, m))
        members = set(component)
        paths, frontier = {start: [start]}, [start]
        while frontier:   # breadth-first back to start, inside the component
            nxt = []
            for v in frontier:
                for w in edges[v]:
                    if w == start:
                        found.append((paths[v] + [start], component))
                        nxt = []
                        break
                    if w in members and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                else:
                    continue
                break
            frontier = nxt
    return found


def violations(graph) -> list:
    found = []
    for cycle, component in cycles(graph):
        others = sorted(set(component) - set(cycle))
        found.append("cycle: " + " -> ".join(cycle)
                     + (f" (tangled with it: {', '.join(others)})" if others else ""))
    for source, imps in sorted(graph.items()):
        for imp in imps:
            if imp.tops & FORBIDDEN:
                found.append(f"forbidden import: {imp.where()} {imp.text()} "
                             "(test oracles and frameworks stay out of the library)")
            if imp.in_function and (imp.relative or "lowrank" in imp.tops):
                found.append(f"function-level import: {imp.where()} {imp.text()}")
    return found


def layering(graph) -> list:
    found = []
    for source, imps in sorted(graph.items()):
        mine = layer_of(source)
        if mine is None:
            found.append(f"no layer: {source} is not in LAYERS (tests/test_imports.py)")
            continue
        for imp in imps:
            for target in imp.targets:
                theirs = layer_of(target)
                if theirs is not None and theirs > mine:
                    found.append(f"upward import: {source} (layer {mine}) -> {target} "
                                 f"(layer {theirs}) at {imp.where()} {imp.text()}")
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()[1]


def _check(found):
    pending = {v for v in found if v in PENDING}
    new = [v for v in found if v not in PENDING]
    assert not new, "\n".join(new)
    return pending


def test_no_cycles_no_oracles_no_function_level_imports(graph):
    found = violations(graph)
    pending = _check(found)
    stale = sorted(p for p in PENDING if p not in pending)
    assert not stale, "fixed, remove from PENDING:\n" + "\n".join(stale)


def test_every_import_points_down_the_layers(graph):
    _check(layering(graph))


def test_the_checker_sees_what_it_is_meant_to():
    """The checker itself: a cycle, an upward edge, an oracle and a lazy import are caught."""
    modules, graph = import_graph()
    graph = {m: list(imps) for m, imps in graph.items()}
    node = ast.parse("def f():\n    import os, reference\n").body[0].body[0]
    src = "lowrank.backend"
    graph[src].append(Import(src, modules[src], node, ["lowrank.app.cli"], {"lowrank"}, True, True))
    graph["lowrank.app.cli"].append(Import("lowrank.app.cli", modules["lowrank.app.cli"], node,
                                       ["lowrank.backend"], {"os", "reference"}, False, False))
    found = violations(graph) + layering(graph)
    assert any(v.startswith("cycle:") and "lowrank.backend" in v and "lowrank.app.cli" in v
               for v in found), found
    assert any(v.startswith("upward import: lowrank.backend (layer 0) -> lowrank.app.cli")
               for v in found), found
    assert any(v.startswith("forbidden import: lowrank/app/cli.py") for v in found), found
    assert any(v.startswith("function-level import: lowrank/backend/__init__.py:2")
               for v in found), found
    assert layer_of("lowrank.adapters.lora") == layer_of("lowrank.adapters")
    assert layer_of("lowrank") == len(LAYERS) - 1 and layer_of("lowrank.nowhere") is None


def test_the_checker_reads_relative_and_lazy_imports(tmp_path):
    """On a planted package: ``from .sub import b`` loads lowrank.sub and lowrank.sub.b; an
    import inside a function is an edge like any other (it closes the cycle) and is reported
    with its place."""
    files = {"__init__.py": "from . import a\n", "a.py": "from .sub import b\nx = 1\n",
             "sub/__init__.py": "", "sub/b.py": "import os\n\n\ndef f():\n"
                                                "    from ..a import x\n    return x\n"}
    for name, text in files.items():
        (tmp_path / "lowrank" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lowrank" / name).write_text(text)
    modules, graph = import_graph(tmp_path / "lowrank")
    assert sorted(modules) == ["lowrank", "lowrank.a", "lowrank.sub", "lowrank.sub.b"]
    assert graph["lowrank.a"][0].targets == ["lowrank.sub", "lowrank.sub.b"]
    assert graph["lowrank"][0].targets == ["lowrank.a"]
    assert violations(graph) == [
        "cycle: lowrank.a -> lowrank.sub.b -> lowrank.a",
        "function-level import: lowrank/sub/b.py:5 from ..a import x"]


def test_only_lowrank_is_installed():
    """pyproject installs ``lowrank`` alone: ``reference`` (the test oracles, a generic name)
    and the tests are imported from the checkout (pytest puts the repository root first)."""
    import fnmatch
    import tomllib
    project = ROOT.parent / "pyproject.toml"
    include = tomllib.loads(project.read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"]
    packages = [p.parent.name for p in ROOT.parent.glob("*/__init__.py")]
    installed = sorted(p for p in packages if any(fnmatch.fnmatch(p, pat) for pat in include))
    assert installed == ["lowrank"], installed
    assert {"reference", "tests"} <= set(packages)   # the checkout does hold them
