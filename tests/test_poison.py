"""Poison and replay: a message that kills every worker it reaches is tried a bounded number of times, then
fails with PoisonMessage and is kept in the dead-letter list; the other messages are all answered."""

from __future__ import annotations

import json
import logging
import logging.handlers
import pickle
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import redis
from celery import Celery, states
from celery.app.task import Context
from celery.app.trace import TraceInfo
from celery.exceptions import Reject

from producer.client import Client
from producer.errors import PoisonMessage
from producer.settings import Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, ROOT, worker_env
from workers.errors import QuarantineFull
from workers.receiving import trace_logs
from workers.receiving.dead_letter import DEAD_LETTER_KEY
from workers.receiving.deliveries import KEY, MIN_WAIT_S, quarantine_wait, quarantined, redelivery_counts

pytestmark = pytest.mark.integration
DB = 9
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"


def test_a_message_that_crashes_its_worker_every_time_ends_in_the_dead_letter_list(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path_factory.mktemp("poison") / "inferq.toml"
    config.write_text('fault_crash_on_text = "POISON"\nmax_deliveries = 3\nvisibility_timeout = 4\n'
                      "worker_concurrency = 16\n[time_limits]\nembed = 3\nclassify = 3\ngenerate = 3\n"
                      "[models]\ngenerate = {}\n")
    env = worker_env(config, URL)
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "poison-launcher.log"
    with log_path.open("wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none", "--kinds",
                                     "embed"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    client = Client(Settings(redis_url=URL, result_timeout=180))
    try:
        good = [client.submit_embed([f"good message {i}"]) for i in range(10)]
        poison = client.app.send_task("inferq.embed", kwargs={"texts": ["a POISON pill"]}, queue="embed")
        good += [client.submit_embed([f"good message {i}"]) for i in range(10, 20)]
        with pytest.raises(PoisonMessage, match=r"delivered 4 times, and the worker running it died each time "
                                                r"\(max_deliveries = 3\)"):
            client.handle(poison.id).get(timeout=240)
        assert [handle.get(timeout=120)["dim"] for handle in good] == [384] * 20
        log_text = log_path.read_text()
        assert log_text.count("exited with code 86") == 3, log_text[-3000:]
        dead = [json.loads(raw) for raw in store.lrange(DEAD_LETTER_KEY, 0, -1)]
        assert [entry["task_id"] for entry in dead] == [poison.id]
        assert dead[0]["queue"] == "embed" and "a POISON pill" in dead[0]["raw"]
        time.sleep(6)  # past another visibility timeout: nothing comes back
        assert store.llen("embed") == 0 and store.hlen("unacked") == 0
        assert log_path.read_text().count("exited with code 86") == 3
        assert client.embed(["still serving"])["dim"] == 384
        replay_of_an_answered_message(client, store)
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
        client.close()
        store.flushdb()
        store.close()


def replay_of_an_answered_message(client: Client, store: redis.Redis) -> None:
    """A worker that died after storing a result and before acknowledging it leaves a redelivered message
    whose answer is already stored: it is not run again, and the stored answer stays the only one."""
    # Before: a good message the last crash caught between its stored result and its ack was counted too.
    answered_before = already_answered(client)
    earlier = {"model": "answered earlier", "dim": 1, "embeddings": [[1.0]]}
    parked = client.app.send_task("inferq.embed", kwargs={"texts": ["answered before the worker died"]},
                                  queue="parked")  # a queue no worker reads, to take the message's bytes
    message = json.loads(store.rpop("parked") or b"null")
    message["headers"]["redelivered"] = True
    message["properties"]["delivery_info"]["redelivered"] = True  # as Kombu marks a restored message
    client.app.backend.store_result(parked.id, earlier, "SUCCESS")
    store.lpush("embed", json.dumps(message))
    # Wait for the count, not for an empty queue: the queue empties when the message is taken, before the
    # poison check counts it.
    deadline = time.monotonic() + 60
    while already_answered(client) < answered_before + 1:
        assert time.monotonic() < deadline, (store.llen("embed"), store.hlen("unacked"))
        time.sleep(0.1)
    assert client.handle(parked.id).get(timeout=10) == earlier
    while store.hlen("unacked"):  # its acknowledgement follows the count
        assert time.monotonic() < deadline, "the message answered already was never acknowledged"
        time.sleep(0.05)
    assert already_answered(client) == answered_before + 1
    assert store.llen("embed") == 0


def already_answered(client: Client) -> int:
    replies = client.app.control.broadcast("inferq_status", reply=True, timeout=2.0)
    statuses = [status for reply in replies for status in reply.values()]
    assert len(statuses) == 1, statuses
    return int(statuses[0]["already_answered"])


def test_a_redelivered_message_that_cannot_get_the_quarantine_in_time_goes_back_to_its_queue() -> None:
    """Waiting on would let Redis hand it out again while it runs, and running beside the quarantined message
    would blame a crash on the wrong one: it goes back uncounted, and runs alone when its turn comes."""
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    client = Client(Settings(redis_url=URL))

    def redelivered(task_id: str) -> SimpleNamespace:
        return SimpleNamespace(id=task_id, task="inferq.embed", args=(), kwargs={"texts": ["x"]},
                               delivery_info={"redelivered": True, "routing_key": "embed"})

    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with quarantined(client.app, redelivered("holder"), 3, 60, 1.0):
            entered.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(30)
        before = redelivery_counts()["quarantine_full"]
        with pytest.raises(Reject) as rejected, quarantined(client.app, redelivered("waiter"), 3, 60, 0.2):
            pytest.fail("the redelivered message ran beside the quarantined one")
        assert rejected.value.requeue and "goes back to its queue" in str(rejected.value.reason)
        assert redelivery_counts()["quarantine_full"] == before + 1
        assert store.get(KEY.format("waiter")) is None  # not counted against it: it did not run
        leave.set()
        holder.join(30)
        with quarantined(client.app, redelivered("waiter"), 3, 60, 0.2) as earlier:
            assert earlier is None
            assert store.get(KEY.format("waiter")) == b"1"
        assert store.get(KEY.format("waiter")) is None
    finally:
        leave.set()
        holder.join(30)
        client.close()
        store.flushdb()
        store.close()


def test_a_message_sent_back_for_a_busy_quarantine_is_logged_by_celery_at_info_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """Expected whenever two redelivered messages meet in one worker, and counted: Celery's tracer logged each
    at WARNING with a traceback. Other rejections keep Celery's own policy."""
    trace_logs.install()
    trace_logs.install()  # a second call adds no second filter
    filters = logging.getLogger(trace_logs.TRACE_LOGGER).filters
    assert sum(isinstance(found, trace_logs.TraceNoise) for found in filters) == 1

    def generate() -> None:
        pass

    task = Celery("poison-logs", set_as_current=False).task(name="inferq.generate")(generate)
    request = Context(id="m-1", hostname="worker@host", args=[], kwargs={})
    with caplog.at_level(logging.INFO, logger=trace_logs.TRACE_LOGGER):
        for rejection in (QuarantineFull("redelivered message m-1 waited 1 s"), Reject("other", requeue=True)):
            try:
                raise rejection
            except Reject:
                TraceInfo(states.REJECTED).handle_reject(task, request)  # what Celery's tracer calls
    ours, other = (record for record in caplog.records if record.name == trace_logs.TRACE_LOGGER)
    assert ours.levelno == logging.INFO and ours.exc_info is None and "m-1 waited 1 s" in ours.getMessage()
    assert other.levelno == logging.WARNING and other.exc_info is not None
    # --loglevel WARNING: Celery's handlers have no level of their own, so the logger's filter must drop it
    logger, shown = logging.getLogger(trace_logs.TRACE_LOGGER), logging.handlers.BufferingHandler(10)
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(shown)
    try:
        try:
            raise QuarantineFull("redelivered message m-2 waited 1 s")
        except Reject:
            TraceInfo(states.REJECTED).handle_reject(task, request)
    finally:
        logger.removeHandler(shown)
        logger.setLevel(level)
    assert not shown.buffer
    assert pickle.loads(pickle.dumps(QuarantineFull("again"))).requeue  # as Reject, it survives a pickle


def test_the_quarantine_wait_leaves_the_run_within_the_visibility_timeout() -> None:
    settings = Settings()
    generate = quarantine_wait(settings.visibility_timeout, settings.time_limits.generate)
    assert generate + settings.time_limits.generate < settings.visibility_timeout
    assert generate == (150 - 120) / 2
    assert quarantine_wait(1000, 30) == 30  # never longer than the run it waits for
    assert quarantine_wait(30.5, 30) == MIN_WAIT_S  # no busy loop of messages going back and forth
