"""`inferq worker --gpus none --replicas 2`: two pinned CPU workers under one supervisor share a queue, serve
only their kinds, come back when killed, stop together, and `inferq check` tells healthy from not."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client
from producer.settings import Settings
from tests.conftest import ARTIFACTS, REDIS_HOST, REDIS_PORT, ROOT, free_port, start_redis_server, stop, worker_env
from workers.supervision.launcher import Launcher, LaunchError, Slot, default_receivers, plan_slots, split_slots

DB = 12  # the launcher's workers must not take the session worker's messages (database 13), nor it theirs
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
HOST = socket.gethostname()
NODES = [f"cpu0@{HOST}", f"cpu1@{HOST}"]


# --- planning (no processes) ---------------------------------------------------------------------------

def test_none_gives_numbered_cpu_workers_that_see_no_gpu() -> None:
    assert plan_slots("none", 3, "h", lambda: ["0", "1"]) == [
        Slot("cpu0@h", "", "cpu"), Slot("cpu1@h", "", "cpu"), Slot("cpu2@h", "", "cpu")]


def test_all_and_ids_pin_one_worker_to_each_gpu() -> None:
    # each child sees only its own GPU, which it calls cuda:0
    assert plan_slots("all", None, "h", lambda: ["0", "1"]) == [Slot("gpu0@h", "0", "cuda:0"),
                                                              Slot("gpu1@h", "1", "cuda:0")]
    assert plan_slots("0, 2", None, "h", lambda: ["0", "1", "2"]) == [Slot("gpu0@h", "0", "cuda:0"),
                                                                    Slot("gpu2@h", "2", "cuda:0")]


@pytest.mark.parametrize(("gpus", "replicas", "present", "message"), [
    ("all", None, [], "--gpus all: no GPU found"),
    ("3", None, ["0", "1"], "--gpus names 3, but this machine has 0, 1"),
    ("0", None, [], "--gpus names 0, but this machine has no GPU"),
    ("0,0", None, ["0"], "--gpus names a GPU twice"),
    (",", None, ["0"], "--gpus must be all, none or GPU ids"),
    ("all", 2, ["0"], "--replicas is for --gpus none"),
    ("0", 1, ["0"], "--replicas is for --gpus none"),
    ("none", 0, [], "--replicas must be at least 1; got 0"),
])
def test_impossible_requests_say_what_is_wrong(gpus: str, replicas: int | None, present: list[str],
                                               message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        plan_slots(gpus, replicas, "h", lambda: present)


def test_receivers_share_one_device_process_per_device() -> None:
    slots = plan_slots("0,1", None, "h", lambda: ["0", "1"])
    assert split_slots(slots, 2, "/run/x") == [
        Slot("gpu0-device", "0", "cuda:0", listen="/run/x/gpu0.sock"),
        # receivers never see the GPU: only the device process initialises CUDA
        Slot("gpu0-r1@h", "", "cuda:0", device_server="/run/x/gpu0.sock"),
        Slot("gpu0-r2@h", "", "cuda:0", device_server="/run/x/gpu0.sock"),
        Slot("gpu1-device", "1", "cuda:0", listen="/run/x/gpu1.sock"),
        Slot("gpu1-r1@h", "", "cuda:0", device_server="/run/x/gpu1.sock"),
        Slot("gpu1-r2@h", "", "cuda:0", device_server="/run/x/gpu1.sock")]
    # one receiver keeps the whole worker's node name
    assert [s.name for s in split_slots(plan_slots("none", 1, "h", list), 1, "/d")] == ["cpu0-device", "cpu0@h"]
    with pytest.raises(LaunchError, match="--receivers must be at least 1"):
        split_slots(slots, 0, "/d")


def test_default_receivers_leave_a_core_to_each_device_process() -> None:
    assert [default_receivers(cores, 1) for cores in (1, 2, 4, 16, 64)] == [1, 1, 3, 8, 8]
    assert default_receivers(16, 8) == 1 and default_receivers(32, 4) == 7


def test_receivers_run_no_torch_threads_and_know_their_device_process() -> None:
    launcher = Launcher(split_slots(plan_slots("none", 1, "h", list), 2, "/d"), ("embed",), None, 5.0,
                        torch_threads=2, device_key="k")
    device, receiver = launcher.children[0].slot, launcher.children[1].slot
    assert launcher.command(device)[3:] == ["device-server", "--listen", "/d/cpu0.sock", "--kinds", "embed",
                                            "--name", "cpu0-device"]
    env = launcher.environment(receiver)
    assert (env["INFERQ_DEVICE_SERVER"], env["INFERQ_DEVICE_SERVER_KEY"]) == ("/d/cpu0.sock", "k")
    assert (env["INFERQ_TORCH_THREADS"], env["OMP_NUM_THREADS"], env["CUDA_VISIBLE_DEVICES"]) == ("1", "1", "")
    assert launcher.environment(device)["INFERQ_DEVICE_SERVER_KEY"] == "k"


def nowhere() -> dict[str, str]:
    """An environment whose Redis is a closed port: should a refusal regress, no worker serves a real database."""
    return {**os.environ, "INFERQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}


@pytest.mark.parametrize(("args", "message"), [
    (["--receivers", "2"], "--receivers needs --gpus"),
    (["--gpus", "none", "--replicas", "2", "--receivers", "2"], "use one or the other"),
    (["--gpus", "none", "--replicas", "1", "--receivers", "2"], "use one or the other"),
])
def test_the_command_line_refuses_receivers_it_cannot_plan(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "producer.cli", "worker", *args], capture_output=True, text=True,
                          cwd=ROOT, env=nowhere(), timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_command_line_refuses_gpus_this_machine_lacks() -> None:
    done = subprocess.run([sys.executable, "-m", "producer.cli", "worker", "--gpus", "7"], capture_output=True,
                          text=True, cwd=ROOT, env={**nowhere(), "CUDA_VISIBLE_DEVICES": "0"}, timeout=60)
    assert done.returncode == 2
    assert "--gpus names 7, but this machine has 0" in done.stderr


# --- a real launcher with two CPU workers ----------------------------------------------------------------

def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "INFERQ_REDIS_URL": URL}, timeout=timeout)


class Launched:
    """A running `inferq worker --gpus ...` and a client on its Redis database."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, client: Client,
                 nodes: list[str]) -> None:
        self.process, self.log_path, self.client, self.nodes = process, log_path, client, nodes

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def status(self, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
        replies = self.client.app.control.broadcast("inferq_status", reply=True, timeout=timeout,
                                                    destination=self.nodes)
        return {node: answer for reply in replies for node, answer in reply.items() if answer.get("ready")}

    def wait_ready(self, nodes: list[str], timeout: float = 120, not_pid: int | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the launcher exited:\n{self.log()[-3000:]}"
            ready = self.status()
            if all(node in ready and ready[node]["pid"] != not_pid for node in nodes):
                return ready
            time.sleep(0.2)
        raise AssertionError(f"{nodes} not ready in {timeout} s:\n{self.log()[-3000:]}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    store.flushdb()
    config = tmp_path_factory.mktemp("launcher") / "inferq.toml"
    # embed only (with generate's registry emptied, SmolLM2 never loads); short limits keep shutdown short
    config.write_text("worker_concurrency = 16\nvisibility_timeout = 20\n[time_limits]\nembed = 10\nclassify = 10\n"
                      "generate = 10\n[models]\ngenerate = {}\n")
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "launcher.log"
    env = worker_env(config, URL)
    # Nobody serves this database yet: the health check must say so (asked before the launcher starts, so it
    # cannot race its children's start-up).
    early = run_cli("check", "--local", "--timeout", "0.5")
    assert early.returncode == 1, early.stdout
    assert "unhealthy: no worker answered within 0.5 s" in early.stderr
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none", "--replicas",
                                    "2", "--kinds", "embed"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    client = Client(Settings(redis_url=URL, result_timeout=60))
    launched = Launched(process, log_path, client, NODES)
    try:
        launched.wait_ready(NODES)
        yield launched
    finally:
        stop(process, 60)
        client.close()
        store.flushdb()
        store.close()


def test_two_workers_take_work_from_the_same_queue(launched: Launched) -> None:
    before = launched.status()
    handles = [launched.client.submit_embed([f"request {i} " + "word " * (i % 20)]) for i in range(300)]
    assert all(len(handle.get()["embeddings"]) == 1 for handle in handles)
    after = launched.status()
    served = {node: after[node]["counts"].get("embed/minilm:requests", 0)
              - before[node]["counts"].get("embed/minilm:requests", 0) for node in NODES}
    assert sum(served.values()) == 300, served
    assert all(n > 0 for n in served.values()), f"one worker took everything: {served}"


def test_a_worker_serving_only_embed_never_receives_generate(launched: Launched) -> None:
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
    sent = [launched.client.app.send_task("inferq.generate", kwargs={"prompt": "hi"}, queue="generate")
            for _ in range(5)]
    launched.client.embed(["after the generate tasks"])  # both workers are consuming
    time.sleep(1.0)
    assert store.llen("generate") == 5  # still waiting for a worker that serves generate
    assert all(result.state == "PENDING" for result in sent)
    for node, status in launched.status().items():
        assert status["kinds"] == ["embed"], node
        assert not any(key.startswith("generate/") for key in status["counts"]), status["counts"]
    store.delete("generate")
    store.close()


def test_check_is_healthy_when_every_worker_runs_a_tiny_inference(launched: Launched) -> None:
    done = run_cli("check", "--local", "--expect", "2")
    assert done.returncode == 0, done.stderr
    for node in NODES:
        assert f"{node}: ok (embed/minilm answered in" in done.stdout


def test_check_returns_once_every_named_worker_answered(launched: Launched) -> None:  # not --timeout later
    started = time.monotonic()
    done = run_cli("check", "--name", NODES[0], "--name", NODES[1], "--timeout", "40")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took < 20, f"it took {took:.1f} s: it waited for more answers after both workers had answered"


def test_check_is_unhealthy_for_a_frozen_worker_or_too_few_workers(launched: Launched) -> None:
    cpu1 = launched.status()[NODES[1]]["pid"]
    os.kill(cpu1, signal.SIGSTOP)  # alive but not answering, as a hung process would be
    try:
        named = run_cli("check", "--name", NODES[0], "--name", NODES[1], "--timeout", "2")
        counted = run_cli("check", "--local", "--expect", "2", "--timeout", "2")
    finally:
        os.kill(cpu1, signal.SIGCONT)
    assert named.returncode == 1
    assert f"{NODES[0]}: ok" in named.stdout
    assert f"unhealthy: no answer from {NODES[1]}" in named.stderr
    assert counted.returncode == 1
    assert "unhealthy: 1 healthy worker(s) answered; expected at least 2" in counted.stderr


def test_a_killed_worker_is_restarted_and_serves_again(launched: Launched) -> None:
    pid = launched.status()[NODES[0]]["pid"]
    os.kill(pid, signal.SIGKILL)
    ready = launched.wait_ready([NODES[0]], timeout=90, not_pid=pid)
    assert ready[NODES[0]]["load_counts"] == {"embed/minilm": 1}  # a fresh process, models loaded once
    assert f"{NODES[0]} (pid {pid}) exited with signal SIGKILL" in launched.log()
    assert f"restarting {NODES[0]} (restart 1)" in launched.log()
    handles = [launched.client.submit_embed([f"after the restart {i}"]) for i in range(50)]
    assert all(handle.get()["dim"] == 384 for handle in handles)


def test_sigterm_stops_every_worker_and_the_launcher(launched: Launched) -> None:
    pids = [status["pid"] for status in launched.wait_ready(NODES).values()]
    launched.process.send_signal(signal.SIGTERM)
    assert launched.process.wait(timeout=60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "all workers stopped" in launched.log()


def _live_children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_children_of_a_launcher_that_is_killed_end_with_it(tmp_path: Path) -> None:
    """SIGKILL leaves the launcher no time to stop its children: each asks, as it starts, for SIGTERM when it
    dies (a receiver then stops warm, its device process once the receiver is gone), so none lives on
    unsupervised, holding a device."""
    port = free_port()
    store = redis.Redis(host=REDIS_HOST, port=port)
    server = start_redis_server(tmp_path, ["--port", str(port)], store)
    config = tmp_path / "inferq.toml"
    config.write_text("worker_concurrency = 4\nvisibility_timeout = 20\n[time_limits]\nembed = 10\nclassify = 10\n"
                      "generate = 10\n[models]\ngenerate = {}\n")
    url = f"redis://{REDIS_HOST}:{port}/0"
    client = Client(Settings(redis_url=url, result_timeout=60))
    ARTIFACTS.mkdir(exist_ok=True)
    with (ARTIFACTS / "launcher-killed.log").open("wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none", "--receivers",
                                     "1", "--kinds", "embed"], env=worker_env(config, url), stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not client.app.control.broadcast("inferq_status", reply=True, timeout=1.0):  # its receiver is up
            assert launcher.poll() is None and time.monotonic() < deadline, "the launcher's receiver never started"
        children = _live_children(launcher.pid)
        assert len(children) == 2  # the device process and its receiver
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 60
        while not all(_gone(child) for child in children):
            assert time.monotonic() < deadline, f"children outlived the launcher: {children}"
            time.sleep(0.2)
    finally:
        for child in children:
            if not _gone(child):
                os.kill(child, signal.SIGKILL)
        if launcher.poll() is None:
            stop(launcher, 10)
        client.close()
        stop(server, 10)
        store.close()


def test_a_child_whose_launcher_is_gone_before_it_asked_for_the_signal_ends_at_once() -> None:
    """The signal is asked for after the exec: a launcher that died in between is noticed by its pid."""
    code = "from workers.supervision.launcher import die_with_launcher; die_with_launcher(); print('lived on')"
    orphan = subprocess.run([sys.executable, "-c", code], env={**os.environ, "INFERQ_LAUNCHER_PID": "1"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)  # its parent is this test, not pid 1
    assert orphan.returncode == 1 and "the launcher (pid 1) that started this process is gone" in orphan.stderr
    parent = {**os.environ, "INFERQ_LAUNCHER_PID": str(os.getpid())}
    supervised = subprocess.run([sys.executable, "-c", code], env=parent, cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
    assert supervised.returncode == 0 and supervised.stdout.strip() == "lived on", supervised.stderr
