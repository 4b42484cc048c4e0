"""Multi-host drill on one machine: Redis and two worker "hosts", each in a network namespace of its own
(`ip netns`, veth pairs), the producer in the root namespace on a link of its own to Redis.

Phase 1: requests are answered by both hosts. Phase 2: under a steady load, one host's link is cut
(`ip link set ... down` inside its namespace: its sockets get no reset, they just stop hearing back). The
messages it held stay unacknowledged in Redis; once the visibility timeout passes, the other host's restore
sweep puts them back on the queue and answers them. Every accepted request must get its answer, the held
ones from the other host, and that host must stay up. Measured and reported (test-artifacts/
multi-host-drill.json): what the cut host held, how long until the last of it was answered, who answered
what, anything answered twice, and how soon the cut host serves again once its link is back.

A host cut while it waits idle is the second test: Redis still counts a BRPOP of that host's as waiting and
would hand it the next message, off its queue and recorded nowhere, into a socket whose peer cannot hear. The
receivers wait with BRPOP on bells that hold tokens, never messages (workers/receiving/waiting.py), so nothing
is handed to a waiting host.

Skipped, with the reason, where network namespaces cannot be made (not root, no `ip`, no permission).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client, Handle
from producer.errors import InferqConnectionError
from producer.settings import Settings
from tests.conftest import (
    ARTIFACTS,
    TaskEvents,
    WorkerProcess,
    start_redis_server,
    unacked,
    whereabouts,
    whereabouts_report,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
PID = os.getpid()
# Redis's port in its own namespace, where no other server can hold it; one more for each test's Redis, since
# Kombu's pools are global and keyed by URL: a test's broadcast got a connection to the previous test's Redis.
_ports = itertools.count(6379)
VISIBILITY = 8.0  # seconds; the time limits (6 s) stay under it, as Settings requires
# Kombu's restore sweep runs every 5 s (producer/app.py); a host cut off in the middle of a sweep leaves the
# sweep's lock in Redis until it expires (30 s), delaying the next sweep by that much at worst.
SWEEP_S, SWEEP_LOCK_S = 5.0, 30.0
WINDOW = 16  # worker_concurrency x prefetch multiplier 1: what one host holds at most
HOST_DEV = "to-redis"  # the veth end inside each host's namespace


class NamespacesUnavailable(Exception):
    """An `ip` command that builds the namespaces failed: this machine cannot run the drill."""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise NamespacesUnavailable(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


@dataclass
class Network:
    """Namespaces `inferq-{redis,host1,host2}-<pid>`; host N reaches Redis over 10.231.255.(4N-4)/30, the root
    namespace over a /30 of 10.231.0-254.x chosen by pid, so two runs side by side do not share addresses."""

    namespaces: dict[str, str] = field(default_factory=lambda: {role: f"inferq-{role}-{PID}"
                                                                for role in ("redis", "host1", "host2")})
    root_dev: str = f"iq{PID}"  # the root namespace's veth end: a name unique there, of 15 characters at most
    made: list[str] = field(default_factory=list)
    server: subprocess.Popen[bytes] | None = None
    cut: set[str] = field(default_factory=set)
    port: int = field(default_factory=lambda: next(_ports))

    def __post_init__(self) -> None:
        index = PID % (255 * 64)
        subnet, first = f"10.231.{index // 64}", index % 64 * 4
        self.root_address = f"{subnet}.{first + 1}"
        # Redis as each side sees it (over the root link, or over each host's own link), and each host's address
        self.redis_address = {"root": f"{subnet}.{first + 2}", "host1": "10.231.255.1", "host2": "10.231.255.5"}
        self.host_address = {"host1": "10.231.255.2", "host2": "10.231.255.6"}

    def url(self, side: str) -> str:
        return f"redis://{self.redis_address[side]}:{self.port}/0"

    def launcher(self, role: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespaces[role])

    def build(self) -> None:
        for namespace in self.namespaces.values():
            ip("netns", "add", namespace)
            self.made.append(namespace)
        redis_ns = self.namespaces["redis"]
        ip("link", "add", self.root_dev, "type", "veth", "peer", "name", "to-root", "netns", redis_ns)
        ip("addr", "add", f"{self.root_address}/30", "dev", self.root_dev)
        ip("link", "set", self.root_dev, "up")
        ip("-n", redis_ns, "addr", "add", f"{self.redis_address['root']}/30", "dev", "to-root")
        ip("-n", redis_ns, "link", "set", "to-root", "up")
        for host in ("host1", "host2"):
            host_ns = self.namespaces[host]
            ip("link", "add", "name", HOST_DEV, "netns", host_ns, "type", "veth", "peer", "name", f"to-{host}",
               "netns", redis_ns)
            ip("-n", redis_ns, "addr", "add", f"{self.redis_address[host]}/30", "dev", f"to-{host}")
            ip("-n", redis_ns, "link", "set", f"to-{host}", "up")
            ip("-n", host_ns, "addr", "add", f"{self.host_address[host]}/30", "dev", HOST_DEV)
            ip("-n", host_ns, "link", "set", HOST_DEV, "up")
        for namespace in self.namespaces.values():
            ip("-n", namespace, "link", "set", "lo", "up")

    def start_redis(self, workdir: Path) -> None:
        probe = redis.Redis(host=self.redis_address["root"], port=self.port, socket_connect_timeout=1)
        try:
            # bound to each link's address, so each side reaches it over its own link; no password on this
            # private network, hence no protected mode
            self.server = start_redis_server(
                workdir, ["--port", str(self.port), "--protected-mode", "no", "--appendonly", "no",
                          "--bind", *self.redis_address.values()], probe, self.launcher("redis"))
        finally:
            probe.close()

    def set_link(self, host: str, state: str) -> None:
        ip("-n", self.namespaces[host], "link", "set", HOST_DEV, state)
        if state == "down":
            self.cut.add(host)
        else:
            self.cut.discard(host)

    def tear_down(self) -> list[str]:
        """Redis stopped, then the links and namespaces deleted (a namespace's veth ends go with it); returns
        what could not be deleted."""
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait(timeout=10)
        left: list[str] = []
        # Deleting the root end at once takes its peer with it; a namespace's own ends go when it is freed.
        subprocess.run(["ip", "link", "del", self.root_dev], capture_output=True, timeout=30)
        for namespace in reversed(self.made):
            try:
                ip("netns", "del", namespace)
            except NamespacesUnavailable as exc:
                left.append(str(exc))
        return left


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (`ip netns add`); this test runs as uid "
                    f"{os.geteuid()}")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (Debian's iproute2) to make network namespaces with")
    net = Network()
    probe = f"inferq-probe-{PID}"
    try:  # whether this machine can make a namespace at all; a failure past this one is the drill's own
        ip("netns", "add", probe)
    except NamespacesUnavailable as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")
    ip("netns", "del", probe)
    try:
        net.build()
        net.start_redis(tmp_path)
        yield net
    finally:
        left = net.tear_down()
        assert not left, f"namespaces left behind: {left}"


@dataclass
class Sent:
    at: float  # time.monotonic() when the call returned
    handle: Handle[Any]


class Load:
    """A producer thread: one single-text embed request every `interval` seconds until stopped."""

    def __init__(self, client: Client, interval: float) -> None:
        self.accepted: list[Sent] = []
        self.refused = 0  # calls that raised InferqConnectionError: the root namespace's link is never cut
        self.failed: list[str] = []  # anything else a call raised
        self._client, self._interval = client, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            try:
                self.accepted.append(Sent(time.monotonic(), self._client.submit_embed([f"load {index}"])))
            except InferqConnectionError:
                self.refused += 1
            except Exception as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}")
            index += 1
            time.sleep(self._interval)

    def halt(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def stop(self) -> None:
        self.halt()
        assert not self._thread.is_alive(), "a producer call hangs"
        assert not self.failed and not self.refused, f"producer calls failed: {self.failed[:3]}, {self.refused} refused"


@dataclass
class Cluster:
    """The two worker hosts on the network, the producer's client, a Redis client and the task events."""

    network: Network
    hosts: dict[str, WorkerProcess]
    client: Client
    store: redis.Redis
    events: TaskEvents
    ready: dict[str, dict[str, Any]]
    loads: list[Load]

    def load(self, interval: float) -> Load:
        """Load from now on; stopped when the cluster is, if the test has not stopped it."""
        self.loads.append(Load(self.client, interval))
        return self.loads[-1]

    def node(self, host: str) -> str:
        return self.hosts[host].node

    def status(self, host: str) -> dict[str, Any]:
        replies = self.client.app.control.broadcast("inferq_status", reply=True, timeout=5,
                                                    destination=[self.node(host)])
        return next((reply[self.node(host)] for reply in replies if self.node(host) in reply), {})


@contextmanager
def cluster(network: Network, tmp_path: Path, name: str) -> Iterator[Cluster]:
    config = tmp_path / "inferq.toml"
    config.write_text(f"visibility_timeout = {VISIBILITY:g}\nworker_concurrency = {WINDOW}\n"
                      "[time_limits]\nembed = 6\nclassify = 6\ngenerate = 6\n[models]\ngenerate = {}\n")
    hosts = {host: WorkerProcess(worker_env(config, network.url(host)), ARTIFACTS / f"{name}-{host}.log",
                                 f"{host}-{PID}@localhost", ("--kinds", "embed"), network.launcher(host))
             for host in ("host1", "host2")}
    client = Client(Settings(redis_url=network.url("root"), result_timeout=60, connect_timeout=2))
    store = redis.Redis(host=network.redis_address["root"], port=network.port, socket_timeout=10)
    events: TaskEvents | None = None
    loads: list[Load] = []
    try:
        ready = {host: worker.wait_ready(client) for host, worker in hosts.items()}
        events = TaskEvents(client)
        yield Cluster(network, hosts, client, store, events, ready, loads)
    finally:
        for load in loads:
            load.halt()
        for host in list(network.cut):  # a host whose link is back shuts down at once, not after its timeouts
            network.set_link(host, "up")
        if events is not None:
            events.close()
        for worker in hosts.values():
            worker.stop()
        client.close()
        store.close()


def answered(store: redis.Redis, task_ids: list[str]) -> set[str]:
    """Those of `task_ids` with a result stored."""
    raws = store.mget([f"celery-task-meta-{task_id}" for task_id in task_ids]) if task_ids else []
    return {task_id for task_id, raw in zip(task_ids, raws, strict=True) if raw is not None}


def gone(store: redis.Redis, task_ids: list[str]) -> list[str]:
    """Those of `task_ids` in no queue, no unacknowledged record and with no result: out of the visibility
    timeout's reach. Those the first read finds nowhere are read again a second later: a message the live
    host took and answered between two of the first read's commands is then answered."""
    first = [task_id for task_id, place in whereabouts(store, task_ids, ("embed",)).items() if place == "gone"]
    if not first:
        return []
    time.sleep(1.0)
    return [task_id for task_id, place in whereabouts(store, first, ("embed",)).items() if place == "gone"]


def test_a_host_cut_off_mid_load_loses_nothing(network: Network, tmp_path: Path) -> None:
    with cluster(network, tmp_path, "multi-host") as c:
        node = {host: c.node(host) for host in c.hosts}
        # Phase 1: both hosts answer. Each request a few milliseconds apart wakes both waiting hosts and goes to
        # the first to take it, so both get some; which host answered is told by its task-succeeded events.
        phase1: list[Handle[Any]] = []
        deadline = time.monotonic() + 60
        while not all(c.events.from_worker(name) for name in node.values()):
            assert time.monotonic() < deadline, f"not both hosts answered: {dict(c.events.per_worker)}"
            batch: list[Handle[Any]] = []
            for _ in range(20):
                batch.append(c.client.submit_embed([f"phase 1 request {len(phase1) + len(batch)}"]))
                time.sleep(0.01)
            assert [handle.get(timeout=30)["dim"] for handle in batch] == [384] * len(batch)
            phase1 += batch
            time.sleep(0.2)  # task events are published every 50 ms
        phase1_by_host = {host: c.events.from_worker(name) for host, name in node.items()}

        # Phase 2: steady load, then the cut. A burst of three windows just before it gives host 1 a full
        # window in hand when its link goes, as a host under heavy load has (single-text requests 10 ms apart
        # are answered in milliseconds: a fast host could hold nothing). A host cut while it waits idle is
        # the other test's case.
        load = c.load(0.01)
        time.sleep(2.0)
        burst = [Sent(time.monotonic(), c.client.submit_embed([f"burst {i}"])) for i in range(3 * WINDOW)]
        network.set_link("host1", "down")
        cut_at, cut_wall = time.monotonic(), time.time()
        at_cut = unacked(c.store)  # both hosts' messages: which are host 1's, its task-received events tell
        answered_at_cut = answered(c.store, [task_id for task_id, _ in at_cut.values()])
        time.sleep(4.0)  # load on host 2 alone, for a while
        load.stop()
        load_stopped_at = time.monotonic()
        accepted = load.accepted + burst
        ids = [sent.handle.id for sent in accepted]
        out_of_reach = gone(c.store, ids)  # before the visibility timeout brings anything back

        # Every accepted request answered, host 1's held ones once the visibility timeout brought them back.
        # When each message of the snapshot left its record (the sweep put it back on the queue, or it was
        # acknowledged; taken again, it is recorded again under the same tag, with a new delivery time), and
        # when each message got its answer:
        left_unacked: dict[str, float] = {}
        answered_when: dict[str, float] = {}
        deadline = cut_at + VISIBILITY + SWEEP_S + SWEEP_LOCK_S + 15
        while len(answered_when) < len(ids) and time.monotonic() < deadline:
            now = time.monotonic()
            records = unacked(c.store)
            for tag in at_cut.keys() - left_unacked.keys():
                if records.get(tag) != at_cut[tag]:
                    left_unacked[tag] = now
            for task_id in answered(c.store, [i for i in ids if i not in answered_when]):
                answered_when[task_id] = now
            time.sleep(0.1)
        missing = sorted(set(ids) - answered_when.keys())
        where_missing = whereabouts_report(c.store, missing, ("embed",)) if missing else ""
        host2_status = c.status("host2")

        # The link back: host 1 serves again (its connections resume, or it reconnects), answers anything it
        # had in hand that nobody answered meanwhile, and publishes the task events it buffered while cut.
        network.set_link("host1", "up")
        back_at = time.monotonic()
        after: list[Handle[Any]] = []
        serving_again_s = None
        while time.monotonic() - back_at < 60:
            after.append(c.client.submit_embed([f"after the link is back {len(after)}"]))
            time.sleep(0.1)
            if any(name == node["host1"] for handle in after for name, _ in c.events.answered_by(handle.id)):
                serving_again_s = round(time.monotonic() - back_at, 2)
                break
        answered_after_restore = sorted(set(missing) & answered(c.store, missing))
        time.sleep(1.0)  # the last of host 1's late task events

        # Host 1's messages at the cut: those of the snapshot delivered to it (its task-received events; those
        # of its last 50 ms before the cut were published only once its link was back).
        held = {tag: task_id for tag, (task_id, _) in at_cut.items() if node["host1"] in c.events.received_by(task_id)}
        held_ids = sorted(held.values())
        host2_took_back = {task_id: max((when for name, when in c.events.answered_by(task_id)
                                         if name == node["host2"]), default=None) for task_id in held_ids}
        took_back = [when for when in host2_took_back.values() if when is not None]
        answered_by_host1_in_cut = sum(1 for task_id in ids for name, when in c.events.answered_by(task_id)
                                       if name == node["host1"] and cut_wall < when < cut_wall + back_at - cut_at)
        twice = {task_id: [name for name, _ in c.events.answered_by(task_id)] for task_id in ids
                 if len(c.events.answered_by(task_id)) > 1}
        answers = [sent.handle.get(timeout=5) for sent in accepted if sent.handle.id not in missing]

        sent_at = {sent.handle.id: sent.at for sent in accepted}
        tags = {task_id: tag for tag, (task_id, _) in at_cut.items()}

        def story(task_id: str) -> dict[str, Any]:
            """What happened to one message, in seconds from the cut: for the last ones answered."""
            return {"sent": round(sent_at[task_id] - cut_at, 2), "unacked_at_cut": task_id in tags,
                    "left_unacked": round(left_unacked[tags[task_id]] - cut_at, 2)
                    if left_unacked.get(tags.get(task_id, "")) else None,
                    "received_by": c.events.received_by(task_id),
                    "answered_by": [(name, round(when - cut_wall, 2)) for name, when in c.events.answered_by(task_id)]}

        def last_since_cut(moments: list[float]) -> float | None:
            return round(max(moments) - cut_at, 2) if moments else None

        report = {
            "visibility_timeout_s": VISIBILITY,
            "phase1_sent": len(phase1), "phase1_answered_by": phase1_by_host,
            "accepted": len(accepted), "unacked_at_cut": len(at_cut),
            "held_at_cut": len(held), "held_answered_before_cut": len(answered_at_cut & set(held_ids)),
            "out_of_reach_while_cut": len(out_of_reach),
            "held_restored_s": last_since_cut([left_unacked[tag] for tag in held if tag in left_unacked]),
            "held_all_answered_s": last_since_cut([answered_when[i] for i in held_ids if i in answered_when]),
            "held_last_taken_back_by_host2_s": round(max(took_back) - cut_wall, 2) if took_back else None,
            "held_taken_back_by_host2": len(took_back),
            "all_answered_s": last_since_cut(list(answered_when.values())) if not missing else None,
            # from sent to its first task-succeeded event, the held ones left out: queueing on host 2 alone
            "slowest_other_answer_s": round(max((min(when for _, when in c.events.answered_by(i))
                                                 - (cut_wall + sent_at[i] - cut_at) for i in ids
                                                 if i not in held_ids and c.events.answered_by(i)), default=0), 2),
            "load_stopped_s": round(load_stopped_at - cut_at, 2),
            "unanswered_at_deadline": len(missing), "answered_only_after_link_back": len(answered_after_restore),
            "answered_by": {host: c.events.from_worker(name) for host, name in node.items()},
            "answered_by_host1_while_cut": answered_by_host1_in_cut,
            "host2_redelivered": host2_status.get("redelivered"),
            "host2_already_answered": host2_status.get("already_answered"),
            "answered_twice": len(twice), "answered_twice_by": sorted({" + ".join(names) for names in twice.values()}),
            "host1_serving_again_s": serving_again_s,
            "last_answered": [story(task_id) for task_id in sorted(answered_when, key=lambda i: answered_when[i])[-3:]],
        }
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "multi-host-drill.json").write_text(json.dumps(report, indent=2))
        print("\nmulti-host drill:", report)

        assert held, f"host 1 held nothing at the cut; nothing was tested: {report}"
        assert not missing, (f"{len(missing)} accepted requests unanswered {deadline - cut_at:.0f} s after the cut "
                             f"({len(answered_after_restore)} of them answered once the link was back): "
                             f"{where_missing}\n{report}\nhost1:\n{c.hosts['host1'].log()[-2000:]}")
        assert [answer["dim"] for answer in answers] == [384] * len(accepted)
        # host 1 could not reach Redis while cut: whatever of its window was answered, host 2 answered
        assert answered_by_host1_in_cut == 0, report
        assert len(took_back) == len(held_ids), (
            f"held messages host 2 did not answer: {[i for i, when in host2_took_back.items() if when is None]}")
        assert c.hosts["host2"].process.poll() is None and host2_status.get("pid") == c.ready["host2"]["pid"], (
            f"host 2 exited or restarted:\n{c.hosts['host2'].log()[-3000:]}")
        assert serving_again_s is not None, f"host 1 did not serve again within 60 s:\n{c.hosts['host1'].log()[-3000:]}"


def test_a_message_in_flight_to_an_idle_host_as_its_link_is_cut_stays_in_reach(network: Network,
                                                                               tmp_path: Path) -> None:
    """Under light load both hosts wait idle nearly all the time. Cut host 1's link then: a host waiting on
    BRPOP would still be counted as waiting, and the next message popped off the queue for it and written to a
    socket whose peer cannot hear (one per cut, before workers/receiving/waiting.py). Every accepted message
    must stay somewhere the visibility timeout reaches (its queue, the unacknowledged records) or be
    answered."""
    with cluster(network, tmp_path, "multi-host-idle") as c:
        load = c.load(0.1)  # each answered in milliseconds: both hosts mostly idle
        time.sleep(2.0)
        network.set_link("host1", "down")
        cut_at = time.monotonic()
        time.sleep(2.0)
        load.stop()
        ids = [sent.handle.id for sent in load.accepted]
        lost = gone(c.store, ids)
        sent_after_cut = {sent.handle.id: round(sent.at - cut_at, 3) for sent in load.accepted}
        print(f"\nidle host cut: {len(ids)} accepted, {len(lost)} out of reach while host 1 is cut, sent "
              f"{[sent_after_cut[task_id] for task_id in lost]} s after the cut")
        assert not lost, (f"{len(lost)} accepted messages in no queue, no unacknowledged record and unanswered "
                          f"while host 1 is cut (sent {[sent_after_cut[task_id] for task_id in lost]} s after the "
                          f"cut): {whereabouts_report(c.store, ids, ('embed',))}")
