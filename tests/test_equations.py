"""A newcomer's map from the paper to the code: each of equations 1-6 is tagged once in ktlib, on what computes it.

``grep -rniE 'eq\\. ?2\\b' ktlib`` lands on one place; the function or class around that place names the equation
in its docstring (so the tag is documentation of the code that implements it, not a stray comment).
"""

import ast
import re
from pathlib import Path

import pytest

KTLIB = Path(__file__).resolve().parents[1] / "ktlib"


def _tags(n: int) -> list[tuple[Path, int]]:
    """(file, line) of every match of ``eq. n`` (case-insensitive) in ktlib/*.py."""
    pattern = re.compile(rf"eq\. ?{n}\b", re.IGNORECASE)
    return [(path, i) for path in sorted(KTLIB.glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), start=1) if pattern.search(line)]


def _enclosing(path: Path, line: int) -> ast.AST | None:
    """The innermost def or class whose span holds ``line``."""
    best = None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) \
                and node.lineno <= line <= node.end_lineno \
                and (best is None or node.lineno >= best.lineno):
            best = node
    return best


@pytest.mark.parametrize("n", range(1, 7))
def test_each_equation_is_tagged_once_on_its_implementation(n):
    tags = _tags(n)
    assert len(tags) == 1, f"eq. {n} is tagged {len(tags)} times in ktlib: {tags}"
    path, line = tags[0]
    node = _enclosing(path, line)
    assert node is not None, f"eq. {n} ({path.name}:{line}) lies outside any function or class"
    doc = ast.get_docstring(node) or ""
    assert re.search(rf"eq\. ?{n}\b", doc, re.IGNORECASE), \
        f"eq. {n} ({path.name}:{line}) is not in the docstring of {node.name}"


def test_the_fusion_of_eq_2_is_delta():
    path, line = _tags(2)[0]
    node = _enclosing(path, line)
    assert path.name == "model.py" and "delta" in ast.get_source_segment(path.read_text(), node)
