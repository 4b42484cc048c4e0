"""Stepped batches (generation): what one is, and the rules for the ones under way on a device.

A stepped batch runs a step at a time (one token for every row), so the device loop can run other work
between its steps, answer a row as soon as it ends, and let a new batch join it (continuous batching).
``RunningBatches`` keeps the batches under way and answers the loop's scheduling questions about them:
how many of a key run, which one a new batch may join, whether requests fit its limits, and how much of
the device's cache budget they reserve. It runs nothing and answers nobody; the loop does both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from workers.device.batching import BatchLimits


class Stepping(Protocol):
    """A started batch that runs a step at a time."""

    @property
    def done(self) -> bool: ...

    @property
    def prefilling(self) -> bool:
        """Its first steps are still preparing (a generation's prefill chunks): it cannot join or be joined."""
        ...

    def step(self, alone: bool = False) -> list[tuple[int, Any]]:
        """One step for every live request; the (index in the batch, outcome) of those that finished.
        ``alone``: nothing else waits for the device (a prefill need not make way, so it runs whole)."""
        ...

    def produced(self, index: int) -> list[Any]:
        """What a live request has produced so far, in order (a generation's tokens)."""
        ...

    def stop(self, index: int) -> int:
        """Drop one request before the next step; returns how many steps it had run."""
        ...

    def absorb(self, other: Any) -> list[int] | None:
        """Take the live requests of ``other`` (a batch of the same kind that has run its first step) into
        this one; their indices here, in ``other``'s order, or None if it cannot (nothing changes then)."""
        ...


@dataclass
class SteppedKind:
    start: Callable[[list[Any]], Stepping]  # prepares a batch; its first step is the first device work
    limits: BatchLimits
    max_running: int  # batches of this key stepping at once; a further ready batch waits for one to end
    # Continuous batching: a new batch, after its prefill, joins a running one with room (within the
    # limits), so one pass a step serves both; without it, batches only run side by side.
    joins: bool = False
    cache_bytes_per_token: int = 0  # what one token of one request holds on the device (0: not counted)


class Sized(Protocol):
    """What the rules read of the loop's job for one request."""

    @property
    def longest(self) -> int:
        """Tokens of its longest input (for a generate request, prompt + max_new_tokens)."""
        ...


Job = TypeVar("Job", bound=Sized)


@dataclass(eq=False)
class RunningBatch(Generic[Job]):
    """A stepped batch under way: its unanswered jobs by their index in the batch, and how far it got."""

    key: str
    jobs: dict[int, Job]
    stepping: Stepping
    size: int  # requests it ever held: the next joined one gets this index
    steps: int = 0
    target: RunningBatch[Job] | None = None  # the running batch it joins once its prefill is done

    def live(self) -> tuple[int, int]:
        """Requests still running, and the longest of them."""
        return len(self.jobs), max((job.longest for job in self.jobs.values()), default=0)

    def tokens(self) -> int:
        """The padded tokens it may come to hold: requests x the longest."""
        live, longest = self.live()
        return live * longest

    @property
    def joinable(self) -> bool:
        """It has run its prefill and is not on its way into another batch: a new batch may join it."""
        return self.steps > 0 and not self.stepping.prefilling and self.target is None


class RunningBatches(Generic[Job]):
    """The stepped batches under way on one device, with its cache budget (bytes; None: unbounded)."""

    def __init__(self, kinds: dict[str, SteppedKind], cache_budget: int | None) -> None:
        self.kinds = kinds
        self.cache_budget = cache_budget
        self.batches: list[RunningBatch[Job]] = []
        self._unjoinable: set[str] = set()  # keys whose batches refused a join (their caches cannot be merged)

    def below_max_running(self, key: str) -> bool:
        return sum(running.key == key for running in self.batches) < self.kinds[key].max_running

    def may_take(self, key: str) -> bool:
        """Whether a ready batch of this key can start now: beside the others, or joining one with room."""
        return self.below_max_running(key) or self.roomiest(key) is not None

    def roomiest(self, key: str) -> RunningBatch[Job] | None:
        """The running batch of this key with the most room for more requests, if it joins and has any."""
        kind = self.kinds[key]
        if not kind.joins or key in self._unjoinable:
            return None
        # one that has run its prefill (a batch joins after the prefill of both), is not itself joining
        # another, and has no new batch on its way in already: each of those counts against max_running
        # until it joins
        room = [(kind.limits.max_items - running.live()[0], index) for index, running in enumerate(self.batches)
                if running.key == key and running.joinable
                and not any(other.target is running for other in self.batches)]
        best = max(room, default=None)
        return self.batches[best[1]] if best is not None and best[0] > 0 else None

    def fits(self, into: RunningBatch[Job], items: int, longest: int) -> bool:
        """Whether ``items`` more requests, the longest of ``longest`` tokens, fit into ``into``'s limits."""
        live, its_longest = into.live()
        return not self.kinds[into.key].limits.over(live + items, max(its_longest, longest))

    def cache_room(self, key: str) -> int | None:
        """Padded tokens of this key's requests the cache budget has left room for; None: no budget applies."""
        per_token = self.kinds[key].cache_bytes_per_token
        if self.cache_budget is None or per_token <= 0:
            return None
        return max(0, self.cache_budget - self.reserved()) // per_token

    def join_fits_cache(self, started: RunningBatch[Job], into: RunningBatch[Job]) -> bool:
        """The merged batch reserves (all its rows) x (the longest of them); the two it replaces give theirs
        back. Whether the budget holds that."""
        room = self.cache_room(started.key)
        if room is None:
            return True
        (live, its_longest), (items, longest) = into.live(), started.live()
        return (live + items) * max(its_longest, longest) <= room + into.tokens() + started.tokens()

    def reserved(self) -> int:
        """Bytes of cache the batches under way may come to hold."""
        return sum(batch.tokens() * self.kinds[batch.key].cache_bytes_per_token for batch in self.batches)

    def never_join(self, key: str) -> None:
        """This key's cache cannot be merged (a sliding window, say): from now on its batches run side by
        side, so a refused join never starts one past max_running again."""
        self._unjoinable.add(key)
