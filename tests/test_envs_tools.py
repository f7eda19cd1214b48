import asyncio
import sys
import textwrap

import pytest

from envs.base import ToolResult
from envs.tools import CHARS_PER_TOKEN, Tool, get_tool, register_tool, tool, truncate


def run(coro):
    return asyncio.run(coro)


def call(t: Tool, timeout_s: float = 5.0, max_output_tokens: int = 100, count_tokens=None, **arguments) -> ToolResult:
    return run(t.call(arguments, timeout_s=timeout_s, max_output_tokens=max_output_tokens, count_tokens=count_tokens))


def test_schema_from_signature_hints_and_docstring():
    @tool
    def lookup(query: str, k: int = 3, exact: bool | None = None, tags: list[str] | None = None) -> str:
        """Find things.

        Args:
            query: What to look for.
            k: How many results,
                at most 10.
        """
        return query

    assert lookup.name == "lookup"
    assert lookup.schema == {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Find things.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for."},
                    "k": {"type": "integer", "description": "How many results, at most 10."},
                    "exact": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["query"],
            },
        },
    }


def test_calculator_results():
    calc = get_tool("calculator")
    assert call(calc, expression="123*45").text == "5535"
    assert call(calc, expression="10/4").text == "2.5"
    assert call(calc, expression="10/2").text == "5"
    assert call(calc, expression="-(3+4)*2").text == "-14"
    assert call(calc, expression="7//2 + 7%2").text == "4"
    assert call(calc, expression="2**10").text == "1024"
    assert call(calc, expression=" 1.5 * 2 ").text == "3"


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "1/0", "2**100000", "9**9**9", "'a'*3", "x+1", "1 if 1 else 2", "True+1", "(1"],
)
def test_calculator_refuses_unsafe_or_invalid(expression):
    result = call(get_tool("calculator"), expression=expression)
    assert result.error and result.text.startswith("Error: ")


def test_answer_tool_sets_final_answer():
    result = call(get_tool("answer"), answer="42")
    assert result.final_answer == "42" and not result.error


def test_bad_arguments_are_error_observations():
    calc = get_tool("calculator")
    assert call(calc).error  # missing
    assert call(calc, expression="1", extra=2).error  # unknown
    assert run(calc.call(["1"], timeout_s=1, max_output_tokens=10)).error  # not an object


def test_exceptions_sync_and_async_become_errors():
    @tool
    def boom(x: int) -> str:
        raise RuntimeError("kaput")

    @tool
    async def aboom(x: int) -> str:
        raise KeyError("gone")

    assert call(boom, x=1) == ToolResult(text="Error: RuntimeError: kaput", error=True)
    assert call(aboom, x=1) == ToolResult(text="Error: KeyError: 'gone'", error=True)


def test_timeout_async_and_sync():
    @tool
    async def slow_async() -> str:
        await asyncio.sleep(60)
        return "never"

    @tool
    def slow_sync() -> str:
        import time

        time.sleep(1.0)
        return "late"

    r1 = call(slow_async, timeout_s=0.05)
    r2 = call(slow_sync, timeout_s=0.05)
    assert r1.error and "timed out" in r1.text
    assert r2.error and "timed out" in r2.text


def test_truncation_character_fallback():
    text = "x" * 1000
    out = truncate(text, max_output_tokens=10)
    assert len(out) == 10 * CHARS_PER_TOKEN
    assert out.startswith("xxx") and "truncated" in out
    assert truncate("short", max_output_tokens=10) == "short"


def test_truncation_with_token_counter():
    words = " ".join(f"w{i}" for i in range(200))
    count = lambda s: len(s.split())  # noqa: E731  one token per word
    out = truncate(words, max_output_tokens=20, count_tokens=count)
    assert count(out) <= 20
    assert out.startswith("w0 w1 w2") and "truncated" in out


def test_tool_output_truncated_through_call():
    @tool
    def big() -> str:
        return "y" * 10_000

    result = call(big, max_output_tokens=5)
    assert len(result.text) == 5 * CHARS_PER_TOKEN and not result.error


def test_aliases_resolve_to_one_tool():
    from envs.tools import TOOL_ALIASES

    assert TOOL_ALIASES["python_executor"] == "code_interpreter"
    assert TOOL_ALIASES["google_search"] == "search"


def test_register_and_dotted_paths(tmp_path, monkeypatch):
    module = tmp_path / "my_tools_pkg_for_test.py"
    module.write_text(
        textwrap.dedent(
            '''
            from envs.tools import tool

            @tool
            def shout(text: str) -> str:
                """Upper-case the text."""
                return text.upper()

            def plain(n: int) -> int:
                """Double n."""
                return 2 * n
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        shout = get_tool("my_tools_pkg_for_test:shout")
        assert call(shout, text="hi").text == "HI"
        assert get_tool("my_tools_pkg_for_test.shout") is shout
        plain = get_tool("my_tools_pkg_for_test:plain")
        assert plain.schema["function"]["parameters"]["properties"] == {"n": {"type": "integer"}}
        assert call(plain, n=21).text == "42"
    finally:
        sys.modules.pop("my_tools_pkg_for_test", None)

    @tool(name="echo_for_registry_test")
    def echo(text: str) -> str:
        """Echo."""
        return text

    register_tool(echo)
    assert get_tool("echo_for_registry_test") is echo
    with pytest.raises(KeyError):
        get_tool("no_such_tool_anywhere")


# ----------------------------------------------------------------------------- search

import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: E402


def write_corpus(path):
    rows = [
        {"id": "1", "title": "Paris", "text": "Paris is the capital of France."},
        {"id": "2", "title": "Berlin", "text": "Berlin is the capital of Germany."},
        {"id": "3", "title": "Eiffel Tower", "text": "The Eiffel Tower stands in Paris."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bm25_search_over_local_corpus(tmp_path):
    search = get_tool("google_search", corpus=str(write_corpus(tmp_path / "corpus.jsonl")), top_k=2)
    assert search.name == "search"
    text = call(search, query="capital of Germany").text
    assert text.startswith("[1] Berlin\nBerlin is the capital of Germany.")
    assert text.count("[") == 2  # top_k results, the runner-up mentions "capital"
    assert call(search, query="zzzz qqqq").text == "No results."


def test_search_needs_exactly_one_backend(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        get_tool("search")
    with pytest.raises(TypeError):
        get_tool("calculator", top_k=3)


class _FakeSearchAPI(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # serper style
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(("POST", self.headers.get("X-API-KEY"), body))
        self._reply({"organic": [{"title": "T1", "snippet": f"about {body['q']}", "link": "http://x"}]})

    def do_GET(self):  # searxng style
        self.seen.append(("GET", self.headers.get("Authorization"), self.path))
        if "fail" in self.path:
            self.send_error(500)
            return
        self._reply({"results": [{"title": "S1", "content": "c1"}, {"title": "S2", "content": "c2"}]})

    def _reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_search_backends_against_local_server():
    server = HTTPServer(("127.0.0.1", 0), _FakeSearchAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/search"
    try:
        serper = get_tool("search", endpoint=url, api_key="k123", style="serper", top_k=5)
        assert call(serper, query="relay rl").text == "[1] T1\nabout relay rl"
        assert _FakeSearchAPI.seen[-1] == ("POST", "k123", {"q": "relay rl", "num": 5})

        searx = get_tool("search", endpoint=url, style="searxng", top_k=1)
        assert call(searx, query="a b").text == "[1] S1\nc1"
        assert _FakeSearchAPI.seen[-1] == ("GET", None, "/search?q=a+b&format=json")

        failing = get_tool("search", endpoint=url + "?fail=1", style="searxng")
        result = call(failing, query="x")
        assert result.error and "HTTPError" in result.text
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "exc, text",
    [
        (SystemExit(3), "Error: SystemExit: 3"),
        (KeyboardInterrupt(), "Error: KeyboardInterrupt"),
        (asyncio.CancelledError("from the tool"), "Error: CancelledError: from the tool"),
        (GeneratorExit(), "Error: GeneratorExit"),
    ],
)
def test_base_exceptions_raised_by_a_tool_become_errors_and_the_loop_goes_on(exc, text):
    @tool
    async def aboom() -> str:
        raise exc

    @tool
    def boom() -> str:
        raise exc

    async def episode() -> list:
        # the loop keeps running other work around the failing tools
        ticks = []
        ticker = asyncio.create_task(asyncio.sleep(0.01, result="tick"))
        results = [await t.call({}, timeout_s=5, max_output_tokens=100) for t in (aboom, boom)]
        ticks.append(await ticker)
        return results + ticks

    a, b, tick = run(episode())
    assert a == ToolResult(text=text, error=True)
    assert b == ToolResult(text=text, error=True)
    assert tick == "tick"


def test_cancelling_the_caller_still_cancels_the_tool():
    started, cancelled = asyncio.Event(), []

    @tool
    async def wait_forever() -> str:
        started.set()
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "never"

    async def main() -> None:
        task = asyncio.create_task(wait_forever.call({}, timeout_s=600, max_output_tokens=10))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert cancelled == [True]


def _brute_force_truncate(text, limit, count):
    if count(text) <= limit:
        return text
    for n in range(len(text) - 1, -1, -1):
        marked = text[:n] + f"\n[truncated {len(text) - n} chars]"
        if count(marked) <= limit:
            return marked
    return next(text[:n] for n in range(len(text), -1, -1) if count(text[:n]) <= limit)


def test_truncation_is_the_longest_head_that_fits():
    import random

    rng = random.Random(0)
    count = lambda s: len(s.split())  # noqa: E731  one token per word
    for _ in range(300):
        text = " ".join("w" * rng.randint(1, 5) for _ in range(rng.randint(0, 150)))
        limit = rng.randint(0, 60)
        assert truncate(text, limit, count) == _brute_force_truncate(text, limit, count)
        assert truncate(text, limit) == _brute_force_truncate(text, limit * CHARS_PER_TOKEN, len)


def test_truncating_5mb_counts_only_a_few_kb():
    counted = []

    def count(s: str) -> int:
        counted.append(len(s))
        return len(s.split())

    text = "word " * 1_000_000  # 5 MB, one token per word
    out = truncate(text, 500, count)
    assert count(out) <= 500 and out.startswith("word word") and "truncated" in out
    # the old bisection over the whole text counted ~23 prefixes of up to 5 MB (~60 MB in all)
    assert sum(counted) < 100_000 and max(counted) < 10_000


def test_huge_result_is_truncated_off_the_event_loop():
    import threading

    threads = []

    def count(s: str) -> int:
        threads.append(threading.current_thread())
        return len(s)

    @tool
    async def huge() -> str:
        return "z" * 5_000_000

    result = call(huge, max_output_tokens=50, count_tokens=count)
    assert len(result.text) <= 50 and "truncated" in result.text
    assert threads and threading.main_thread() not in threads


def test_inline_tool_runs_on_the_loop_thread_with_the_same_checks_and_errors():
    import threading

    ran_on = []

    @tool(inline=True)
    def double(x: int) -> str:
        ran_on.append(threading.current_thread())
        if x < 0:
            raise SystemExit(2)
        return str(2 * x)

    assert double.inline and get_tool("calculator").inline and get_tool("answer").inline
    assert call(double, x=21) == ToolResult(text="42")
    assert ran_on == [threading.main_thread()]  # no worker thread
    assert call(double, x=-1) == ToolResult(text="Error: SystemExit: 2", error=True)
    assert call(double, y=1).error  # argument checks as for any tool
    assert call(double, max_output_tokens=1, x=10**10).text == "2000"  # truncated like any result: 4 characters


def test_inline_is_refused_for_async_functions():
    async def later(x: int) -> str:
        return str(x)

    with pytest.raises(TypeError, match="inline=True is for sync functions"):
        tool(later, inline=True)
