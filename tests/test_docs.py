"""The docs name real code: every code name written in backticks in docs/*.md and README.md exists.

A backticked span is checked when it looks like code:
* a path (`serve.py`, `bench/gpu_session.sh`, `docs/ARCHITECTURE.md`): the file exists;
* a dotted name (`engine.Engine.step`, `kernels.hash_topk`, `Engine.step`): a module prefix must be a
  repository module, and each following part must be defined there (a class, function, method,
  attribute or module-level name);
* a single identifier with a call or underscore (`step()`, `log2phy`, `_launch_ahead`): defined
  somewhere in the repository's Python files;
* a command-line flag (`--eplb-window`): spelled in some Python file;
* a reading-set line count ("N lines") in ARCHITECTURE.md is the file's or function's real count.
Plain words in backticks (`dsv4-mini`, `1.0`) and expressions are not code names and are skipped.
Links must stay inside the repository.
"""
import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
PY_FILES = sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "site-packages" not in p.parts)

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
DOTTED = re.compile(rf"^{IDENT}(\.{IDENT})+(\(\))?$")
SINGLE = re.compile(rf"^{IDENT}(\(\))?$")
# repository files; a bare `config.json` or `tokenizer.json` is a user's checkpoint file, not ours
PATH = re.compile(r"^([\w.-]+/)*[\w.-]+\.(py|md|sh|ini)$|^([\w.-]+/)+[\w.-]+\.\w+$")
FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*$")
CAMEL = re.compile(r"^[A-Z][a-z0-9]+[A-Z]\w*$")  # a class name like `DecodeGraphs`


@lru_cache(maxsize=None)
def module_names(path: Path) -> dict[str, set[str]]:
    """{scope: names defined in it}: scope "" is the module, "Class" a class body (methods, class
    attributes, and `self.x` attributes assigned in its methods)."""
    tree = ast.parse(path.read_text())
    scopes: dict[str, set[str]] = {"": set()}

    def targets(node):
        for t in getattr(node, "targets", [getattr(node, "target", None)]):
            for n in ast.walk(t) if t is not None else []:
                if isinstance(n, ast.Name):
                    yield n.id

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scopes[""].add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            scopes[""].update(targets(node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            scopes[""].update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If):  # `if triton is not None:` blocks of kernels
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    scopes[""].add(sub.name)
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        names = scopes.setdefault(cls.name, set())
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not cls:
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names.update(targets(node))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return scopes


@lru_cache(maxsize=None)
def all_identifiers() -> frozenset[str]:
    names = set()
    for path in PY_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
    return frozenset(names)


@lru_cache(maxsize=None)
def all_source() -> str:
    return "\n".join(p.read_text() for p in PY_FILES)


@lru_cache(maxsize=None)
def string_literals() -> frozenset[str]:
    """Every string constant in the code (JSON keys, metric and logger names, flags)."""
    return frozenset(node.value for path in PY_FILES for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Constant) and isinstance(node.value, str))


def is_literal(name: str) -> bool:
    """A string the code spells: a JSON key, a logger name, a metric (counters get `_total` on export)."""
    return name in string_literals() or name.removesuffix("_total") in string_literals()


def modules() -> dict[str, Path]:
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found.update({f"bench.{p.stem}": p for p in (ROOT / "bench").glob("*.py")})
    found.update({f"tests.{p.stem}": p for p in (ROOT / "tests").glob("*.py")})
    return found


def dotted_exists(name: str) -> bool:
    parts = name.removesuffix("()").split(".")
    mods = modules()
    for cut in (2, 1):  # `bench.bench_ep.main` or `engine.Engine.step`
        mod = ".".join(parts[:cut])
        if mod in mods:
            scopes, rest = module_names(mods[mod]), parts[cut:]
            if not rest:
                return True
            if rest[0] not in scopes[""]:
                return False
            return all(part in scopes.get(rest[0], set()) or part in all_identifiers() for part in rest[1:])
    if parts[0] in {"torch", "triton", "tl", "np", "F", "nn", "dist", "os", "sys", "json", "uvicorn", "fastapi",
                    "asyncio", "loop"}:
        return True  # third-party API, not ours to check
    # `Engine.step`, `ExpertLocation.copy_layer_`: a class of ours and its member
    for path in PY_FILES:
        scopes = module_names(path)
        if parts[0] in scopes and all(p in scopes[parts[0]] or p in all_identifiers() for p in parts[1:]):
            return True
    return False


def code_spans(text: str) -> list[str]:
    """Inline code spans, plus the names that fenced blocks define or call through a module
    (`def name(`, `class Name`, `module.name`); the rest of a fenced block is example code."""
    fenced = re.findall(r"```.*?```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for block in fenced:
        spans += re.findall(rf"(?:def|class) ({IDENT})", block)
        spans += [m for m in re.findall(rf"\b({IDENT}\.{IDENT})\(", block) if m.split(".")[0] in modules()]
    return spans


def problems_in(doc: Path) -> list[str]:
    bad = []
    for span in code_spans(doc.read_text()):
        span = span.strip()
        if PATH.match(span):
            if not (ROOT / span).exists() and not (doc.parent / span).exists():
                bad.append(f"{span}: no such file")
        elif FLAG.match(span):
            if f'"{span}"' not in all_source():
                bad.append(f"{span}: no such flag")
        elif DOTTED.match(span):
            if not dotted_exists(span) and not is_literal(span):
                bad.append(f"{span}: not defined in the code")
        elif SINGLE.match(span) and ("_" in span or span.endswith("()") or CAMEL.match(span)):
            if span.removesuffix("()") not in all_identifiers() and not is_literal(span):
                bad.append(f"{span}: not defined in the code")
    for target in re.findall(r"\]\(([^)]+)\)", doc.read_text()):
        if "://" in target or target.startswith("..") or not (doc.parent / target.split("#")[0]).exists():
            bad.append(f"link {target}: must point to a file inside the repository")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_code_name_in_the_docs_exists(doc):
    assert problems_in(doc) == []


def test_the_checker_catches_made_up_names(tmp_path):
    doc = tmp_path / "fake.md"
    doc.write_text("See `engine.Engine.no_such_method`, `kernels.hash_topk`, `no_such_file.py`, "
                   "`--no-such-flag`, `made_up_helper()`, `Engine.step` and [x](../elsewhere.md).")
    assert problems_in(doc) == ["engine.Engine.no_such_method: not defined in the code",
                                "no_such_file.py: no such file", "--no-such-flag: no such flag",
                                "made_up_helper(): not defined in the code",
                                "link ../elsewhere.md: must point to a file inside the repository"]


def reading_set_rows() -> list[tuple[str, int]]:
    """(`file.py` or `file.py:function`, stated line count) rows of ARCHITECTURE.md's reading set."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## The reading set", 1)[1].split("\n## ", 1)[0]
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|", section, re.M)]


def real_line_count(ref: str) -> int:
    """Lines of `file.py` or of `file.py:function` / `file.py:Class.method` (decorators included)."""
    path, _, qualname = ref.partition(":")
    source = (ROOT / path).read_text()
    if not qualname:
        return len(source.splitlines())
    scope: ast.AST = ast.parse(source)
    for part in qualname.split("."):
        scope = next((n for n in ast.walk(scope) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part),
                     None)
        assert scope is not None, f"{ref}: not found"
    start = min([scope.lineno] + [d.lineno for d in scope.decorator_list])
    return scope.end_lineno - start + 1


def test_reading_set_line_counts_are_true():
    rows = reading_set_rows()
    assert rows, "ARCHITECTURE.md needs a '## The reading set' table: | `file.py:function` | lines | ..."
    stated_total = sum(n for _, n in rows)
    for ref, stated in rows:
        assert real_line_count(ref) == stated, f"{ref}: the doc says {stated} lines, the code has {real_line_count(ref)}"
    assert stated_total <= 1600
