"""Source hygiene of the library packages: no import cycles, no oversized files, no ``assert`` in library code.

The checks read the source with :mod:`ast`; nothing is imported.

* **Import cycles.** Only module-level imports count (top-level statements,
  including those under ``try``/``if``/``with`` and in class bodies, but not
  inside functions nor under ``if TYPE_CHECKING:``), as only those run when a
  module is imported. ``import a.b`` imports ``a.b``; ``from a import b``
  imports ``a`` and, when ``a.b`` is a module, ``a.b`` too; relative imports
  are resolved against the importing module's package. A package's
  ``__init__`` is the module named after the package. The strongly connected
  components of that graph must be exactly :data:`KNOWN_CYCLES`.
* **File size.** No ``.py`` file in the packages exceeds :data:`MAX_LINES` lines.
* **No ``assert``.** Library code states its invariants with explicit errors
  (subclasses of :class:`autopatch.errors.AutopatchError`), which ``python -O``
  does not strip; allowed exceptions are listed in :data:`KNOWN_ASSERTS`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("autopatch", "classifiers", "eval", "server")
MAX_LINES = 500

# Strongly connected components of the module-level import graph (each a sorted tuple of module names).
# Empty: a new cycle fails the test; fix it rather than add it here.
KNOWN_CYCLES: frozenset[tuple[str, ...]] = frozenset()

# ``assert`` statements tolerated in library code, as "path:line" (relative to the repository root).
KNOWN_ASSERTS: frozenset[str] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[_module_name(path)] = path
    return files


FILES = _source_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not in functions, not under TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.ClassDef, ast.For, ast.AsyncFor, ast.While)):
            yield from _module_level_imports(node.body)
            yield from _module_level_imports(getattr(node, "orelse", []))


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if FILES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph() -> dict[str, set[str]]:
    """``{module: {modules of the four packages it imports at module level}}``."""
    graph: dict[str, set[str]] = {}
    for module, path in FILES.items():
        targets: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path)).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            else:
                base = _resolve_from(module, node)
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {t for t in targets if t in FILES and t != module}  # `from . import x` in an __init__ names itself
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Tarjan's algorithm; keeps components of two or more modules, and single modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in graph[v]:
                out.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _a_cycle(graph: dict[str, set[str]], component: tuple[str, ...]) -> list[str]:
    """One concrete import cycle through the first module of ``component``, for the failure message."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return list(component)


def test_the_graph_sees_the_packages() -> None:
    graph = import_graph()
    assert {"autopatch", "autopatch.errors", "eval.datasets", "eval.twohop", "classifiers.gate"} <= set(graph)
    assert "autopatch.errors" in graph["classifiers.gate"]
    assert "eval.datasets" in graph["eval.twohop"]  # the dataset registers itself (eval.dataset_registry)
    assert "autopatch.explain" not in graph["autopatch.patcher"]  # imported inside AutoPatcher.explain only


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = strongly_connected(graph)
    new = [" -> ".join(_a_cycle(graph, c)) for c in found if c not in KNOWN_CYCLES]
    assert not new, "module-level import cycles: " + "; ".join(new)
    gone = sorted(KNOWN_CYCLES - set(found))
    assert not gone, f"these cycles are fixed: remove them from KNOWN_CYCLES: {gone}"


def test_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [("a", "b", "c"), ("e",)]
    assert _a_cycle(graph, ("a", "b", "c")) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("module", sorted(FILES))
def test_file_is_not_too_long(module: str) -> None:
    path = FILES[module]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it by concern"


def test_no_assert_in_library_code() -> None:
    found = set()
    for path in FILES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Assert):
                found.add(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    new = sorted(found - KNOWN_ASSERTS)
    assert not new, f"assert statements in library code (raise an AutopatchError subclass instead): {new}"


def test_record_types_are_defined_once() -> None:
    """``eval.datasets`` re-exports the record types of ``eval.records``; a second definition would split isinstance."""
    from eval import datasets, records, twohop

    for name in ("QARecord", "DecompStep", "DatasetError"):
        assert getattr(datasets, name) is getattr(records, name)
    assert twohop.generate_twohop("test")[0].__class__ is datasets.QARecord


# --------------------------------------------------------------------------- explicit errors instead of asserts


def test_gate_fit_refuses_arrays_that_do_not_reproduce_sklearn(monkeypatch) -> None:
    import numpy as np

    from autopatch.errors import GateFileError
    from autopatch.profile import PatchProfile
    from autopatch.prompts import PromptFormat
    from classifiers.features import FeatureSpec
    from classifiers.gate import PatchGate
    from tests.tiny_models import tiny_model_for_bytes

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 12))
    y = (X[:, 0] > 0).astype(int)
    kwargs = dict(spec=FeatureSpec(layers=(1,), positions=("last",)), n_components=4,
                  profile=PatchProfile(source_layer=1, target_layer=1, prompt_format=PromptFormat(demonstrations=())),
                  model=tiny_model_for_bytes("llama"))
    PatchGate.fit(X, y, None, **kwargs)  # the real NumPy path agrees
    monkeypatch.setattr(PatchGate, "scores", lambda self, X: np.full(len(np.atleast_2d(X)), 0.5))
    with pytest.raises(GateFileError, match="do not reproduce scikit-learn"):
        PatchGate.fit(X, y, None, **kwargs)


def test_feature_spec_and_labels_raise_config_errors() -> None:
    from autopatch.errors import ConfigError
    from classifiers.features import FeatureSpec
    from classifiers.labels import gate_labels

    with pytest.raises(ConfigError, match="Unknown gate feature positions"):
        FeatureSpec(positions=("span_end", "middle"))
    with pytest.raises(ConfigError, match="needs features"):
        FeatureSpec(use_states=False, use_scalars=False)
    assert FeatureSpec(layers=(), use_states=False).layers == ()
    table = {"vanilla": {"a": {"em": 1}}, "cfg": {"a": {"contains": 1.0}}}
    with pytest.raises(ConfigError, match="no numeric 'em'"):
        gate_labels(table, "cfg")
    assert gate_labels({"vanilla": {"a": {"em": True}}, "cfg": {"a": {"em": 0}}}, "cfg")["a"].hurts


def test_identity_prompt_without_placeholder_is_a_patch_error() -> None:
    from autopatch.errors import PatchError
    from autopatch.patchscope import patched_prompt
    from tests.tiny_models import byte_tokenizer

    tok = byte_tokenizer()
    assert patched_prompt(tok).position >= 0
    with pytest.raises(PatchError, match="placeholder '\\?' does not occur"):
        patched_prompt(tok, "cat -> cat; dog ->")


def test_unsupported_models_raise_unsupported_architecture_error() -> None:
    from torch import nn

    from autopatch.architectures import final_norm
    from autopatch.errors import UnsupportedArchitectureError
    from autopatch.fingerprint import model_fingerprint

    with pytest.raises(UnsupportedArchitectureError, match="Cannot find the decoder blocks"):
        final_norm(nn.Linear(2, 2))
    with pytest.raises(UnsupportedArchitectureError, match="Cannot fingerprint Linear"):
        model_fingerprint(nn.Linear(2, 2))


def test_twohop_template_bugs_are_dataset_errors(monkeypatch) -> None:
    from eval import twohop
    from eval.records import DatasetError

    comp = twohop._COMPOSITIONS["landmark_country_capital"]
    subject = next(twohop._subjects_for(comp, twohop.load_kb()))
    with pytest.raises(DatasetError, match="has none of the spans"):
        twohop._choose_frame(comp, subject, {})
    bogus = twohop.Composition("bogus", "landmark", "x", "height", "?", comp.frames)
    with pytest.raises(DatasetError, match="relation 'height' has no answer rule"):
        twohop._hop2_answer(bogus, subject, twohop.load_kb())


def test_the_layout_table_names_every_module() -> None:
    """docs/reference.md's layout table is the map of the code: a module it does not name is one nobody finds."""
    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "reference.md").read_text().split("## Layout", 1)[1]
    missing = []
    for package in ("autopatch", "autopatch/locate", "autopatch/kernels", "classifiers", "eval", "server", "bench"):
        for path in sorted((root / package).iterdir()):
            if path.suffix not in (".py", ".c") or path.stem.startswith("__"):
                continue
            if f"`{path.stem}`" not in table and f"`{path.name}`" not in table:
                missing.append(f"{package}/{path.name}")
    assert not missing, f"docs/reference.md's layout table does not name: {', '.join(missing)}"


# Tests that follow a concern across modules rather than one module: end to end, the fixtures, the repository.
CONCERN_TESTS = {"gemma_e2e", "qwen_e2e", "golden", "hygiene", "readme", "server", "server_fuzz", "server_reliability",
                 "server_units"}


def test_each_test_file_is_named_after_its_module() -> None:
    """``tests/test_<module>.py`` tests ``<module>`` (``test_<package>_<module>.py`` where two packages share a
    module name); the few that follow a concern across modules are listed in :data:`CONCERN_TESTS`."""
    modules = {p.stem for package in (*PACKAGES, "autopatch/locate", "bench") for p in (ROOT / package).glob("*.py")}
    modules |= {p.parent.name for p in ROOT.glob("*/*/__init__.py")}  # subpackages: autopatch.locate
    modules |= {f"{package}_{p.stem}" for package in PACKAGES for p in (ROOT / package).glob("*.py")}
    named = {p.stem.removeprefix("test_") for p in (ROOT / "tests").glob("test_*.py")}
    strays = sorted(named - modules - CONCERN_TESTS)
    assert not strays, f"tests named after no module (rename them, or list a cross-module test in CONCERN_TESTS): {strays}"
