"""The actor process: asks the learner for work, rolls it out, streams it back.

Loop: register; then repeatedly (1) if the learner has published a newer
policy, fetch it and load it into the engine (``between_episodes``: stop
admitting, let in-flight episodes finish, load, resume; ``in_flight``: load at
the engine's next batch boundary while episodes continue, each turn tagged
with the version that sampled it); (2) ask for as many prompt groups as there
is room for (``max_concurrent_episodes``), which the learner grants only
within the staleness bound; (3) run each group's episodes concurrently and
push each scored trajectory as soon as it is done. A heartbeat task keeps the
learner aware of the actor while long batches run.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass

import torch

from actors.engines.base import Engine, SamplingSettings
from actors.rollout import Episode, EpisodeLimits, PromptTooLong, ToolBox, run_episode
from envs.base import Agent
from envs.rewards import RewardError, Scores, run_reward
from protocol import messages as m
from protocol.transport import ActorClient, LearnerRefused, TransportTimeout
from protocol.weights import Rows, WeightsReceiver, WeightsRejected, make_receiver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSettings:
    actor_id: str
    group_concurrency: int
    """Most episodes in flight at once."""
    sampling: SamplingSettings
    limits: EpisodeLimits
    weight_update_mode: str
    heartbeat_interval_s: float
    request_timeout_s: float
    startup_timeout_s: float
    push_timeout_s: float
    weights: str = "zmq"
    """Weight channel (``transport.weights``): ``zmq`` | ``filesystem`` | ``nccl``."""
    weights_dir: str | None = None
    """Shared directory for ``weights=filesystem``."""
    val_temperature: float = 0.0
    """Sampling temperature of validation items (``rollout.val_temperature``; 0 = greedy)."""
    work_wait_s: float = 1.0
    """Longest the learner may hold a work request it cannot grant yet (a long poll: the reply comes
    the moment there is work or a new version); 0 = answer at once."""


class Scorer:
    """Applies the configured reward function to a finished episode."""

    def __init__(self, reward_fn, tokenizer):
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer

    def __call__(self, ep: Episode, row: dict) -> Scores:
        from envs.rewards import TrajectoryInfo

        if ep.reward is not None:  # the environment scored it (an external agent's reward)
            return Scores(ep.reward)
        info = TrajectoryInfo(
            messages=ep.messages,
            num_turns=ep.num_turns,
            tool_calls=ep.tool_calls,
            truncated=ep.truncated,
            response_text=lambda: ep.response_text(self.tokenizer),  # decoded only if the reward reads it
            turn_tool_errors=list(ep.turn_tool_errors),
        )
        return self.reward_fn(ep.final_answer, info, **row)


def turn_rewards_by_run(loss_mask: list[int], turn_ends: list[int], rewards: list[float]) -> list[float]:
    """``rewards`` (one per assistant turn, turn ``k`` ending at ``turn_ends[k]``) as one per run of
    sampled tokens (``loss_mask`` 1) in order, which is how ``learner.batch.collate`` places
    ``Trajectory.turn_rewards``: each on its run's last token. Turns with no observation between
    them form one run and share it (summed); a turn that sampled nothing goes to the next run (the
    last one if none follows). Trailing zeros are dropped ([] when every reward is 0)."""
    if not any(rewards):  # outcome-only rewards, the common case: nothing to place
        return []
    ends = m.sampled_run_ends(loss_mask)
    out = [0.0] * len(ends)
    if ends:
        for end, r in zip(turn_ends, rewards):
            out[min(bisect.bisect_left(ends, end), len(ends) - 1)] += r
    while out and out[-1] == 0.0:
        out.pop()
    return out


def to_trajectory(actor_id: str, item: m.WorkItem, chain: int, ep: Episode, scores: Scores, greedy: bool = False,
                  segment: int = 0, num_segments: int = 1, first_turn: int = 0) -> m.Trajectory:
    """``ep`` (one training sequence of the chain's episode) as a ``Trajectory``. ``first_turn``: the
    episode-wide index of the sequence's first assistant turn (segments hold consecutive turns), so
    it carries ``scores.turn_rewards`` of its own turns, one per run of its loss mask."""
    tools: dict[str, int] = {}
    for name in ep.tool_calls:
        tools[name] = tools.get(name, 0) + 1
    return m.Trajectory(
        actor_id=actor_id,
        sample_id=item.sample_id,
        chain=chain,
        prompt_ids=m.pack(ep.prompt_ids, "int32"),
        response_ids=m.pack(ep.response_ids, "int32"),
        loss_mask=m.pack(ep.loss_mask, "uint8"),
        logprobs=m.pack(ep.logprobs, "float32"),
        versions=m.pack(ep.versions, "int32"),
        reward=float(scores["reward"]),
        reward_components={k: float(v) for k, v in scores.items()},
        turn_rewards=turn_rewards_by_run(ep.loss_mask, ep.turn_ends, scores.turn_rewards[first_turn : first_turn + len(ep.turn_ends)]),
        stats=m.EpisodeStats(
            num_turns=ep.num_turns,
            tool_calls=tools,
            tool_errors=ep.tool_errors,
            truncated=ep.truncated,
            finish_reason=ep.finish_reason,
            gen_tokens=ep.gen_tokens,
            gen_time_s=ep.gen_time_s,
            tool_time_s=ep.tool_time_s,
        ),
        greedy=greedy,
        validation=item.validation,
        final_answer=ep.final_answer or "",
        segment=segment,
        num_segments=num_segments,
    )


def to_trajectories(actor_id: str, item: m.WorkItem, chain: int, ep: Episode, scores: Scores, greedy: bool = False) -> list[m.Trajectory]:
    """The scored episode's training sequences (``ep.sequences()``) as trajectories, segment ``k``
    of ``n``, each with the turn rewards of its own turns; a validation item sends the last only."""
    seqs = ep.sequences()
    first = len(seqs) - 1 if item.validation else 0  # validation scores the episode: its last sequence is enough
    turn0 = [sum(len(s.turn_ends) for s in seqs[:k]) for k in range(len(seqs))]  # each sequence's first turn
    return [to_trajectory(actor_id, item, chain, s, scores, greedy=greedy, segment=k, num_segments=len(seqs), first_turn=turn0[k])
            for k, s in enumerate(seqs) if k >= first]


def as_tensor(a) -> torch.Tensor | Rows:
    """A tensor sharing ``a``'s memory (no copy); a ``Rows`` piece as it is. Received zmq frames are
    read-only; engines only read the tensors they load (they copy them, or serve them as they are,
    never write)."""
    if isinstance(a, (torch.Tensor, Rows)):
        return a
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


class Actor:
    def __init__(self, settings: ActorSettings, client: ActorClient, engine: Engine, agent: Agent, tokenizer, toolbox: ToolBox, scorer: Scorer,
                 rollout=run_episode):
        self.s = settings
        self.client = client
        self.engine = engine
        self.agent = agent
        self.tokenizer = tokenizer
        self.toolbox = toolbox
        self.scorer = scorer
        self.rollout = rollout
        """Plays one episode (``actors.rollout.run_episode``, or an external agent's runner, same signature)."""
        self.in_flight = 0
        self.learner_version = 0
        self.weights_timeouts = 0
        self.stop = False
        self.trajectories_sent = 0
        self.failures: list[BaseException] = []
        self.weights: WeightsReceiver | None = None
        self.weights_refused = 0
        self.registrations = 0
        self._groups: set[asyncio.Task] = set()
        self._register_lock = asyncio.Lock()

    async def register(self) -> m.Welcome:
        welcome = await self.client.call(
            m.Register(actor_id=self.s.actor_id, host=socket.gethostname(), pid=os.getpid(), engine=type(self.engine).__name__),
            timeout_s=self.s.startup_timeout_s,
        )
        self.registrations += 1
        self.learner_version = welcome.learner_version
        log.info("%s registered; learner at v%d", self.s.actor_id, self.learner_version)
        return welcome

    async def call(self, msg: m.Message, timeout_s: float) -> m.Message:
        """One control request. If the learner no longer knows this actor (it was declared dead,
        e.g. while the process was paused), register again and retry once: the learner has already
        requeued the groups this actor held, so the groups still running here are cancelled."""
        try:
            return await self.client.call(msg, timeout_s=timeout_s)
        except LearnerRefused as e:
            if e.code != "unregistered":
                raise
        await self.register_again()
        return await self.client.call(msg, timeout_s=timeout_s)

    async def register_again(self) -> None:
        async with self._register_lock:
            log.warning("%s: the learner declared this actor dead; registering again (its work was requeued)", self.s.actor_id)
            current = asyncio.current_task()
            for g in list(self._groups):
                if g is not current:
                    g.cancel()
            await self.register()

    async def run(self) -> None:
        # one tiny request first: an engine's first batch can take seconds (allocation, kernels),
        # and an actor should register only once it can take work at full speed
        await self.engine.generate([0, 1], SamplingSettings(max_tokens=2, temperature=0.0))
        welcome = await self.register()
        self.weights = make_receiver(
            self.s.weights, welcome, client=self.client, actor_id=self.s.actor_id,
            weights_dir=self.s.weights_dir, timeout_s=self.s.startup_timeout_s,
        )
        await self.sync_weights()
        heartbeat = asyncio.create_task(self.heartbeat())
        groups = self._groups
        try:
            while not self.stop:
                self.raise_failures()
                if self.learner_version > self.engine.version:
                    if self.s.weight_update_mode == "between_episodes" and groups:
                        await asyncio.wait(set(groups), timeout=self.s.push_timeout_s)  # drain, then update
                        continue
                    await self.sync_weights()
                room = self.s.group_concurrency - self.in_flight
                grant = None
                if room > 0:
                    grant = await self.call(
                        m.WorkRequest(actor_id=self.s.actor_id, version=self.engine.version, max_groups=room, wait_s=self.s.work_wait_s),
                        timeout_s=self.s.request_timeout_s,
                    )
                    self.learner_version = grant.learner_version
                    if grant.stop:
                        log.info("%s: learner says stop (%s)", self.s.actor_id, grant.reason)
                        break
                    for item in grant.items:
                        task = asyncio.create_task(self.run_group(item))
                        groups.add(task)
                        task.add_done_callback(groups.discard)
                if grant is None or not grant.items:
                    if groups:
                        await asyncio.wait(set(groups), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                    else:
                        await asyncio.sleep(0.05)
        finally:
            heartbeat.cancel()
            for g in list(groups):
                g.cancel()
            await asyncio.gather(*groups, heartbeat, return_exceptions=True)
        self.raise_failures()

    def raise_failures(self) -> None:
        if self.failures:
            raise RuntimeError(f"{self.s.actor_id}: an episode group failed") from self.failures[0]

    async def sync_weights(self) -> None:
        t0 = time.perf_counter()
        # all bytes arrived and verified before anything is loaded: never a half-applied version
        try:
            got = await self.weights.fetch(self.engine.version, timeout_s=self.s.request_timeout_s)
        except LearnerRefused as e:
            if e.code != "unregistered":
                raise
            await self.register_again()
            got = await self.weights.fetch(self.engine.version, timeout_s=self.s.request_timeout_s)
        except TransportTimeout as e:  # e.g. this process was paused mid-request: ask again on the next sync
            self.weights_timeouts += 1
            log.warning("%s: weights request timed out, still serving v%d; asking again: %s", self.s.actor_id, self.engine.version, e)
            return
        if got is None:
            return
        version, stream = got
        t1 = time.perf_counter()
        # a stream: the engine stages each bucket as it arrives (verified first) and swaps at the end
        named = ((name, as_tensor(a)) for name, a in stream)
        try:
            await asyncio.to_thread(self.engine.load_weights, named, version, self.weights.private_buffers)
        except WeightsRejected as e:  # corrupt or incomplete: nothing was applied, retried on the next sync
            self.weights_refused += 1
            log.error("%s: refused weights v%d, still serving v%d: %s", self.s.actor_id, version, self.engine.version, e)
            return
        log.info("%s: now serving v%d (fetch %.2fs, load %.2fs)", self.s.actor_id, version, t1 - t0, time.perf_counter() - t1)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.s.heartbeat_interval_s)
            ack = await self.call(
                m.Heartbeat(actor_id=self.s.actor_id, version=self.engine.version, in_flight=self.in_flight),
                timeout_s=self.s.request_timeout_s,
            )
            self.learner_version = max(self.learner_version, ack.learner_version)
            if ack.stop:
                self.stop = True

    async def run_group(self, item: m.WorkItem) -> None:
        n = item.group_size + (1 if item.greedy_baseline else 0)
        self.in_flight += 1
        try:
            jobs = [self.episode(item, chain, greedy=chain == item.group_size) for chain in range(n)]
            for trajs in await asyncio.gather(*jobs):
                for traj in trajs:  # a chain's training sequences (one, unless an external agent's history was rewritten)
                    await self.client.push(traj, timeout_s=self.s.push_timeout_s)
                    self.trajectories_sent += 1
        except (PromptTooLong, RewardError) as e:  # bad input or a hung reward: tell the learner, serve the other groups
            log.error("%s: cannot roll out %s: %s", self.s.actor_id, item.sample_id, e)
            await self.call(
                m.WorkFailed(actor_id=self.s.actor_id, sample_id=item.sample_id, reason=str(e)),
                timeout_s=self.s.request_timeout_s,
            )
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this actor cancelled the group (shutdown, re-registration): the learner requeues it
            # something inside the episode raised CancelledError: the group cannot finish, say so
            log.error("%s: group %s was cancelled from inside (a tool or the engine)", self.s.actor_id, item.sample_id)
            await self.call(
                m.WorkFailed(actor_id=self.s.actor_id, sample_id=item.sample_id, reason="cancelled inside the episode"),
                timeout_s=self.s.request_timeout_s,
            )
        except Exception as e:
            self.failures.append(e)
            log.exception("%s: group %s failed", self.s.actor_id, item.sample_id)
        finally:
            self.in_flight -= 1

    async def episode(self, item: m.WorkItem, chain: int, greedy: bool) -> list[m.Trajectory]:
        sampling = self.s.sampling
        if greedy:
            sampling = SamplingSettings(max_tokens=sampling.max_tokens, temperature=0.0, stop_token_ids=sampling.stop_token_ids)
        elif item.validation:
            sampling = dataclasses.replace(sampling, temperature=self.s.val_temperature)
        ep = await self.rollout(self.engine, self.agent, self.tokenizer, self.toolbox, item.row, self.s.limits, sampling)
        scores = await run_reward(self.scorer.reward_fn, lambda: self.scorer(ep, item.row), sample=f"{item.sample_id} chain {chain}")
        return to_trajectories(self.s.actor_id, item, chain, ep, scores, greedy=greedy)
