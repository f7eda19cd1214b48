"""Datasets: ``load_rows`` reads JSON-list, JSONL and parquet files of prompt rows.

Formats, chosen by what the file holds (not its name): a file starting with
parquet's magic bytes ``PAR1`` is parquet (read with pyarrow); a text file
whose first non-blank character is ``[`` is a JSON list of objects; any other
text is JSONL (one object per line; blank lines are not rows).

Layouts, chosen by the first row of each file:

- **AgentFly / Relay**: ``{"question": "...", "answer": "...", ...}``; the
  prompt is the ``prompt_key`` field (default ``question``);
- **verl**: ``{"prompt": [{"role": "user", "content": "..."}], "reward_model":
  {"ground_truth": "..."}, "extra_info": {...}, "data_source": "..."}``, used
  when the rows have no ``prompt_key`` field, ``prompt_key`` is the default
  ``question``, and they have ``prompt``.

Every row comes out as a dict holding its prompt under ``prompt_key`` (a
non-empty string, or a chat list of ``{"role", "content"}`` messages ending
with a user message) plus all its other fields, which reward functions receive
by name. ``reward_model.ground_truth`` is also given as ``ground_truth`` and,
when the row has no ``answer``, as ``answer`` (what the built-in rewards read).

Any bad row raises ``DataError`` naming the file, the line (text) or row
(parquet) and the problem, undecodable bytes included; nothing is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

PARQUET_MAGIC = b"PAR1"
CHAT_ROLES = ("system", "user", "assistant", "tool")
VERL_PROMPT_KEY = "prompt"


class DataError(ValueError):
    """A dataset file that cannot be used as is. ``line`` is a text line, or with
    ``unit="row"`` a parquet row (both 1-based)."""

    def __init__(self, path: str | Path, line: int | None, problem: str, unit: str = "line") -> None:
        self.path, self.line, self.problem, self.unit = str(path), line, problem, unit
        if line is None:
            where = str(path)
        else:
            where = f"{path}:{line}" if unit == "line" else f"{path} row {line}"
        super().__init__(f"{where}: {problem}")


# --------------------------------------------------------------------------- rows


def _chat_list(value: list, fail) -> list[dict[str, str]]:
    """``value`` as a clean chat list (``role``/``content`` only), or ``fail(problem)``."""
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            fail(f"prompt message {i} must be an object with text 'role' and 'content', got {m!r:.80}")
        if m["role"] not in CHAT_ROLES:
            fail(f"prompt message {i} has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        fail("a chat-list prompt must end with a non-empty user message")
    return messages


class _Layout:
    """How the rows of one file map to Relay rows (decided on its first row)."""

    def __init__(self, first: Any, prompt_key: str, fail) -> None:
        self.prompt_key = prompt_key
        self.source = prompt_key
        if isinstance(first, dict) and prompt_key not in first:
            if prompt_key == "question" and VERL_PROMPT_KEY in first:
                self.source = VERL_PROMPT_KEY  # verl's layout
            else:
                fail(f"row has no '{prompt_key}' field (fields: {sorted(first)}); "
                     f"set data.prompt_key to the column holding the prompt")

    def row(self, obj: Any, fail) -> dict[str, Any]:
        if not isinstance(obj, dict):
            fail(f"row is a JSON {type(obj).__name__}, expected an object")
        if self.source not in obj:
            fail(f"row has no '{self.source}' field (fields: {sorted(obj)})")
        value = obj[self.source]
        if isinstance(value, list):
            value = _chat_list(value, fail)
        elif not isinstance(value, str) or not value.strip():
            fail(f"'{self.source}' must be a non-empty string or a chat list of messages, got {value!r:.60}")
        row = dict(obj)
        row[self.prompt_key] = value
        reward_model = obj.get("reward_model")
        if isinstance(reward_model, dict) and "ground_truth" in reward_model:
            row.setdefault("ground_truth", reward_model["ground_truth"])
        if "answer" not in row and "ground_truth" in row:
            row["answer"] = row["ground_truth"]
        return row


def _rows(path: Path, items: Iterator[tuple[int, Any]], prompt_key: str, unit: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    layout: _Layout | None = None
    for where, obj in items:

        def fail(problem: str, where: int = where) -> None:
            raise DataError(path, where, problem, unit)

        if layout is None:
            layout = _Layout(obj, prompt_key, fail)
        rows.append(layout.row(obj, fail))
    return rows


# --------------------------------------------------------------------------- formats


def _jsonl_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None


def _json_list_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Walk the list item by item so a bad item is reported with its line."""
    decoder = json.JSONDecoder()

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip_ws(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        end_of_list = pos
    else:
        while True:
            pos = skip_ws(pos)
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            yield line_of(pos), obj
            pos = skip_ws(end)
            if pos < len(text) and text[pos] == ",":
                pos += 1
                continue
            if pos < len(text) and text[pos] == "]":
                break
            raise DataError(path, line_of(pos), "invalid JSON: expected ',' or ']' after a list item")
        end_of_list = pos
    if skip_ws(end_of_list + 1) != len(text):
        raise DataError(path, line_of(skip_ws(end_of_list + 1)), "invalid JSON: extra data after the list")


def _parquet_items(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, None, "reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(path, None, f"cannot read parquet: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            path, line, f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {column} "
            f"(expected a JSON, JSONL or parquet file)"
        ) from None


def load_rows(paths: str | Path | list[str | Path], prompt_key: str = "question") -> list[dict[str, Any]]:
    """All rows of ``paths`` (one file or several, in order). Raises ``DataError`` on any bad row."""
    path_list = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows: list[dict[str, Any]] = []
    for p in path_list:
        path = Path(p)
        if not path.is_file():
            raise DataError(path, None, "no such file" if not path.exists() else "not a file")
        data = path.read_bytes()
        if data.startswith(PARQUET_MAGIC):
            rows.extend(_rows(path, _parquet_items(path), prompt_key, "row"))
            continue
        if path.suffix == ".parquet":
            raise DataError(path, None, "named .parquet but not a parquet file (no PAR1 header)")
        text = _decode(path, data)
        stripped = text.lstrip()
        if not stripped:
            raise DataError(path, None, "file is empty")
        items = _json_list_items(path, text) if stripped.startswith("[") else _jsonl_items(path, text)
        rows.extend(_rows(path, items, prompt_key, "line"))
    return rows
