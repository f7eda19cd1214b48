"""``search`` (alias ``google_search``): local BM25 over a JSONL corpus, or a web search API.

``make_search(corpus=PATH, top_k=3)``: a ``bm25s`` index over rows
``{"id": ..., "title": ..., "text": ...}`` (built once per tool, in memory;
English stopwords, no stemming). Passages with score 0 (no query term in
common) are not returned.

``make_search(endpoint=URL, api_key=KEY, style="serper"|"searxng", top_k=3)``:
an HTTP backend, used when an endpoint is configured.

* ``serper``: ``POST endpoint`` with JSON ``{"q": query, "num": top_k}`` and
  header ``X-API-KEY: key``; reads ``organic[*].{title, snippet, link}``.
* ``searxng``: ``GET endpoint?q=query&format=json`` (key, if any, as
  ``Authorization: Bearer``); reads ``results[*].{title, content, url}``.

Both format results as ``[i] title\\ntext`` blocks separated by blank lines,
or ``No results.``. HTTP errors propagate to ``Tool.call``, which turns them
into error observations.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

from envs.data import DataError
from envs.tools.base import Tool, tool


def format_passages(passages: list[tuple[str, str]]) -> str:
    if not passages:
        return "No results."
    return "\n\n".join(f"[{i}] {title}\n{text}" for i, (title, text) in enumerate(passages, start=1))


class BM25Corpus:
    """A ``bm25s`` index over a JSONL corpus of ``{"id", "title", "text"}`` rows."""

    def __init__(self, path: str | Path) -> None:
        import bm25s

        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(self.path, lineno, f"invalid JSON: {e.msg}") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DataError(self.path, lineno, 'corpus rows need a string "text" field')
                self.rows.append(row)
        if not self.rows:
            raise DataError(self.path, None, "corpus is empty")
        self._bm25s = bm25s
        texts = [f"{r.get('title', '')}\n{r['text']}" for r in self.rows]
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, top_k: int) -> list[dict[str, Any]]:
        tokens = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens[0]:
            return []
        k = min(top_k, len(self.rows))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        return [self.rows[int(i)] for i, s in zip(ids[0], scores[0]) if s > 0]


def _http_json(request: urllib.request.Request, timeout_s: float) -> Any:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read(10 << 20))


def make_search(
    corpus: str | None = None,
    endpoint: str | None = None,
    api_key: str | None = None,
    style: Literal["serper", "searxng"] = "serper",
    top_k: int = 3,
    http_timeout_s: float = 20.0,
) -> Tool:
    """The ``search`` tool over a local corpus or, when ``endpoint`` is set, a web API."""
    if (corpus is None) == (endpoint is None):
        raise ValueError("search needs exactly one of corpus= (a JSONL path) or endpoint= (a web search API)")

    if corpus is not None:
        index = BM25Corpus(corpus)

        def run(query: str) -> str:
            rows = index.search(query, top_k)
            return format_passages([(str(r.get("title", "")), r["text"]) for r in rows])

    else:
        assert endpoint is not None
        headers = {"Content-Type": "application/json", **({"X-API-KEY": api_key} if api_key else {})}

        def run(query: str) -> str:
            if style == "serper":
                body = json.dumps({"q": query, "num": top_k}).encode()
                data = _http_json(urllib.request.Request(endpoint, data=body, headers=headers), http_timeout_s)
                items = [(r.get("title", ""), r.get("snippet", "")) for r in data.get("organic", [])]
            elif style == "searxng":
                url = endpoint + ("&" if "?" in endpoint else "?") + urllib.parse.urlencode({"q": query, "format": "json"})
                auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
                data = _http_json(urllib.request.Request(url, headers=auth), http_timeout_s)
                items = [(r.get("title", ""), r.get("content", "")) for r in data.get("results", [])]
            else:
                raise ValueError(f"unknown search API style '{style}'")
            return format_passages(items[:top_k])

    @tool(name="search")
    async def search(query: str) -> str:
        """Search for passages relevant to a query and return the top results.

        Args:
            query: What to search for.
        """
        return await asyncio.to_thread(run, query)

    return search
