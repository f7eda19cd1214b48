"""The multi-turn rollout loop: one episode, token-exact.

The prompt is tokenized once. Each turn, the engine samples ids that are
appended as they are (loss mask 1, with their log-probs and the policy version
that sampled them); the agent parses the decoded turn; tools run; the
observation text the agent returns is tokenized on its own and appended
(loss mask 0). Earlier tokens are never re-tokenized, so the learner trains on
exactly what the model saw and said.

Many episodes run at once as asyncio tasks: while one waits on a tool, the
engine batches the others' turns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.engines.base import Engine, SamplingSettings
from envs.base import Action, Agent, ToolCall, ToolResult
from envs.lru import SizedLRU


class PromptTooLong(ValueError):
    """A dataset row whose prompt does not fit the model's context: bad input, not a bug."""


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    """Assistant turns per episode."""
    max_tokens_per_turn: int
    """Sampled tokens per assistant turn."""
    max_response_tokens: int
    """Budget for everything after the prompt (sampled and observation tokens)."""
    max_context: int
    """The model's context length: prompt plus response never exceed it."""


@dataclass
class Episode:
    """One finished episode, before scoring."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    final_answer: str | None = None
    tool_calls: list[str] = field(default_factory=list)
    tool_errors: int = 0
    num_turns: int = 0
    truncated: bool = False
    finish_reason: str = ""
    gen_tokens: int = 0
    gen_time_s: float = 0.0
    tool_time_s: float = 0.0
    turn_ends: list[int] = field(default_factory=list)
    """Index in ``response_ids`` of each assistant turn's last sampled token."""
    turn_tool_errors: list[int] = field(default_factory=list)
    """Per assistant turn: its tool calls that failed (unparsable: 1, unless the turn was cut by its
    token limit; each tool result with ``error``: 1)."""
    reward: dict[str, float] | None = None
    """Set when the environment scored the episode itself (an external agent's returned reward):
    the actor's ``Scorer`` then uses it instead of the configured reward function."""

    def response_text(self, tokenizer) -> str:
        return decode(tokenizer, self.response_ids)

    def sequences(self) -> list["Episode"]:
        """The episode's training sequences, in order: itself (an external agent's episode whose
        history was rewritten has several: ``actors.external.ExternalEpisode``)."""
        return [self]


class ToolBox:
    """The tools of one agent, called with the configured limits."""

    def __init__(self, tools: list, timeout_s: float, max_output_tokens: int, count_tokens: Callable[[str], int] | None):
        self.tools = {t.name: t for t in tools}
        self.timeout_s = timeout_s
        self.max_output_tokens = max_output_tokens
        self.count_tokens = count_tokens

    async def call(self, call: ToolCall) -> ToolResult:
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolResult(text=f"Error: unknown tool {call.name!r}; available: {sorted(self.tools)}", error=True)
        return await tool.call(
            call.arguments,
            timeout_s=self.timeout_s,
            max_output_tokens=self.max_output_tokens,
            count_tokens=self.count_tokens,
        )


ENCODE_CACHE_BYTES = 16 << 20
"""Per tokenizer, the budget of ``encode``'s kept ids: texts and ids of the latest distinct texts (an id
kept as a Python int in a tuple: counted as 36 bytes)."""

_ENCODED: "weakref.WeakKeyDictionary[object, SizedLRU]" = weakref.WeakKeyDictionary()


def encode(tokenizer, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]``. A transformers tokenizer backed by a
    ``tokenizers.Tokenizer`` is asked through that backend directly (``plain_backend``): the same call
    transformers makes, without its ~0.012 ms of Python around it; and a text it encoded lately (within
    ``ENCODE_CACHE_BYTES``) is not encoded again (the backend's encode is a function of the text: its
    settings are those ``plain_backend`` checks, and the one that may differ is part of the key). A
    group's chains start from one prompt and often get the same tool results: on the demo's episodes
    the backend took 0.02-0.04 ms a text, ~40% of the episode loop's own time.

    A text the backend has not seen whole is cut at its added tokens (``SpecialSplit``, where the
    backend's pipeline allows it) and each piece between them encoded (or found) on its own: a
    prompt's system text and a template's headers around a tool result are encoded once, not once
    per text that holds them (the tiny demo tokenizer's backend takes ~0.9 us a token: a third of the
    actor loop's Python on a batch of new texts, sampled with py-spy)."""
    backend = plain_backend(tokenizer)
    if backend is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    cache = _ENCODED.get(tokenizer)
    if cache is None:
        cache = _ENCODED[tokenizer] = SizedLRU(ENCODE_CACHE_BYTES)
    key = (text, backend.encode_special_tokens)
    ids = cache.get(key)
    if ids is None:
        split = None if backend.encode_special_tokens else SpecialSplit.of(tokenizer, backend)
        if split is None:
            ids = tuple(backend.encode(text, add_special_tokens=False).ids)
        else:
            ids = split.encode(text, lambda piece: _encode_piece(cache, backend, piece))
        cache.put(key, ids, len(text) + 36 * len(ids))
    return list(ids)


def _encode_piece(cache: SizedLRU, backend, piece: str) -> tuple[int, ...]:
    key = (piece, False)
    ids = cache.get(key)
    if ids is None:
        ids = tuple(backend.encode(piece, add_special_tokens=False).ids)
        cache.put(key, ids, len(piece) + 36 * len(ids))
    return ids


SPLIT_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
"""Normalizers (``tokenizer.json`` ``type``) that map each character on its own (``Sequence``s of them too)."""

SPLIT_PRE_TOKENIZERS = frozenset({"Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "ByteLevel"})
"""Pre-tokenizers that split a piece by its own content alone (``ByteLevel`` only without ``add_prefix_space``;
``Sequence``s of them too). Not ``Metaspace``: its ``prepend_scheme="first"`` marks the text's first piece."""


class SpecialSplit:
    """A text cut at the added tokens a ``tokenizers.Tokenizer`` takes out before anything else.

    The backend's ``encode`` first finds its added tokens that match the raw text (``normalized:
    false``; leftmost, longest first), then normalizes, pre-tokenizes and encodes each piece between
    them by itself. So encoding the pieces one by one and putting the added tokens' ids between
    them gives the same ids, when nothing in the pipeline looks past a piece: no added token strips
    the whitespace beside it or must stand alone as a word (``lstrip``, ``rstrip``, ``single_word``),
    the normalizer and pre-tokenizer work within a piece (``SPLIT_NORMALIZERS``,
    ``SPLIT_PRE_TOKENIZERS``) and the model samples nothing (no BPE dropout). ``of`` answers None
    for any other tokenizer. ``tests/test_rollout.py`` compares the ids with the backend's own."""

    def __init__(self, pattern: "re.Pattern[str]", ids: dict[str, int]):
        self.pattern = pattern
        self.ids = ids

    @classmethod
    def of(cls, tokenizer, backend) -> "SpecialSplit | None":
        """The split for ``backend`` (``tokenizer._tokenizer``), read once from its ``tokenizer.json``
        (again when its vocabulary grows: tokens added since), or None where it would change the ids."""
        size = backend.get_vocab_size(with_added_tokens=True)
        known = _SPLITS.get(tokenizer)
        if known is not None and known[0] is backend and known[1] == size:
            return known[2]
        split = cls._read(backend)
        _SPLITS[tokenizer] = (backend, size, split)
        return split

    @classmethod
    def _read(cls, backend) -> "SpecialSplit | None":
        import json

        spec = json.loads(backend.to_str())
        if not _within_pieces(spec.get("normalizer"), SPLIT_NORMALIZERS) or not _within_pieces(spec.get("pre_tokenizer"), SPLIT_PRE_TOKENIZERS):
            return None
        if (spec.get("model") or {}).get("dropout") not in (None, 0, 0.0):
            return None
        tokens = spec.get("added_tokens") or []
        if not tokens or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in tokens):
            return None
        raw = {t["content"]: t["id"] for t in tokens if not t.get("normalized") and t["content"]}
        if not raw:
            return None
        import re

        alternatives = sorted(raw, key=len, reverse=True)  # at one position the longest matches first
        return cls(re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")"), raw)

    def encode(self, text: str, encode_piece: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
        """The ids of ``text``: ``encode_piece`` of each piece between added tokens, the tokens' own ids between."""
        parts = self.pattern.split(text)  # piece, token, piece, ..., piece
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.ids[part])
            elif part:
                ids.extend(encode_piece(part))
        return tuple(ids)


_SPLITS: "weakref.WeakKeyDictionary[object, tuple[object, int, SpecialSplit | None]]" = weakref.WeakKeyDictionary()


def _within_pieces(spec: dict | None, allowed: frozenset[str]) -> bool:
    """Whether a normalizer or pre-tokenizer (its ``tokenizer.json`` entry) works within each piece alone."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_within_pieces(s, allowed) for s in spec.get("normalizers") or spec.get("pretokenizers") or [])
    if kind == "ByteLevel":
        return kind in allowed and not spec.get("add_prefix_space")
    return kind in allowed


def decode(tokenizer, ids: list[int]) -> str:
    """``tokenizer.decode(ids, skip_special_tokens=False)``; through the backend (``plain_backend``) when
    the tokenizer does not clean up spaces after it (``clean_up_tokenization_spaces`` off, as Qwen's and
    Llama's are): transformers' own call converts the ids one by one first. Ids decoded lately are not
    decoded again (``_DECODED``)."""
    backend = plain_backend(tokenizer)
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return tokenizer.decode(ids, skip_special_tokens=False)
    cache = _DECODED.get(tokenizer)
    if cache is None:
        cache = _DECODED[tokenizer] = SizedLRU(ENCODE_CACHE_BYTES)
    key = tuple(ids)
    text = cache.get(key)
    if text is None:
        text = backend.decode(ids, skip_special_tokens=False)
        cache.put(key, text, len(text) + 36 * len(key))
    return text


_DECODED: "weakref.WeakKeyDictionary[object, SizedLRU]" = weakref.WeakKeyDictionary()
"""Per tokenizer, ``decode``'s latest texts (a group's chains often sample the same turn), within
``ENCODE_CACHE_BYTES``."""


def forget_texts() -> None:
    """Empty ``encode``'s and ``decode``'s caches of every tokenizer: what follows meets its texts as new
    (``bench/bench_actor_loop.py`` replays each batch so; nothing else needs it, the caches are bounded)."""
    for caches in (_ENCODED, _DECODED):
        for cache in list(caches.values()):
            cache.clear()


_PLAIN_CLASSES: dict[type, bool] = {}


def plain_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` whose ``encode(text, add_special_tokens=False).ids`` is exactly what
    ``tokenizer(text, add_special_tokens=False)["input_ids"]`` returns (and whose ``decode`` is what
    ``tokenizer.decode`` calls), or None. That holds for transformers' ``TokenizersBackend``
    (``PreTrainedTokenizerFast``) whose class keeps its ``__call__``, ``_encode_plus``, ``decode`` and
    ``_decode`` (they run ``encode_batch([text])`` on the backend with truncation and padding off and
    ``encode_special_tokens = split_special_tokens``, and the backend's ``decode``) and has no input/target
    modes, while the backend's state is that: no truncation, no padding, the same ``encode_special_tokens``
    (else transformers would change it first; the full call then runs, and resets it). Read from
    transformers 5.19; ``tests/test_rollout.py`` checks the equality on the installed version."""
    cls = type(tokenizer)
    plain = _PLAIN_CLASSES.get(cls)
    if plain is None:
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:
            TokenizersBackend = None
        plain = _PLAIN_CLASSES[cls] = (
            TokenizersBackend is not None and issubclass(cls, TokenizersBackend)
            and cls.__call__ is TokenizersBackend.__call__ and cls._encode_plus is TokenizersBackend._encode_plus
            and cls.decode is TokenizersBackend.decode and cls._decode is TokenizersBackend._decode
            and not hasattr(cls, "_switch_to_input_mode")
        )
    if not plain:
        return None
    backend = tokenizer._tokenizer
    if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens != bool(tokenizer.split_special_tokens):
        return None
    return backend


async def run_episode(
    engine: Engine,
    agent: Agent,
    tokenizer,
    toolbox: ToolBox,
    row: dict[str, Any],
    limits: EpisodeLimits,
    settings: SamplingSettings,
) -> Episode:
    """Roll out one episode of ``agent`` on ``row``."""
    conv = agent.start(row)
    ep = Episode(prompt_ids=encode(tokenizer, agent.prompt_text(conv)))
    budget = min(limits.max_response_tokens, limits.max_context - len(ep.prompt_ids))
    if budget <= 0:
        raise PromptTooLong(f"prompt of {len(ep.prompt_ids)} tokens leaves no room in a context of {limits.max_context}")
    stop_ids = set(settings.stop_token_ids)
    full_turn = dataclasses.replace(settings, max_tokens=limits.max_tokens_per_turn)  # every turn with room for it
    for turn in range(limits.max_turns):
        room = budget - len(ep.response_ids)
        if room <= 0:
            ep.truncated, ep.finish_reason = True, "token_budget"
            break
        turn_settings = full_turn if room >= limits.max_tokens_per_turn else dataclasses.replace(settings, max_tokens=room)
        t0 = time.perf_counter()
        gen = await engine.generate(ep.prompt_ids + ep.response_ids, turn_settings)
        ep.gen_time_s += time.perf_counter() - t0
        ep.num_turns += 1
        ep.gen_tokens += len(gen.token_ids)
        ep.response_ids += gen.token_ids
        ep.loss_mask += [1] * len(gen.token_ids)
        ep.logprobs += gen.logprobs
        ep.versions += [gen.version] * len(gen.token_ids)
        ep.turn_ends.append(len(ep.response_ids) - 1)
        body = gen.token_ids[:-1] if gen.token_ids and gen.token_ids[-1] in stop_ids else gen.token_ids
        text = decode(tokenizer, body)
        action: Action = agent.parse(text)
        agent.add_assistant(conv, text)
        ep.turn_tool_errors.append(int(action.parse_error is not None and gen.finish_reason != "length"))
        if gen.finish_reason == "length":
            # The turn was cut off: whatever it was going to say is unfinished.
            ep.truncated, ep.finish_reason = True, "length"
            ep.final_answer = action.final_answer if action.final else None
            break
        if action.final:
            ep.final_answer, ep.finish_reason = action.final_answer, "answer"
            break
        t0 = time.perf_counter()
        calls = action.tool_calls  # one call is awaited as it is: gather would wrap it in a task of its own
        results = [await toolbox.call(calls[0])] if len(calls) == 1 else await asyncio.gather(*(toolbox.call(c) for c in calls))
        ep.tool_time_s += time.perf_counter() - t0
        ep.tool_calls += [c.name for c in action.tool_calls]
        ep.tool_errors += sum(r.error for r in results)
        ep.turn_tool_errors[-1] += sum(r.error for r in results)
        obs_ids = encode(tokenizer, agent.observation_text(conv, action, list(results)))
        ended = next((r.final_answer for r in results if r.final_answer is not None), None)
        if ended is not None:
            ep.final_answer, ep.finish_reason = ended, "answer"
            break
        if len(ep.response_ids) + len(obs_ids) >= budget:
            ep.truncated, ep.finish_reason = True, "token_budget"
            break
        ep.response_ids += obs_ids
        ep.loss_mask += [0] * len(obs_ids)
        ep.logprobs += [0.0] * len(obs_ids)
        ep.versions += [-1] * len(obs_ids)
    else:
        ep.truncated, ep.finish_reason = True, "max_turns"
    ep.messages = conv.messages
    return ep
