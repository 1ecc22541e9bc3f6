"""Declarative access to a data row: nested paths and a few text filters, so a task needs no Python of its own.

An expression is `path | filter | filter ...`. A path is dotted keys with list steps: `question.stem`,
`question.choices[].text` (every item), `choices[0]`, `sentence1[start1:end1]` (a slice whose bounds are ints or
other columns). Filters: strip, lower, lower_first, upper_first, strip_period (one final "."), drop_last (the last
character) and
`map(a=b,c=d)` (replace whole values). Template fields and `task.columns` values use the same expressions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import DataError

__all__ = ["resolve", "check_expression", "is_plain", "scalar_text"]

_STEP = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")
_MAP = re.compile(r"map\((.*)\)", re.DOTALL)

FILTERS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lower": str.lower,
    "lower_first": lambda s: s[:1].lower() + s[1:],
    "upper_first": lambda s: s[:1].upper() + s[1:],
    "strip_period": lambda s: s[:-1] if s.endswith(".") else s,
    "drop_last": lambda s: s[:-1],  # lm-eval's COPA: premise.strip()[:-1], whatever the last character
}


def is_plain(expression: str) -> bool:
    """A bare column name (what classic templates use): read by the classic code path."""
    return expression.isidentifier()


def _steps(path: str) -> list[tuple[str, str]]:
    """[('key', name) | ('item', text-in-brackets)]; DataError on a malformed path."""
    steps, pos = [], 0
    for m in _STEP.finditer(path):
        if m.start() != pos:
            break
        steps.append(("key", m.group(1)) if m.group(1) is not None else ("item", m.group(2)))
        pos = m.end()
        if pos < len(path) and path[pos] == ".":
            pos += 1
    if pos != len(path) or not steps:
        raise DataError(f"{path!r} is not a field path (like question.stem or question.choices[].text)")
    return steps


def _bound(text: str, row: dict, where: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    value = row.get(text) if isinstance(row, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise DataError(f"{where}: slice bound {text!r} is not an integer column of the row")
    return int(value)


def _walk(value: Any, steps: list[tuple[str, str]], row: dict, where: str) -> Any:
    for n, (kind, arg) in enumerate(steps):
        if kind == "key":
            if not isinstance(value, dict) or arg not in value:
                keys = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise DataError(f"{where}: no field {arg!r} (found {keys})")
            value = value[arg]
        elif arg == "":
            if not isinstance(value, list):
                raise DataError(f"{where}: [] needs a list, found {type(value).__name__}")
            return [_walk(v, steps[n + 1:], row, where) for v in value]
        elif ":" in arg:
            lo, hi = arg.split(":", 1)
            if not isinstance(value, (str, list)):
                raise DataError(f"{where}: [{arg}] needs text or a list, found {type(value).__name__}")
            value = value[_bound(lo, row, where):_bound(hi, row, where)]
        else:
            try:
                value = value[int(arg)]
            except (ValueError, IndexError, TypeError, KeyError) as exc:
                raise DataError(f"{where}: [{arg}] is not an item of {type(value).__name__}") from exc
    return value


def _filter(name: str, where: str) -> Callable[[str], str]:
    m = _MAP.fullmatch(name)
    if m:
        pairs = [p.partition("=") for p in m.group(1).split(",") if p.strip()]
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise DataError(f"{where}: {name!r}: expected map(value=replacement,...)")
        table = {k.strip(): v.strip() for k, _, v in pairs}

        def mapped(s: str) -> str:
            if s not in table:
                raise DataError(f"{where}: value {s!r} is not one of {sorted(table)} in {name}")
            return table[s]

        return mapped
    if name not in FILTERS:
        raise DataError(f"{where}: unknown filter {name!r} (known: {', '.join(FILTERS)}, map(a=b))")
    return FILTERS[name]


def check_expression(expression: str, where: str = "") -> None:
    """Raise DataError for a malformed expression before any row is read."""
    path, *filters = [p.strip() for p in expression.split("|")]
    _steps(path)
    for f in filters:
        _filter(f, where or expression)


def scalar_text(value: Any) -> str:
    """A row's value as text; a JSON boolean as JSON spells it, "true" / "false" (the labels of SuperGLUE's own BoolQ
    and WiC files), not Python's "True" / "False"."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value).strip()


def resolve(row: dict, expression: str, aliases: dict[str, str] | None = None, where: str = "") -> Any:
    """The expression's value in `row`: text (stripped, then filtered), or a list of texts for `[]` paths.

    A path's first step may be an alias (`task.columns`, itself an expression of the row), which wins over a
    column of the same name."""
    path, *filters = [p.strip() for p in expression.split("|")]
    where = where or expression
    steps = _steps(path)
    if aliases and steps[0][0] == "key" and steps[0][1] in aliases:
        base = resolve(row, aliases[steps[0][1]], None, where)
        value = _walk(base, steps[1:], row, where) if len(steps) > 1 else base
    else:
        value = _walk(row, steps, row, where)
    funcs = [_filter(f, where) for f in filters]

    def apply(v: Any) -> str:
        if v is None:  # str(None) would be the text "None": a prompt, or a choice, no row holds
            raise DataError(f"{where}: {path!r} is null")
        s = scalar_text(v)
        for f in funcs:
            s = f(s)
        return s

    if isinstance(value, list):
        return [apply(v) for v in value]
    if isinstance(value, dict):
        raise DataError(f"{where}: {path!r} is a mapping, not a value (keys {sorted(value)})")
    return apply(value)
