"""The layer map in docs/architecture.md is true: every module of `muse/` sits in exactly one layer,
imports only from its own layer or the ones below (function-local imports included), and no two
modules import each other, directly or round a cycle.

The table in the document is what this test reads, so the map and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "muse"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def read_layers() -> list[tuple[str, list[str]]]:
    """[(layer name, [module patterns])] bottom-up, from the rows `| n | name | `muse.x` `muse.y.*` | … |`."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|([^|]*)\|", line)
        if m:
            rows.append((int(m.group(1)), m.group(2), re.findall(r"`(muse[\w.*]*)`", m.group(3))))
    assert [n for n, _, _ in rows] == list(range(1, len(rows) + 1)), "layers are numbered 1, 2, 3, … bottom-up"
    return [(name, patterns) for _, name, patterns in rows]


def layer_of() -> dict[str, int]:
    layers, where, unplaced, twice = read_layers(), {}, [], []
    for mod in MODULES:
        hits = {i for i, (_, pats) in enumerate(layers) for p in pats
                if mod == p or fnmatchcase(mod, p) or (p.endswith(".*") and mod == p[:-2])}
        if not hits:
            unplaced.append(mod)
        elif len(hits) > 1:
            twice.append(mod)
        else:
            where[mod] = hits.pop()
    assert not unplaced, f"modules missing from the layer table in {DOC.name}: {unplaced}"
    assert not twice, f"modules in more than one layer: {twice}"
    return where


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(mod: str) -> list[tuple[str, int, str]]:
    """(imported muse module, line, name) for every import in `mod`, function-local ones included,
    `if TYPE_CHECKING:` blocks excluded. `from muse.x import y` counts as muse.x.y when y is a module."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for t in ast.walk(tree) if _type_checking(t) for n in ast.walk(t)}
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [(a.name, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [(f"{base}.{a.name}", a.name) for a in node.names]
        else:
            continue
        for target, name in targets:
            if target.split(".")[0] != "muse":
                continue
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target != mod:
                found.append((target, node.lineno, name))
    return found


GRAPH = {mod: imports(mod) for mod in MODULES}


def test_every_module_is_on_the_map():
    layer_of()  # asserts inside


def test_imports_only_go_down_or_sideways():
    """(`muse.__version__` is the package's own metadata, readable from any layer.)"""
    where, layers = layer_of(), read_layers()
    upward = [f"{mod}:{line} imports {target} ({layers[where[target]][0]}, above {layers[where[mod]][0]})"
              for mod, edges in GRAPH.items() for target, line, name in edges
              if where[target] > where[mod] and (target, name) != ("muse", "__version__")]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_only_the_interfaces_use_the_muse_facade():
    """`import muse` / `from muse import load` is for users and the CLI/server; the library imports the
    module that defines a name (`from muse.api import load`), so the map shows the real dependency."""
    where, layers = layer_of(), read_layers()
    top = len(layers) - 1
    bad = [f"{mod}:{line} uses muse.{name}" for mod, edges in GRAPH.items() if where[mod] < top
           for target, line, name in edges if target == "muse" and name != "__version__"]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w, _, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for mod in MODULES:
        if mod not in index:
            visit(mod)
    assert not cycles, f"import cycles: {cycles}"


def test_model_config_stands_alone():
    """ModelConfig is read by every layer; it imports nothing from Muse, so it can never close a cycle."""
    assert [t for t, _, _ in GRAPH["muse.config"]] == []


@pytest.mark.parametrize("bad, why", [
    ({"muse.model": [("muse.api", 1, "Model")]}, "upward"),
    ({"muse.errors": [("muse.paths", 1, "x")], "muse.paths": [("muse.errors", 1, "y")]}, "cycles"),
])
def test_the_checks_catch_a_violation(monkeypatch, bad, why):
    """The checks above would fail on an upward import or a cycle (guards against a test that passes vacuously)."""
    for mod, edges in bad.items():
        monkeypatch.setitem(GRAPH, mod, GRAPH[mod] + edges)
    check = test_imports_only_go_down_or_sideways if why == "upward" else test_no_import_cycles
    with pytest.raises(AssertionError, match=why):
        check()


# -- one home for each sampling range ------------------------------------------------------------

def _schema_bounds(model_cls, field: str) -> dict:
    """The numeric bounds pydantic enforces on `field` (Optional[...] unwrapped)."""
    schema = model_cls.model_json_schema()["properties"][field]
    for option in schema.get("anyOf", [schema]):
        if option.get("type") in ("integer", "number"):
            return {k: option[k] for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum") if k in option}
    raise AssertionError(f"{model_cls.__name__}.{field} has no numeric schema")


def _range_bounds(rng) -> dict:
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    return {names[k]: v for k, v in rng.bounds().items()}


def test_server_sampling_ranges_come_from_sampling_params():
    """Every sampling option a server route takes is bounded exactly as SamplingParams checks it."""
    from muse.sampling import RANGES
    from muse.server import schemas
    from muse.server.apps import Sampling

    # (/v1/completions' `logprobs` is OpenAI's narrower 0..5, checked in its own schema.)
    server_name = {"max_new_tokens": ("max_tokens", "max_completion_tokens", "max_output_tokens"),
                   "logprobs": ("top_logprobs",)}
    checked = 0
    for model_cls in (schemas.ChatCompletionRequest, schemas.CompletionRequest, schemas.ResponsesRequest, Sampling):
        fields = model_cls.model_fields
        for name, rng in RANGES.items():
            for field in server_name.get(name, (name,)):
                if field in fields and (model_cls, field) != (schemas.ResponsesRequest, "top_logprobs"):  # a 400
                    assert _schema_bounds(model_cls, field) == _range_bounds(rng), f"{model_cls.__name__}.{field}"
                    checked += 1
    assert checked >= 20  # the chat, completion, responses and app routes all take sampling options


def test_sampling_params_enforces_each_range_at_its_edges():
    from muse.sampling import RANGES, SamplingParams

    for name, rng in RANGES.items():
        if rng.hi is not None and rng.hi < 2**53:
            bad = rng.hi + (1 if rng.integer else 0.5) if not rng.hi_open else rng.hi
            with pytest.raises(ValueError, match=name):
                SamplingParams(**{name: bad})
            if not rng.hi_open:
                SamplingParams(**{name: rng.hi})
        bad_low = rng.lo if rng.lo_open else rng.lo - 1
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: bad_low})
