"""Agent type ``external``: the episode is played by user code through the actor's OpenAI endpoint.

The harness named by ``agent.entrypoint`` (see ``actors/external.py``) sends
the messages and tool schemas it likes; this class only renders the dataset
row's prompt the ``hf`` way (chat template, tool schemas in the template), so
the learner's prompt-length filter and the launcher's checks see a prompt like
the one the harness will most likely send.
"""

from __future__ import annotations

from envs.agents.hf import HFAgent


class ExternalAgent(HFAgent):
    pass
