"""The batching core: a pure queue that decides which waiting requests run together, and when.

No threads, no Celery, no torch: time comes from the caller (``now``), so the rules can be tested with an
injected clock. The device loop owns one BatchQueue per batch key (a model and an operation) and asks it
for the next batch whenever the device is free.

Rules (after Ray Serve's _BatchQueue and text-embeddings-inference's queue):
- a batch is ready when it is full (``max_items`` texts, or a padded cost of ``max_tokens``: the longest
  input times the count) or when its oldest request has waited ``max_wait`` seconds;
- a batch takes requests oldest first, never splitting one: a request with many texts counts by its texts;
  the oldest request always goes in, even if it alone is over the budget (it runs in sub-batches);
- priority before age, and one priority per batch: while requests of a lower ``priority`` number (the
  interactive lane, 0) wait, the next batch takes only them, none of a higher one (bulk, 9); so bulk work a
  worker already holds makes an interactive request wait for no more than the batch already running, and
  its own batch is not filled up with bulk work (a full bulk batch took 224 ms against 12 ms for one text);
- requests whose deadline has passed are handed back by ``expire`` and never run;
- a batch that is to join a running one (continuous batching) is taken within what the running one leaves;
- a batch is taken within the room the device's cache has left (``room``), and waits when nothing fits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchLimits:
    max_items: int  # texts (or prompts) per batch
    max_tokens: int  # padded token budget per batch: longest input x items
    max_wait: float  # seconds the oldest request may wait for batch-mates

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_tokens < 1 or self.max_wait < 0:
            raise ValueError(f"batch limits must be positive: {self}")

    def over(self, items: int, longest: int) -> bool:
        """Whether a batch of ``items`` whose longest input has ``longest`` tokens is past either budget."""
        return items > self.max_items or items * longest > self.max_tokens


@dataclass(slots=True)
class Waiting(Generic[T]):
    """One request in the queue: its payload, its size, and its times."""

    payload: T
    items: int  # texts or prompts it carries
    longest: int  # tokens of its longest input
    arrived: float
    deadline: float | None = None
    sequence: int = field(default=0, compare=False)
    priority: int = 0  # lower goes first: 0 interactive, 9 bulk (the message's priority)


class BatchQueue(Generic[T]):
    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._lanes: dict[int, deque[Waiting[T]]] = {}  # priority -> its requests, oldest first
        self._sequence = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, payload: T, items: int, longest: int, now: float, deadline: float | None = None,
            priority: int = 0) -> None:
        if items < 1:
            raise ValueError("a request carries at least one item")
        self._sequence += 1
        if priority not in self._lanes:
            self._lanes = dict(sorted({**self._lanes, priority: deque()}.items()))  # kept in priority order
        self._lanes[priority].append(Waiting(payload, items, max(longest, 1), now, deadline, self._sequence,
                                             priority))
        self._count += 1

    def _in_order(self) -> Iterator[Waiting[T]]:
        """The waiting requests in the order a batch takes them: by priority, then oldest first."""
        for lane in self._lanes.values():
            yield from lane

    def _head(self) -> deque[Waiting[T]] | None:
        """The lane whose first request a batch takes next."""
        return next((lane for lane in self._lanes.values() if lane), None)

    def head(self) -> tuple[int, float] | None:
        """The priority and the arrival of the request a batch takes first (None when empty)."""
        return next(((priority, lane[0].arrived) for priority, lane in self._lanes.items() if lane), None)

    def oldest_arrival(self) -> float | None:
        heads = [lane[0].arrived for lane in self._lanes.values() if lane]
        return min(heads) if heads else None

    def ready(self, now: float) -> bool:
        """Whether a batch should run now: full, or its oldest request has waited long enough."""
        oldest = self.oldest_arrival()
        if oldest is None:
            return False
        if now - oldest >= self.limits.max_wait:
            return True
        items = longest = 0
        for waiting in self._head() or ():
            items += waiting.items
            longest = max(longest, waiting.longest)
            if items >= self.limits.max_items or items * longest >= self.limits.max_tokens:
                return True
        return False

    def seconds_until_ready(self, now: float) -> float | None:
        """How long until the oldest request's wait runs out (0 if ready); None when empty."""
        oldest = self.oldest_arrival()
        if oldest is None:
            return None
        if self.ready(now):
            return 0.0
        return max(0.0, oldest + self.limits.max_wait - now)

    def take(self, joining: tuple[int, int] = (0, 0), room: int | None = None, alone: bool = True) -> list[Waiting[T]]:
        """The next batch: the lowest priority waiting, oldest first, within the item and padded-token budgets.

        ``joining``: the (items, longest) of a running batch the taken ones will join; they must fit beside
        it, so this may take nothing (the oldest request goes in over budget only into a batch of its own).
        ``room``: padded tokens (items x longest, ``joining`` counted) the device's cache has left for the
        batch; what does not fit waits, so this may take nothing, unless the batch would be ``alone`` on the
        device: then the oldest goes in whatever its size (waiting would not make room)."""
        batch: list[Waiting[T]] = []
        items, longest = joining
        lane = self._head()
        while lane:
            candidate = lane[0]
            new_items = items + candidate.items
            new_longest = max(longest, candidate.longest)
            first_alone = not batch and joining == (0, 0)
            if self.limits.over(new_items, new_longest) and not first_alone:
                break
            if room is not None and new_items * new_longest > room and not (first_alone and alone):
                break
            batch.append(lane.popleft())
            self._count -= 1
            items, longest = new_items, new_longest
        return batch

    def expire(self, now: float) -> list[Waiting[T]]:
        """Remove and return the requests whose deadline has passed; they must not run."""
        return self.remove(lambda waiting: waiting.deadline is not None and waiting.deadline <= now)

    def remove(self, gone: Callable[[Waiting[T]], bool]) -> list[Waiting[T]]:
        """Remove and return the waiting requests ``gone`` says must not run (their caller gave up on them, say):
        left in the queue, one too large for the room left would keep every request behind it waiting. One
        pass, ``gone`` asked once a request: it may change its mind meanwhile (a caller cancels from its own
        thread), and asked twice, a request could leave its lane uncounted."""
        removed: list[Waiting[T]] = []
        for priority, lane in self._lanes.items():
            kept: deque[Waiting[T]] = deque()
            for waiting in lane:
                (removed if gone(waiting) else kept).append(waiting)
            self._lanes[priority] = kept
        self._count -= len(removed)
        return removed


def plan_chunks(lengths: list[int], max_items: int, max_tokens: int) -> list[list[int]]:
    """Split inputs into forward passes by length: indices sorted shortest first, each pass within budget.

    Sorting keeps padding small; the budget (longest x count) keeps activation memory bounded.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # sorted ascending, so this input is the longest of the chunk so far
        if current and (len(current) + 1 > max_items or (len(current) + 1) * lengths[index] > max_tokens):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks
