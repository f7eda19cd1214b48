"""The learner's side of the actor protocol: data, admission, staleness, liveness.

Runs on rank 0's IO thread (``protocol.transport.LearnerServer`` calls
``on_request``/``on_trajectory``/``on_tick``) and is read by the training
thread (``take_batch``); one lock guards its state.

Admission (credits)
-------------------
Each learner step consumes ``batch_groups`` prompt groups, so the group that
will be consumed after ``consumed + outstanding`` others trains at version
``(consumed + outstanding) // batch_groups``. An actor serving version ``v`` is
granted a group only if that version is at most ``v + max_staleness``. With
``max_staleness = 0`` this is synchronous on-policy training: actors generate
one batch, then wait for the new weights. The learner still checks every
arriving group (``take_batch``) and drops, counts and logs any that is staler
than the bound: admission is the plan, the drop is the guarantee.

Nothing is lost: a group whose actor dies (no message for ``peer_timeout_s``)
or that is dropped as stale goes back to the front of the data queue, and
``ledger`` records, per step, exactly which samples were trained.

Whole groups, dynamic sampling
------------------------------
A group is complete when each of its chains arrived whole: a chain whose episode was split
into several training sequences (``Trajectory.segment`` of ``num_segments``, an external
agent's rewritten history) is whole once every segment arrived. A group is checked when its
last chain arrives, before it counts for a batch:
a group with a chain whose ids, mask, versions and log-probs do not line up
(``learner.batch.check_alignment``) is requeued whole (``groups_refused``),
at most ``max_group_refusals`` times per sample, then dropped like a failed
one. With ``filter_groups`` (DAPO's dynamic sampling) a group whose episodes
all scored the same is dropped (``groups_zero_variance_dropped``); since it
never counts as consumed, admission grants another prompt in its place, until
the batch is full. At most ``max_num_gen_batches`` batches' worth are dropped
per step; past that the step trains on what arrives.

Validation
----------
``request_validation`` queues validation items (``WorkItem(validation=True)``,
one episode each) for one policy version. They are granted before training
work, only to actors serving exactly that version, and use no admission
credit; their trajectories are routed to ``validation_results``, never into
training groups. ``learner.validation`` drives this between steps.

Checkpoints
-----------
``state_dict`` is the data position (epoch, position, requeue) plus every
sample granted but not yet consumed (in flight, partial or buffered): on
``load_state_dict`` those go to the front of the requeue, so a resumed run
grants them again, and the stream carries on after the last sample granted,
so nothing consumed is granted again.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from dataclasses import dataclass, field

from protocol import messages as m
from protocol.transport import TransportTimeout

log = logging.getLogger(__name__)


@dataclass
class ActorInfo:
    actor_id: str
    host: str
    pid: int
    engine: str
    last_seen: float
    version: int = 0
    outstanding: set[str] = field(default_factory=set)
    trajectories: int = 0
    validation_trajectories: int = 0
    versions_seen: set[int] = field(default_factory=set)


class DataStream:
    """Epoch-wise shuffled sample ids over ``rows`` (``epoch:index``), with a requeue."""

    def __init__(self, rows: list[dict], shuffle: bool, seed: int, start_epoch: int = 0, skip: set[str] | None = None):
        self.rows = rows
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = start_epoch
        self.order: list[int] = []
        self.pos = 0
        self.requeue: collections.deque[str] = collections.deque()
        self.skip = skip or set()
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(self.order)
        self.pos = 0

    def next(self) -> str:
        if self.requeue:
            return self.requeue.popleft()
        while True:
            if self.pos >= len(self.order):
                self.epoch += 1
                self._new_epoch()
            sid = f"{self.epoch}:{self.order[self.pos]}"
            self.pos += 1
            if sid not in self.skip:
                return sid

    def row(self, sample_id: str) -> dict:
        return self.rows[int(sample_id.split(":")[1])]


class Coordinator:
    def __init__(
        self,
        stream: DataStream,
        *,
        batch_groups: int,
        group_size: int,
        max_staleness: int,
        peer_timeout_s: float,
        greedy_baseline: bool = False,
        version: int = 0,
        consumed: int = 0,
        min_actors: int = 1,
        vocab_size: int | None = None,
        status_path=None,
        status_every_s: float = 2.0,
        filter_groups=None,
        max_group_refusals: int = 2,
    ):
        self.stream = stream
        self.status_path = status_path
        """Where ``on_tick`` writes ``status()`` as JSON every ``status_every_s`` (the launcher's
        stall watchdog reads it); None writes nothing."""
        self.status_every_s = status_every_s
        self._status_at = 0.0
        self.filter_groups = filter_groups
        """``configs.schema.FilterGroupsConfig`` or None (no dynamic sampling)."""
        self.max_group_refusals = max_group_refusals
        self.refusals: collections.Counter[str] = collections.Counter()
        self.notify = lambda: None
        """Called (from the training thread) when actors waiting for work should look again: a new
        version, a validation round, the end. The trainer sets it to the server's ``wake``."""
        self._zero_variance_this_step = 0
        self.vocab_size = vocab_size
        self.min_actors = min_actors
        self.started = False
        self.batch_groups = batch_groups
        self.group_size = group_size
        self.max_staleness = max_staleness
        self.peer_timeout_s = peer_timeout_s
        self.greedy_baseline = greedy_baseline
        self.version = version
        self.consumed = consumed
        self.actors: dict[str, ActorInfo] = {}
        self.outstanding: dict[str, str] = {}  # sample_id -> actor_id
        self.partial: dict[str, list[m.Trajectory]] = {}
        self.complete: collections.deque[tuple[str, list[m.Trajectory]]] = collections.deque()
        self.stop = False
        self.counters = collections.Counter()
        self.dead_actors: list[str] = []
        self.failed_samples: list[tuple[str, str]] = []
        self.stopped: set[str] = set()
        self.val_pending: collections.deque[m.WorkItem] = collections.deque()
        self.val_items: dict[str, m.WorkItem] = {}  # every item of the current round
        self.val_outstanding: dict[str, str] = {}  # sample_id -> actor_id
        self.val_results: dict[str, m.Trajectory] = {}
        self.val_version = -1
        self.val_per_grant = 32
        self.lock = threading.Condition()

    # ------------------------------------------------------------ IO thread

    def on_request(self, peer: str, msg: m.Message) -> m.Message | None:
        with self.lock:
            now = time.monotonic()
            if isinstance(msg, m.Register):
                old = self.actors.get(msg.actor_id)
                if old is not None:  # a restarted actor: what its old process held is lost with it
                    log.warning("actor %s registered again (was pid %d, now %d): requeueing its %d groups",
                                msg.actor_id, old.pid, msg.pid, len(old.outstanding))
                    self._forget(old)
                elif msg.actor_id in self.dead_actors:
                    log.info("actor %s, declared dead, is back (%s pid %d)", msg.actor_id, msg.host, msg.pid)
                self.counters["registrations"] += 1
                self.lock.notify_all()
                self.actors[msg.actor_id] = ActorInfo(msg.actor_id, msg.host, msg.pid, msg.engine, now)
                log.info("actor %s registered (%s pid %d, %s engine)", msg.actor_id, msg.host, msg.pid, msg.engine)
                return m.Welcome(actor_id=msg.actor_id, learner_version=self.version, max_staleness=self.max_staleness)
            info = self.actors.get(getattr(msg, "actor_id", ""))
            if info is None:
                return m.Error(message=f"unknown actor {getattr(msg, 'actor_id', '?')!r}: register first", code="unregistered")
            info.last_seen = now
            if isinstance(msg, m.Heartbeat):
                info.version = msg.version
                if self.stop:
                    self.stopped.add(info.actor_id)
                return m.HeartbeatAck(learner_version=self.version, stop=self.stop)
            if isinstance(msg, m.WorkRequest):
                info.version = msg.version
                return self._grant(info, msg.max_groups)
            if isinstance(msg, m.WorkFailed):
                self._fail(info, msg)
                return m.HeartbeatAck(learner_version=self.version, stop=self.stop)
            if isinstance(msg, m.WeightsRequest):
                return None  # the server sends the newest snapshot
            return m.Error(message=f"{type(msg).__name__} is not a request")

    def _grant(self, info: ActorInfo, max_groups: int) -> m.WorkGrant:
        if self.stop:
            self.stopped.add(info.actor_id)
            return m.WorkGrant(items=[], learner_version=self.version, stop=True, reason="training finished")
        if info.version < self.version - self.max_staleness:
            return m.WorkGrant(items=[], learner_version=self.version, reason=f"update weights first (you serve v{info.version})")
        if not self.started:
            if len(self.actors) < self.min_actors:
                return m.WorkGrant(items=[], learner_version=self.version, reason=f"waiting for {self.min_actors} actors ({len(self.actors)} registered)")
            self.started = True
        items = self._grant_validation(info, max_groups)
        max_groups -= len(items)
        credit = (info.version + self.max_staleness + 1) * self.batch_groups - self.consumed - len(self.outstanding) - self._buffered()
        # no actor holds more than its share of the window (its groups in flight plus its fresh complete
        # groups waiting for the learner), so every live actor gets work each version, however fast the others
        fair_share = -(-(self.max_staleness + 1) * self.batch_groups // max(1, len(self.actors)))
        held = len(info.outstanding) + sum(1 for _, group in self.complete
                                           if group[0].actor_id == info.actor_id and self._age(group) <= self.max_staleness)
        n = max(0, min(max_groups, credit, fair_share - held))
        for _ in range(n):
            sid = self.stream.next()
            self.outstanding[sid] = info.actor_id
            info.outstanding.add(sid)
            items.append(m.WorkItem(sample_id=sid, row=self.stream.row(sid), group_size=self.group_size, greedy_baseline=self.greedy_baseline))
        self.counters["groups_granted"] += n
        reason = "" if items else f"no credit: {len(self.outstanding)} groups in flight, learner at v{self.version}"
        return m.WorkGrant(items=items, learner_version=self.version, reason=reason)

    def _fail(self, info: ActorInfo, msg: m.WorkFailed) -> None:
        """Drop a work item that can never be rolled out (counted, logged, never granted again).
        Only the actor that holds the grant may fail it."""
        sid = msg.sample_id
        if sid in self.val_outstanding or sid in self.outstanding:
            owner = self.val_outstanding.get(sid, self.outstanding.get(sid))
            if owner != info.actor_id:
                self.counters["work_failed_not_owner"] += 1
                log.warning("%s sent WorkFailed for %s, which %s holds: ignored", info.actor_id, sid[:64], owner)
                return
        if self.val_outstanding.pop(sid, None) is not None:
            self.val_items.pop(sid, None)  # the round completes without it
            self.counters["validation_failed"] += 1
        elif self.outstanding.pop(sid, None) is not None:
            info.outstanding.discard(sid)
            self.partial.pop(sid, None)
            self.counters["groups_failed"] += 1
        else:
            return
        self.failed_samples.append((sid, msg.reason))
        log.error("%s cannot be rolled out (%s, from %s): dropped, not granted again", sid, msg.reason, info.actor_id)
        self.lock.notify_all()

    def _buffered(self) -> int:
        return len(self.complete)

    def _age(self, group: list[m.Trajectory]) -> int:
        """Versions between the learner's and the oldest that sampled a token of ``group`` (stale above
        ``max_staleness``)."""
        return self.version - min(t.min_version for t in group)

    def _grant_validation(self, info: ActorInfo, max_groups: int) -> list[m.WorkItem]:
        """Validation items for an actor serving exactly the version being validated."""
        items: list[m.WorkItem] = []
        if info.version != self.val_version:
            return items
        while self.val_pending and len(items) < min(max_groups, self.val_per_grant):
            item = self.val_pending.popleft()
            self.val_outstanding[item.sample_id] = info.actor_id
            items.append(item)
        self.counters["validation_granted"] += len(items)
        return items

    def on_trajectory(self, traj: m.Trajectory) -> None:
        """Take one trajectory. Raises ``ProtocolError`` (the server counts it as a bad message) for one
        whose ids or versions cannot be real: ids outside the vocabulary, versions not yet published."""
        m.check_trajectory_bounds(traj, self.vocab_size, self.version)  # decode ran check_trajectory
        with self.lock:
            if traj.validation:
                self._on_validation(traj)
                return
            owner = self.outstanding.get(traj.sample_id)
            if owner is None:
                self.counters["trajectories_unexpected"] += 1
                log.warning("trajectory for %s from %s was not outstanding; dropped", traj.sample_id[:64], traj.actor_id[:64])
                return
            if owner != traj.actor_id:
                self.counters["trajectories_not_owner"] += 1
                log.warning("trajectory for %s from %s, but %s holds it; dropped", traj.sample_id[:64], traj.actor_id[:64], owner)
                return
            need = self.group_size + (1 if self.greedy_baseline else 0)
            held = self.partial.get(traj.sample_id, ())
            if not 0 <= traj.chain < need or any((t.chain, t.segment) == (traj.chain, traj.segment) for t in held):
                self.counters["trajectories_duplicate"] += 1
                log.warning("trajectory %s#%d from %s: chain out of range or already received; dropped", traj.sample_id[:64], traj.chain, owner)
                return
            if any(t.chain == traj.chain and t.num_segments != traj.num_segments for t in held):
                self.counters["trajectories_bad_segments"] += 1
                log.warning("trajectory %s#%d from %s: %d segments, its chain's others say otherwise; dropped",
                            traj.sample_id[:64], traj.chain, owner, traj.num_segments)
                return
            info = self.actors.get(traj.actor_id)
            if info is not None:
                info.trajectories += 1
                info.versions_seen.update(int(v) for v in set(traj.versions.numpy().tolist()) if v >= 0)
            group = self.partial.setdefault(traj.sample_id, [])
            group.append(traj)
            if complete_chains(group) == need:
                del self.partial[traj.sample_id]
                del self.outstanding[traj.sample_id]
                if owner in self.actors:
                    self.actors[owner].outstanding.discard(traj.sample_id)
                if self._admit(traj.sample_id, group):
                    self.complete.append((traj.sample_id, group))
                self.lock.notify_all()

    def _admit(self, sid: str, group: list[m.Trajectory]) -> bool:
        """Whether a completed group counts for a batch (see 'Whole groups, dynamic sampling')."""
        from learner.batch import TrajectoryMismatch, check_alignment

        try:
            for t in group:
                check_alignment(t)
        except TrajectoryMismatch as e:
            self.refusals[sid] += 1
            self.counters["groups_refused"] += 1
            if self.refusals[sid] > self.max_group_refusals:
                self.counters["groups_failed"] += 1
                self.failed_samples.append((sid, str(e)))
                log.error("group %s refused %d times (%s): dropped, not granted again", sid, self.refusals[sid], e)
            else:
                self.stream.requeue.append(sid)
                log.error("group %s refused whole and requeued (%d of %d): %s", sid, self.refusals[sid], self.max_group_refusals, e)
            return False
        fg = self.filter_groups
        if fg is not None and fg.enable and len(group) > 1:
            scores = {t.reward if fg.metric == "reward" else t.reward_components.get(fg.metric, t.reward) for t in group if not t.greedy}
            cap = fg.max_num_gen_batches * self.batch_groups
            if len(scores) == 1:
                if cap and self._zero_variance_this_step >= cap:
                    self.counters["groups_zero_variance_kept"] += 1
                    if self.counters["groups_zero_variance_kept"] == 1:
                        log.warning("dynamic sampling: %d zero-variance groups dropped this step (cap %d); training on what arrives", cap, cap)
                    return True
                self._zero_variance_this_step += 1
                self.counters["groups_zero_variance_dropped"] += 1
                return False
        return True

    def on_tick(self, now: float) -> None:
        if self.status_path is not None and now - self._status_at >= self.status_every_s:
            self._status_at = now
            self._write_status()
        with self.lock:
            for info in list(self.actors.values()):
                if now - info.last_seen > self.peer_timeout_s:
                    log.error("actor %s silent for %.0fs: declared dead; requeueing %d groups", info.actor_id, now - info.last_seen, len(info.outstanding))
                    self._forget(info)
                    self.dead_actors.append(info.actor_id)

    def _forget(self, info: ActorInfo) -> None:
        """Take back everything ``info`` holds (its groups go to the front of the queue)."""
        self._requeue(info.outstanding)
        for sid in sorted(s for s, a in self.val_outstanding.items() if a == info.actor_id):
            del self.val_outstanding[sid]
            self.val_pending.appendleft(self.val_items[sid])
        del self.actors[info.actor_id]
        self.stopped.discard(info.actor_id)
        self.lock.notify_all()

    def status(self) -> dict:
        """What the learner is waiting for, in a form a person can read (JSON-able)."""
        now = time.monotonic()
        with self.lock:
            return {
                "wall_time": time.time(),
                "version": self.version,
                "consumed_groups": self.consumed,
                "buffered_groups": len(self.complete),
                "outstanding_groups": len(self.outstanding),
                "partial_groups": {sid: len(g) for sid, g in list(self.partial.items())[:20]},
                "batch_groups": self.batch_groups,
                "actors": {
                    a.actor_id: {"version": a.version, "outstanding": len(a.outstanding), "silent_s": round(now - a.last_seen, 1), "pid": a.pid, "host": a.host}
                    for a in self.actors.values()
                },
                "dead_actors": list(self.dead_actors),
                "validation": {"version": self.val_version, "pending": len(self.val_pending), "outstanding": len(self.val_outstanding),
                               "done": len(self.val_results), "of": len(self.val_items)},
                "stop": self.stop,
            }

    def _write_status(self) -> None:
        import json
        from pathlib import Path

        path = Path(self.status_path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.status(), indent=1))
            tmp.replace(path)
        except OSError as e:
            log.warning("could not write %s: %s", path, e)

    def _requeue(self, sample_ids) -> None:
        for sid in sorted(sample_ids):
            self.outstanding.pop(sid, None)
            self.partial.pop(sid, None)
            self.stream.requeue.append(sid)
            self.counters["groups_requeued"] += 1

    # ------------------------------------------------------------ training thread

    def take_batch(
        self, timeout_s: float, alive: callable = lambda: None, interrupt: callable = lambda: False
    ) -> tuple[list[tuple[str, list[m.Trajectory]]], dict] | None:
        """Wait for ``batch_groups`` fresh complete groups; drop (and requeue) stale ones.
        ``None`` (nothing taken) if ``interrupt()`` turns true while waiting (checked at least
        once a second): the caller has something to do first."""
        deadline = time.monotonic() + timeout_s
        batch: list[tuple[str, list[m.Trajectory]]] = []
        stale_dropped = 0
        with self.lock:
            while len(batch) < self.batch_groups:
                while self.complete and len(batch) < self.batch_groups:
                    sid, group = self.complete.popleft()
                    age = self._age(group)
                    if age > self.max_staleness:
                        stale_dropped += 1
                        self.counters["groups_dropped_stale"] += 1
                        log.warning("dropped group %s: %d versions old (max_staleness %d); requeued", sid, age, self.max_staleness)
                        self.stream.requeue.append(sid)
                        continue
                    batch.append((sid, group))
                    self.consumed += 1  # counted at once, so admission never over-grants while we wait
                if len(batch) == self.batch_groups:
                    dropped, self._zero_variance_this_step = self._zero_variance_this_step, 0
                    break
                alive()
                if interrupt():
                    self.complete.extendleft(reversed(batch))
                    self.consumed -= len(batch)
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    # give back what we took so nothing is lost
                    self.complete.extendleft(reversed(batch))
                    self.consumed -= len(batch)
                    raise TransportTimeout(
                        f"waited {timeout_s:.0f}s for {self.batch_groups} trajectory groups at v{self.version}: "
                        f"have {len(batch)} complete, {len(self.outstanding)} in flight, "
                        f"{len(self.actors)} actors alive (dead: {self.dead_actors or 'none'})"
                    )
                self.lock.wait(min(left, 1.0))
        return batch, {
            "groups_dropped_stale": stale_dropped,
            "groups_failed_total": self.counters["groups_failed"],
            "groups_refused_total": self.counters["groups_refused"],
            "groups_zero_variance_dropped": dropped,
        }

    # ------------------------------------------------------------ validation

    def wait_for_actors(self, timeout_s: float, alive: callable = lambda: None) -> float:
        """Wait until ``min_actors`` actors have registered; returns the seconds waited."""
        t0 = time.monotonic()
        with self.lock:
            while len(self.actors) < self.min_actors:
                alive()
                left = timeout_s - (time.monotonic() - t0)
                if left <= 0:
                    raise TransportTimeout(
                        f"waited {timeout_s:.0f}s for {self.min_actors} actors to register ({len(self.actors)} did; dead: {self.dead_actors or 'none'})"
                    )
                self.lock.wait(min(left, 1.0))
        return time.monotonic() - t0

    def _on_validation(self, traj: m.Trajectory) -> None:
        if self.val_outstanding.get(traj.sample_id) != traj.actor_id:
            self.counters["validation_unexpected"] += 1
            log.warning("validation trajectory %s from %s was not outstanding (for it); dropped", traj.sample_id[:64], traj.actor_id[:64])
            return
        del self.val_outstanding[traj.sample_id]
        self.val_results[traj.sample_id] = traj
        if traj.actor_id in self.actors:
            self.actors[traj.actor_id].validation_trajectories += 1
        self.lock.notify_all()

    def request_validation(self, items: list[m.WorkItem], version: int, per_grant: int) -> None:
        """Queue one validation round for ``version`` (replacing any unfinished round)."""
        with self.lock:
            self.val_version = version
            self.val_per_grant = per_grant
            self.val_items = {it.sample_id: it for it in items}
            self.val_pending = collections.deque(items)
            self.val_outstanding = {}
            self.val_results = {}
        self.notify()

    def validation_results(self, timeout_s: float, alive: callable = lambda: None) -> list[m.Trajectory]:
        """Wait until every item of the current round has come back; ends the round."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while len(self.val_results) < len(self.val_items):
                alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(
                        f"waited {timeout_s:.0f}s for validation of v{self.val_version}: {len(self.val_results)}/"
                        f"{len(self.val_items)} done, {len(self.val_outstanding)} in flight, "
                        f"{len(self.val_pending)} not granted (actors serving v{self.val_version}: "
                        f"{sum(a.version == self.val_version for a in self.actors.values())} of {len(self.actors)})"
                    )
                self.lock.wait(min(left, 1.0))
            results = [self.val_results[sid] for sid in self.val_items]
            self.val_items, self.val_results, self.val_version = {}, {}, -1
        return results

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The data position and the samples granted but not consumed (JSON-able)."""
        with self.lock:
            pending = list(self.outstanding) + [sid for sid, _ in self.complete]
            pending += [sid for sid in self.partial if sid not in self.outstanding]
            return {
                "version": self.version,
                "consumed": self.consumed,
                "epoch": self.stream.epoch,
                "pos": self.stream.pos,
                "requeue": list(dict.fromkeys(pending + list(self.stream.requeue))),
            }

    def load_state_dict(self, state: dict, consumed_ids: set[str]) -> None:
        """Continue from ``state``; ``consumed_ids`` (from the ledger) are never granted again."""
        with self.lock:
            self.version = state["version"]
            self.consumed = state["consumed"]
            self.stream.epoch = state["epoch"]
            self.stream._new_epoch()
            self.stream.pos = state["pos"]
            self.stream.skip = set(consumed_ids)
            self.stream.requeue = collections.deque(sid for sid in state["requeue"] if sid not in consumed_ids)

    def actors_to_update(self, version: int) -> set[str]:
        """Live actors serving a version older than ``version`` (they will fetch it)."""
        with self.lock:
            return {aid for aid, info in self.actors.items() if info.version < version}

    def advance(self, version: int) -> None:
        with self.lock:
            self.version = version
        self.notify()

    def finish(self) -> None:
        with self.lock:
            self.stop = True
        self.notify()

    def all_stopped(self) -> bool:
        """True once every live actor has been told to stop."""
        with self.lock:
            return set(self.actors) <= self.stopped

    def actors_summary(self) -> dict[str, dict]:
        with self.lock:
            return {
                a.actor_id: {
                    "trajectories": a.trajectories,
                    "validation_trajectories": a.validation_trajectories,
                    "versions": sorted(a.versions_seen),
                    "version": a.version,
                }
                for a in self.actors.values()
            }


def complete_chains(group: list[m.Trajectory]) -> int:
    """How many chains of ``group`` have all their segments (a chain split into ``num_segments``
    training sequences is complete once each ``segment`` index arrived; duplicates are refused
    before they get here)."""
    arrived = collections.Counter(t.chain for t in group)
    return sum(1 for t in group if t.segment == 0 and arrived[t.chain] == t.num_segments)
