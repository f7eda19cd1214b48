"""Question-answering rewards with SQuAD normalisation: ``qa_em`` and ``qa_f1_reward``.

The ground truth is the row's ``answer`` field: a string or a list of accepted
strings (the best match counts).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from envs.rewards.base import TrajectoryInfo, reward


def normalize_answer(text: str) -> str:
    """SQuAD: lower case, drop punctuation and articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _truths(answer: str | list[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else [str(a) for a in answer]


@reward("qa_em")
def qa_em(final_answer: str | None, trajectory: TrajectoryInfo, answer: str | list[str]) -> float:
    """1.0 when the normalised final answer equals a normalised accepted answer."""
    if final_answer is None:
        return 0.0
    return float(any(normalize_answer(final_answer) == normalize_answer(t) for t in _truths(answer)))


@reward("qa_f1_reward")
def qa_f1_reward(final_answer: str | None, trajectory: TrajectoryInfo, answer: str | list[str]) -> float:
    """Best token-level F1 of the final answer against the accepted answers."""
    if final_answer is None:
        return 0.0
    return max(f1_score(final_answer, t) for t in _truths(answer))
