"""Prompt datasets as the learner hands them out: read and checked (``envs.data``),
then, with ``data.filter_overlong_prompts``, without the prompts longer than
``data.max_prompt_length`` tokens.

A prompt's length is measured as the actor will see it: the row rendered by the
configured agent (template, system prompt, tool descriptions) and tokenized by
the policy's tokenizer, so a kept prompt never fails at rollout time for its
length and a dropped one is reported once, at start-up, instead of every epoch.
"""

from __future__ import annotations

import logging
from typing import Any

from configs.schema import RelayConfig
from envs.data import DataError, load_rows

log = logging.getLogger(__name__)


def prompt_lengths(cfg: RelayConfig, rows: list[dict[str, Any]]) -> list[int]:
    """Tokens of each row's rendered prompt, [len(rows)], with the agent and tokenizer of ``cfg``."""
    from transformers import AutoTokenizer

    from envs.agents import agent_for_config

    tokenizer = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path)
    agent = agent_for_config(cfg, tokenizer)
    texts = [agent.prompt_text(agent.start(row)) for row in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def drop_overlong(rows: list[dict[str, Any]], lengths: list[int], max_tokens: int) -> tuple[list[dict[str, Any]], list[int]]:
    """(rows of at most ``max_tokens`` tokens, indices of the dropped rows), order kept."""
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    kept = [row for row, n in zip(rows, lengths) if n <= max_tokens]
    dropped = [i for i, n in enumerate(lengths) if n > max_tokens]
    return kept, dropped


def load_prompts(cfg: RelayConfig, files: list[str], what: str) -> list[dict[str, Any]]:
    """The rows of ``files`` (``what``: "train"/"validation", for messages), overlong ones dropped."""
    rows = load_rows(files, cfg.data.prompt_key)
    if not cfg.data.filter_overlong_prompts:
        return rows
    limit = cfg.data.max_prompt_length
    lengths = prompt_lengths(cfg, rows)
    kept, dropped = drop_overlong(rows, lengths, limit)
    if not kept:
        raise DataError(
            ", ".join(files), None,
            f"every {what} prompt is longer than data.max_prompt_length={limit} tokens (shortest {min(lengths)}); "
            f"raise data.max_prompt_length or set data.filter_overlong_prompts=false",
        )
    if dropped:
        longest = max(lengths[i] for i in dropped)
        log.warning(
            "%s data: dropped %d of %d prompts longer than data.max_prompt_length=%d tokens (longest %d; first dropped: row %d)",
            what, len(dropped), len(rows), limit, longest, dropped[0],
        )
    return kept
