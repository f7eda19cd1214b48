"""Datasets: ``load_rows`` reads JSON-list or JSONL files of objects.

Each row is a JSON object with a non-empty string prompt field (``prompt_key``,
default ``"question"``) and any other fields (``answer``, ``tests``, ...),
which reward functions receive by name. A file whose first non-blank
character is ``[`` is a JSON list; anything else is JSONL (one object per
line; blank lines are allowed and are not rows). Any bad row raises
``DataError`` naming the file, the line and the problem; nothing is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset file that cannot be used as is."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


def _check_row(obj: Any, path: Path, line: int, prompt_key: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(path, line, f"row is a JSON {type(obj).__name__}, expected an object")
    if prompt_key not in obj:
        raise DataError(path, line, f"row has no '{prompt_key}' field (fields: {sorted(obj)})")
    value = obj[prompt_key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, line, f"'{prompt_key}' must be a non-empty string, got {value!r:.60}")
    return obj


def _read_jsonl(path: Path, text: str, prompt_key: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
        rows.append(_check_row(obj, path, lineno, prompt_key))
    return rows


def _read_json_list(path: Path, text: str, prompt_key: str) -> list[dict[str, Any]]:
    """Walk the list item by item so a bad item is reported with its line."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    rows: list[dict[str, Any]] = []

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return rows
    while True:
        pos = skip_ws(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
        rows.append(_check_row(obj, path, line_of(pos), prompt_key))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            break
        raise DataError(path, line_of(pos), "invalid JSON: expected ',' or ']' after a list item")
    if skip_ws(pos + 1) != len(text):
        raise DataError(path, line_of(skip_ws(pos + 1)), "invalid JSON: extra data after the list")
    return rows


def load_rows(paths: str | Path | list[str | Path], prompt_key: str = "question") -> list[dict[str, Any]]:
    """All rows of ``paths`` (one file or several, in order). Raises ``DataError`` on any bad row."""
    path_list = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows: list[dict[str, Any]] = []
    for p in path_list:
        path = Path(p)
        if not path.is_file():
            raise DataError(path, None, "no such file")
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if not stripped:
            raise DataError(path, None, "file is empty")
        reader = _read_json_list if stripped.startswith("[") else _read_jsonl
        rows.extend(reader(path, text, prompt_key))
    return rows
