"""Prompt datasets as the learner hands them out: read and checked (``envs.data``),
then, with ``data.filter_overlong_prompts``, without the prompts longer than
``data.max_prompt_length`` tokens; without it, overlong prompts follow
``data.truncation`` (``error``, or cut from the ``left``/``right`` of the row's
prompt text until the rendered prompt fits).

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


def _renderer(cfg: RelayConfig):
    from transformers import AutoTokenizer

    from envs.agents import agent_for_config

    tokenizer = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path)
    return tokenizer, agent_for_config(cfg, tokenizer)


def _lengths(tokenizer, agent, rows: list[dict[str, Any]]) -> list[int]:
    texts = [agent.prompt_text(agent.start(row)) for row in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def prompt_lengths(cfg: RelayConfig, rows: list[dict[str, Any]]) -> list[int]:
    """Tokens of each row's rendered prompt, [len(rows)], with the agent and tokenizer of ``cfg``:
    the tokenizer read without transformers when it can be (``envs.fast_tokenizer``, the same
    ids; well under a second instead of 2-10 s of transformers' tokenizer imports), else
    transformers'."""
    from envs.fast_tokenizer import load_fast_tokenizer

    tokenizer = load_fast_tokenizer(cfg.actor_rollout_ref.model.path)
    if tokenizer is None:
        return _lengths(*_renderer(cfg), rows)
    from envs.agents import agent_for_config

    return _lengths(tokenizer, agent_for_config(cfg, tokenizer), rows)


def _cut(row: dict[str, Any], key: str, tokenizer, tokens: int, side: str) -> dict[str, Any] | None:
    """``row`` with ``tokens`` fewer tokens of prompt text (the last user message of a chat
    list), cut from the ``left`` or ``right``; None when the text is not that long."""
    prompt = row[key]
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(ids) - tokens
    if keep <= 0:
        return None
    text = tokenizer.decode(ids[-keep:] if side == "left" else ids[:keep])
    new = text if isinstance(prompt, str) else [*prompt[:-1], {**prompt[-1], "content": text}]
    return {**row, key: new}


def truncate_overlong(cfg: RelayConfig, rows: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """``rows`` with every prompt longer than ``data.max_prompt_length`` cut to fit
    (``data.truncation`` left/right) or, with ``error``, a ``DataError`` naming the first."""
    data = cfg.data
    limit = data.max_prompt_length
    tokenizer, agent = _renderer(cfg)
    lengths = _lengths(tokenizer, agent, rows)
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over and data.truncation == "error":
        raise DataError(
            ", ".join(data.train_files if what == "train" else data.val_files), None,
            f"{len(over)} {what} prompts are longer than data.max_prompt_length={limit} tokens (first: row {over[0] + 1}, "
            f"{lengths[over[0]]} tokens) and data.truncation=error; raise data.max_prompt_length, or set "
            f"data.filter_overlong_prompts=true or data.truncation=left|right",
        )
    out = list(rows)
    for i in over:
        row, n = rows[i], lengths[i]
        for _ in range(4):  # re-tokenizing the cut text can shift a token or two
            row = _cut(row, data.prompt_key, tokenizer, n - limit, data.truncation)
            if row is None:
                raise DataError(", ".join(data.train_files if what == "train" else data.val_files), None,
                                f"{what} row {i + 1} cannot be cut to data.max_prompt_length={limit} tokens: the prompt "
                                f"around its text (template, system prompt, tools) is already longer")
            n = _lengths(tokenizer, agent, [row])[0]
            if n <= limit:
                break
        out[i] = row
    if over:
        log.warning("%s data: cut %d of %d prompts to data.max_prompt_length=%d tokens (data.truncation=%s)",
                    what, len(over), len(rows), limit, data.truncation)
    return out


def drop_overlong(rows: list[dict[str, Any]], lengths: list[int], max_tokens: int) -> tuple[list[dict[str, Any]], list[int]]:
    """(rows of at most ``max_tokens`` tokens, indices of the dropped rows), order kept."""
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    kept = [row for row, n in zip(rows, lengths) if n <= max_tokens]
    dropped = [i for i, n in enumerate(lengths) if n > max_tokens]
    return kept, dropped


def load_prompts(cfg: RelayConfig, files: list[str], what: str) -> list[dict[str, Any]]:
    """The rows of ``files`` (``what``: "train"/"validation", for messages), overlong ones dropped."""
    if what == "train" and cfg.env.type == "verifiers":  # the environment's taskset instead of files
        from envs.verifiers_env import task_rows

        rows = task_rows(cfg.env.id, cfg.env.args, cfg.env.size, cfg.data.prompt_key)
        files = [f"env.id={cfg.env.id}"]
    elif what == "train" and cfg.data.source:  # generated prompts (reasoning_gym:NAME) instead of files
        from envs.tasks.rgym import source_rows

        rows = source_rows(cfg.data.source, cfg.data.source_options, cfg.data.seed)
        files = [cfg.data.source]
    else:
        rows = load_rows(files, cfg.data.prompt_key)
    if not cfg.data.filter_overlong_prompts:
        return truncate_overlong(cfg, rows, what)
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
