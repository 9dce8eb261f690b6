"""The layout keeps the architecture: the method is a library, the Hugging Face integration builds on it, and the
paper reproduction builds on both; imports only ever flow that way. And no module grows past 600 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xtoken"

LIBRARY = [
    "tokenizers",
    "canonical",
    "projection",
    "learned_projection",
    "audit",
    "align",
    "losses",
    "multi_teacher",
    "chat",
]
INTEGRATION = ["hf", "train", "evaluate"]
REPRODUCTION = ["mini", "paper", "report", "pipeline", "standins", "stats"]
# files longer than MAX_LINES, each with the reason it is allowed for now
MAX_LINES = 600
LONG_FILES: dict[str, str] = {}


def modules(part: str) -> list[Path]:
    p = PACKAGE / part
    return sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]


def imported(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names (top level or inside a function),
    relative imports resolved, as dotted names under ``xtoken``."""
    package = ["xtoken", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            names.add(stem)
            names.update(f"{stem}.{a.name}" for a in node.names)  # `from xtoken import paper` is a module
    return {n for n in names if n == "xtoken" or n.startswith("xtoken.")}


def reaches(names: set[str], parts: list[str]) -> list[str]:
    return sorted(n for n in names if any(n == f"xtoken.{p}" or n.startswith(f"xtoken.{p}.") for p in parts))


@pytest.mark.parametrize("part", LIBRARY)
def test_the_library_imports_neither_the_integration_nor_the_reproduction(part):
    for path in modules(part):
        bad = reaches(imported(path), INTEGRATION + REPRODUCTION)
        assert not bad, f"{path.relative_to(PACKAGE)} (library) imports {bad}"


@pytest.mark.parametrize("part", INTEGRATION)
def test_the_integration_does_not_import_the_reproduction(part):
    for path in modules(part):
        bad = reaches(imported(path), REPRODUCTION)
        assert not bad, f"{path.relative_to(PACKAGE)} (Hugging Face integration) imports {bad}"


def test_every_module_belongs_to_a_layer():
    top = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert top - {"__init__", "__main__"} == set(LIBRARY + INTEGRATION + REPRODUCTION)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    assert "xtoken.hf.collator" in imported(PACKAGE / "hf" / "cache.py")
    assert "xtoken.losses" in imported(PACKAGE / "hf" / "trainer.py")  # a lazy `from .. import losses`


def test_no_module_is_longer_than_the_limit():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= set(LONG_FILES), {k: v for k, v in long.items() if k not in LONG_FILES}
