"""An engine that replays given assistant turns, for building demonstrations.

Running demonstrations through the real rollout loop with this engine gives
SFT data that is token-for-token what an RL episode with the same turns would
contain: same prompt ids, same observation ids, same stop token.
"""

from __future__ import annotations

from typing import Iterable

from actors.engines.base import Engine, Generation, SamplingSettings


class ScriptedEngine(Engine):
    """Answers the i-th ``generate`` call with the i-th scripted text (+ stop id)."""

    def __init__(self, tokenizer, turns: list[str], stop_id: int):
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.stop_id = stop_id
        self.calls = 0

    async def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        if self.calls >= len(self.turns):
            raise RuntimeError(f"script has {len(self.turns)} turns; the episode asked for turn {self.calls + 1}")
        text = self.turns[self.calls]
        self.calls += 1
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop_id]
        return Generation(ids, [0.0] * len(ids), "stop", self.version)

    def load_weights(self, named_tensors: Iterable, version: int, adopt: bool = False) -> None:
        raise NotImplementedError("a scripted engine has no weights")
