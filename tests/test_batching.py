"""The batching core on an injected clock: when batches flush, what they take, what expires."""

from __future__ import annotations

import pytest

from workers.device.batching import BatchLimits, BatchQueue, Waiting, plan_chunks


def queue(max_items: int = 4, max_tokens: int = 1000, max_wait: float = 0.010) -> BatchQueue[str]:
    return BatchQueue(BatchLimits(max_items=max_items, max_tokens=max_tokens, max_wait=max_wait))


def test_an_empty_queue_is_never_ready() -> None:
    q = queue()
    assert not q.ready(now=100.0)
    assert q.seconds_until_ready(now=100.0) is None
    assert q.take() == []


def test_flushes_when_the_oldest_has_waited_max_wait() -> None:
    q = queue(max_wait=0.010)
    q.put("a", items=1, longest=5, now=1.000)
    q.put("b", items=1, longest=5, now=1.004)
    assert not q.ready(now=1.009)
    assert q.seconds_until_ready(now=1.004) == pytest.approx(0.006)
    assert q.ready(now=1.010)
    assert [w.payload for w in q.take()] == ["a", "b"]


def test_zero_wait_runs_whatever_is_there() -> None:
    q = queue(max_wait=0.0)
    q.put("a", items=1, longest=5, now=1.0)
    assert q.ready(now=1.0)


def test_flushes_when_full_by_count_before_the_wait() -> None:
    q = queue(max_items=4)
    for i, name in enumerate("abcd"):
        q.put(name, items=1, longest=3, now=1.0 + i * 0.001)
    assert q.ready(now=1.003)
    q.put("e", items=1, longest=3, now=1.004)
    assert [w.payload for w in q.take()] == ["a", "b", "c", "d"]  # oldest first
    assert [w.payload for w in q.take()] == ["e"]


def test_a_request_counts_by_its_texts_and_is_never_split() -> None:
    q = queue(max_items=4)
    q.put("three", items=3, longest=3, now=1.0)
    q.put("two", items=2, longest=3, now=1.0)
    assert q.ready(now=1.0)  # 5 texts waiting >= 4
    assert [w.payload for w in q.take()] == ["three"]  # adding "two" would make 5 > 4
    assert [w.payload for w in q.take()] == ["two"]


def test_padded_token_budget_is_longest_times_count() -> None:
    q = queue(max_items=100, max_tokens=100)
    q.put("short", items=1, longest=10, now=1.0)
    q.put("short2", items=1, longest=10, now=1.0)
    assert not q.ready(now=1.0)  # 2 x 10 = 20
    q.put("long", items=1, longest=40, now=1.0)
    assert q.ready(now=1.0)  # 3 x 40 = 120 >= 100
    assert [w.payload for w in q.take()] == ["short", "short2"]  # with "long": 3 x 40 > 100
    assert [w.payload for w in q.take()] == ["long"]


def test_the_oldest_request_goes_in_even_when_alone_over_budget() -> None:
    q = queue(max_items=4, max_tokens=100)
    q.put("huge", items=8, longest=500, now=1.0)
    q.put("small", items=1, longest=2, now=1.0)
    assert [w.payload for w in q.take()] == ["huge"]
    assert [w.payload for w in q.take()] == ["small"]


def test_a_batch_takes_only_what_the_cache_has_room_for_and_waits_when_nothing_fits() -> None:
    q = queue(max_items=8, max_tokens=10_000)
    for name, longest in (("a", 100), ("b", 100), ("c", 300)):
        q.put(name, items=1, longest=longest, now=1.0)
    assert [w.payload for w in q.take(room=250, alone=False)] == ["a", "b"]  # c: 3 x 300 > 250
    assert q.take(room=250, alone=False) == []  # c alone is 300: it waits while others run
    assert [w.payload for w in q.take(room=250, alone=True)] == ["c"]  # nothing else runs: it goes in anyway
    q.put("d", items=1, longest=100, now=2.0)
    # joining a running batch of 2 rows x 200 tokens: the merged batch is 3 x 200 = 600
    assert q.take(joining=(2, 200), room=599, alone=True) == []  # a join never goes over, alone or not
    assert [w.payload for w in q.take(joining=(2, 200), room=600, alone=False)] == ["d"]


def test_expired_requests_are_removed_and_never_taken() -> None:
    q = queue(max_wait=1.0)
    q.put("late", items=1, longest=1, now=1.0, deadline=1.5)
    q.put("fine", items=1, longest=1, now=1.0, deadline=9.0)
    q.put("forever", items=1, longest=1, now=1.0)
    assert q.expire(now=1.4) == []
    assert [w.payload for w in q.expire(now=1.5)] == ["late"]
    assert len(q) == 2
    assert [w.payload for w in q.take()] == ["fine", "forever"]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch limits must be positive"):
        BatchLimits(max_items=0, max_tokens=10, max_wait=0.0)
    with pytest.raises(ValueError, match="at least one item"):
        queue().put("none", items=0, longest=1, now=0.0)


def test_chunks_sort_by_length_and_respect_both_budgets() -> None:
    lengths = [50, 3, 7, 5, 48, 4]
    chunks = plan_chunks(lengths, max_items=3, max_tokens=100)
    # 3 items of <=5 tokens; a 4th would be over max_items. Then 7 and 48: 2 x 48 = 96 fits; 3 x 50 does not.
    assert chunks == [[1, 5, 3], [2, 4], [0]]
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    assert plan_chunks([], max_items=3, max_tokens=10) == []
    assert plan_chunks([500], max_items=3, max_tokens=10) == [[0]]  # alone over budget still runs


def test_lower_priorities_go_first_in_batches_of_their_own_and_age_orders_within_one() -> None:
    q = queue(max_items=3)
    q.put("bulk-old", items=1, longest=5, now=1.000, priority=9)
    q.put("bulk-new", items=1, longest=5, now=1.001, priority=9)
    q.put("interactive", items=1, longest=5, now=1.002)
    q.put("middle", items=1, longest=5, now=1.003, priority=3)
    assert len(q) == 4
    assert q.oldest_arrival() == 1.000
    assert not q.ready(1.005)  # 4 waiting, but the head priority's batch is not full
    assert [w.payload for w in q.take()] == ["interactive"]
    assert [w.payload for w in q.take()] == ["middle"]
    assert [w.payload for w in q.take()] == ["bulk-old", "bulk-new"]
    assert len(q) == 0 and q.oldest_arrival() is None


def test_a_waiting_bulk_request_still_makes_a_batch_ready() -> None:
    q = queue(max_items=8, max_wait=0.010)
    q.put("bulk", items=1, longest=5, now=1.000, priority=9)
    q.put("interactive", items=1, longest=5, now=1.008)
    assert not q.ready(1.009)
    assert q.seconds_until_ready(1.009) == pytest.approx(0.001)
    assert q.ready(1.010)
    assert [w.payload for w in q.take()] == ["interactive"]
    assert [w.payload for w in q.take()] == ["bulk"]


def test_expire_reaches_every_priority() -> None:
    q = queue()
    q.put("interactive", items=1, longest=5, now=1.0, deadline=2.0)
    q.put("bulk", items=1, longest=5, now=1.0, deadline=2.0, priority=9)
    q.put("bulk-later", items=1, longest=5, now=1.0, deadline=5.0, priority=9)
    assert sorted(w.payload for w in q.expire(3.0)) == ["bulk", "interactive"]
    assert len(q) == 1
    assert [w.payload for w in q.take()] == ["bulk-later"]


def test_remove_asks_once_a_request_so_a_caller_changing_its_mind_meanwhile_cannot_unbalance_the_count() -> None:
    """A caller cancels from its own thread: asked twice, a request could be counted as removed yet stay."""
    waiting = queue()
    for name in ("a", "b", "c"):
        waiting.put(name, 1, 5, now=0.0)
    asked: dict[str, int] = {}

    def gone(request: Waiting[str]) -> bool:  # "b" is gone the first time it is asked, not after
        asked[request.payload] = asked.get(request.payload, 0) + 1
        return request.payload == "b" and asked["b"] == 1

    assert [w.payload for w in waiting.remove(gone)] == ["b"]
    assert asked == {"a": 1, "b": 1, "c": 1} and len(waiting) == 2
    assert [w.payload for w in waiting.take()] == ["a", "c"] and len(waiting) == 0
