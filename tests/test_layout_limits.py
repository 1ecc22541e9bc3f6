"""Package layout limits (issue 17): no function in fnprune/ longer than 80 lines, no module longer than 450.

A long function or module is where a second way of doing something hides; the limits keep each stage readable in
one sitting. The exceptions are named here, each with a ceiling of its own, so they cannot grow unnoticed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fnprune"
FUNCTION_LIMIT = 80  # lines from `def` to the last line, docstring included, decorators not
MODULE_LIMIT = 450

# Functions that are mostly literal report text: cutting one document into pieces scatters it.
TEXT_FUNCTIONS = {
    "card.py::model_card": 150,  # the model card (README.md beside the weights)
    "cli.py::_print_summary": 150,  # what compress prints when it is done
}
# Modules allowed past MODULE_LIMIT, up to their own ceiling.
LONG_MODULES = {
    "recipe.py": 800,  # the recipe's dataclasses: one declarative field (type, default, flag, help) per setting
}


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def _modules() -> dict[str, str]:
    return {p.relative_to(PACKAGE).as_posix(): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_function_over_the_limit():
    too_long = []
    for module, text in _modules().items():
        for name, lines in _functions(ast.parse(text)):
            key = f"{module}::{name}"
            limit = TEXT_FUNCTIONS.get(key, FUNCTION_LIMIT)
            if lines > limit:
                too_long.append(f"fnprune/{key}: {lines} lines (limit {limit})")
    assert not too_long, "split these functions into named steps:\n" + "\n".join(too_long)


def test_no_module_over_the_limit():
    too_long = []
    for module, text in _modules().items():
        lines = len(text.splitlines())
        limit = LONG_MODULES.get(module, MODULE_LIMIT)
        if lines > limit:
            too_long.append(f"fnprune/{module}: {lines} lines (limit {limit})")
    assert not too_long, "split these modules by what they own:\n" + "\n".join(too_long)


def test_exceptions_name_what_exists():
    """A renamed or removed exception must leave the lists, not linger as a blank cheque for a new name."""
    modules = _modules()
    functions = {f"{m}::{name}" for m, text in modules.items() for name, _ in _functions(ast.parse(text))}
    assert not set(TEXT_FUNCTIONS) - functions, set(TEXT_FUNCTIONS) - functions
    assert not set(LONG_MODULES) - set(modules), set(LONG_MODULES) - set(modules)


def test_the_walk_sees_methods_and_nested_functions():
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n        return g\n")
    assert dict(_functions(tree)) == {"A.f": 4, "A.f.g": 2}
