"""Throughput in Flower, as a user sees it: `inferq flower` behind a password, its /metrics counting every
task message (batched or not) and the queue depth, Prometheus evaluating the Grafana dashboard's queries
against it, and the dashboard page in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Client
from producer.contract import PRIORITY_SEP, SENT_HEADER
from producer.monitoring import QueueDepthCollector
from tests.conftest import (
    ARTIFACTS,
    REDIS_HOST,
    REDIS_PORT,
    REDIS_URL,
    ROOT,
    Gateway,
    WorkerProcess,
    free_port,
    stop,
)

pytestmark = pytest.mark.integration
USER, PASSWORD = "admin", "flower-test-password"


class Flower:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, auth: bool = True) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path)
        if auth:
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics", auth=False)
        assert status == 200
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in metrics.items()
               if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def flower(worker: WorkerProcess, config_path: Path) -> Iterator[Flower]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERQ_", "FLOWER_"))}
    env.update(INFERQ_REDIS_URL=REDIS_URL, INFERQ_CONFIG=str(config_path), INFERQ_FLOWER_PORT=str(port),
               INFERQ_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    ARTIFACTS.mkdir(exist_ok=True)
    with (ARTIFACTS / "flower.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
    flower = Flower(f"http://127.0.0.1:{port}")
    try:
        def up() -> bool:
            assert process.poll() is None, (ARTIFACTS / "flower.log").read_text()
            try:
                return flower.get("/healthcheck", auth=False)[0] == 200
            except (urllib.error.URLError, ConnectionError):
                return False
        wait_for(up, 60, "flower to start")
        yield flower
    finally:
        stop(process, 20)
    assert PASSWORD not in (ARTIFACTS / "flower.log").read_text()  # nor in its argv: it came by environment


def test_flower_pages_and_task_api_need_the_password(flower: Flower) -> None:
    assert flower.get("/", auth=False)[0] == 401
    assert flower.get("/api/workers", auth=False)[0] == 401
    assert flower.get("/", auth=True)[0] == 200
    assert flower.get("/api/workers", auth=True)[0] == 200


def test_metrics_count_every_message_including_batched_ones(flower: Flower, client: Client,
                                                            worker: WorkerProcess) -> None:
    node = worker.node
    wait_for(lambda: total(flower.metrics(), "flower_worker_online", worker=node) == 1, 30, "flower to see the worker")
    before = flower.metrics()
    status_before = client.app.control.broadcast("inferq_status", reply=True, timeout=5, destination=[node])[0][node]
    handles = [client.submit_embed([f"metric sentence {i}"]) for i in range(60)]
    assert all(handle.get()["dim"] == 384 for handle in handles)
    status_after = client.app.control.broadcast("inferq_status", reply=True, timeout=5, destination=[node])[0][node]

    def counted(after: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
        return total(after, name, worker=node, task="inferq.embed", **labels) - \
            total(before, name, worker=node, task="inferq.embed", **labels)

    wait_for(lambda: counted(flower.metrics(), "flower_events_total", type="task-succeeded") >= 60, 30,
             "the success count to rise by 60")
    time.sleep(1.0)  # any extra event would have arrived by now
    after = flower.metrics()
    assert counted(after, "flower_events_total", type="task-succeeded") == 60
    assert counted(after, "flower_events_total", type="task-received") == 60
    assert counted(after, "flower_task_runtime_seconds_count") == 60
    batches = status_after["counts"]["embed/minilm:batches"] - status_before["counts"].get("embed/minilm:batches", 0)
    assert batches < 60, "every request ran alone: nothing here was batched"


def test_queue_depth_is_on_flower_metrics(flower: Flower) -> None:
    metrics = flower.metrics()
    queues = {dict(labels)["queue"] for name, labels in metrics if name == "inferq_queue_depth"}
    assert queues == {"embed", "classify", "generate"}
    assert ("inferq_unacked_messages", ()) in metrics


def test_queue_depth_counts_every_priority_list_and_unacked() -> None:
    db = 11
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    store.flushdb()
    try:
        store.lpush("generate", *[b"m"] * 3)
        store.lpush(f"generate{PRIORITY_SEP}6", b"m")
        store.lpush("embed", b"m")
        store.hset("unacked", mapping={"a": b"1", "b": b"2"})
        collector = QueueDepthCollector(f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", 2.0)
        collected = {(sample.name, tuple(sample.labels.values())): sample.value for family in collector.collect()
                     for sample in family.samples if sample.name != "inferq_queue_oldest_age_seconds"}
        assert collected == {("inferq_queue_depth", ("embed",)): 1, ("inferq_queue_depth", ("classify",)): 0,
                             ("inferq_queue_depth", ("generate",)): 4, ("inferq_unacked_messages", ()): 2}
    finally:
        store.flushdb()
        store.close()


def test_the_oldest_waiting_message_is_aged_by_its_send_time_or_from_when_it_was_first_seen() -> None:
    db = 11
    store = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    store.flushdb()

    def message(tag: str, headers: dict[str, Any]) -> bytes:
        return json.dumps({"body": "", "headers": {"id": tag, **headers}, "properties": {"delivery_tag": tag}}).encode()

    def ages() -> dict[str, float]:
        return {sample.labels["queue"]: sample.value for family in collector.collect() for sample in family.samples
                if sample.name == "inferq_queue_oldest_age_seconds"}

    try:
        collector = QueueDepthCollector(f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", 2.0)
        # embed: our producer's messages, stamped; the oldest (pushed first: the tail) waits in the bulk lane
        store.lpush(f"embed{PRIORITY_SEP}9", message("old", {SENT_HEADER: time.time() - 30}))
        store.lpush("embed", message("new", {SENT_HEADER: time.time() - 2}))
        store.lpush("generate", message("foreign", {}))  # a foreign client's: no send time
        first = ages()
        time.sleep(0.5)
        second = ages()
        assert 30 <= first["embed"] < 35 and first["classify"] == 0.0
        assert first["generate"] < 0.5 <= second["generate"] < 5  # counted from the first scrape that saw it
        store.rpop("generate")  # taken: a new tail starts from zero
        store.lpush("generate", message("foreign-2", {}))
        assert ages()["generate"] < 0.5
    finally:
        store.flushdb()
        store.close()


# Queries that cannot have data on this CPU machine, and why: no task fails here, and no GPU is there.
NO_DATA_HERE = ("task-failed", "inferq_device_memory_bytes", "inferq_gpu_utilization_ratio")


def test_prometheus_scrapes_flower_the_worker_and_the_gateway_and_every_dashboard_query_answers(
        flower: Flower, client: Client, worker: WorkerProcess, config_path: Path, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: scripts/test.sh installs it"
    target = urllib.parse.urlparse(flower.base).netloc
    # The shipped config, with this test's addresses where Docker's names would resolve.
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["inferq-flower"]["static_configs"] = [{"targets": [target]}]
    del jobs["inferq-workers"]["dns_sd_configs"]
    jobs["inferq-workers"]["static_configs"] = [{"targets": [f"127.0.0.1:{worker.metrics_port}"]}]
    gateway_metrics = free_port()
    gateway = Gateway(config_path, ARTIFACTS / "gateway-monitored.log", "--open",
                      INFERQ_GATEWAY__METRICS_PORT=str(gateway_metrics))
    del jobs["inferq-gateway"]["dns_sd_configs"]
    jobs["inferq-gateway"]["static_configs"] = [{"targets": [f"127.0.0.1:{gateway_metrics}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (ARTIFACTS / "prometheus.log").open("wb") as log:
        process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp_path / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"{api}/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            reply = json.loads(response.read())
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    try:
        def scraped() -> bool:
            try:
                return all(query(f'up{{job="{job}"}} == 1') for job in jobs)
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, (ARTIFACTS / "prometheus.log").read_text()
                return False
        wait_for(scraped, 60, "prometheus to scrape flower, the worker and the gateway")
        # load across several scrapes, so rates have two samples that differ
        for round_ in range(6):
            handles = [client.submit_classify([f"round {round_} text {i}"], labels=["a", "b"]) for i in range(20)]
            handles += [client.submit_embed([f"round {round_} text {i}"]) for i in range(20)]
            handles += [client.submit_generate(f"round {round_}", model="tiny-lm", max_new_tokens=4)]
            for handle in handles:
                handle.get()
            gateway.sdk().embeddings.create(model="minilm", input=[f"round {round_} through the gateway"])
            with pytest.raises(openai.BadRequestError):  # an error by type
                gateway.sdk().embeddings.create(model="minilm", input=[], dimensions=3)
            time.sleep(0.5)
        dashboard = json.loads((ROOT / "deploy/grafana/dashboards/inferq.json").read_text())
        deadline = time.monotonic() + 30
        while True:  # until the scrapes after the load have landed (or the deadline says which never did)
            answers = {target["expr"]: query(target["expr"])
                       for panel in dashboard["panels"] for target in panel["targets"]}
            empty = [expr for expr, series in answers.items()
                     if not series and not any(what in expr for what in NO_DATA_HERE)]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop(process, 20)
        gateway.stop()
    assert not empty, f"dashboard queries with no data: {empty}"
    rates = {series["metric"]["task"]: float(series["value"][1]) for series in
             answers['sum by (task) (rate(flower_events_total{type="task-succeeded"}[1m]))']}
    assert rates["inferq.embed"] > 0 and rates["inferq.classify"] > 0
    assert float(answers["sum(flower_worker_online)"][0]["value"][1]) >= 1
    p95 = answers["histogram_quantile(0.95, sum by (le, task) (rate(flower_task_runtime_seconds_bucket[5m])))"]
    assert all(float(series["value"][1]) > 0 for series in p95)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: scripts/test.sh installs it"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1400,800", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_dashboard_shows_the_worker_and_its_processed_counts(flower: Flower, client: Client,
                                                                 worker: WorkerProcess) -> None:
    def succeeded_seen() -> float:
        return total(flower.metrics(), "flower_events_total", type="task-succeeded", worker=worker.node)

    before = succeeded_seen()  # earlier tests' tasks count too: only these 30 are this test's
    assert all(handle.get()["dim"] == 384 for handle in [client.submit_embed([f"page {i}"]) for i in range(30)])
    wait_for(lambda: succeeded_seen() >= before + 30, 30, "Flower to see the 30 tasks")
    url = flower.base.replace("http://", f"http://{USER}:{PASSWORD}@") + "/"
    shot = ARTIFACTS / "flower-dashboard.png"
    shot.unlink(missing_ok=True)
    done = chromium(f"--screenshot={shot}", url)
    assert shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    dom = chromium("--dump-dom", url).stdout
    (ARTIFACTS / "flower-dashboard.html").write_text(dom)
    # DataTables renders one row per worker: name, status, active, processed, failed, succeeded, load
    rows = [row for row in re.findall(r"<tr[^>]*>(.*?)</tr>", dom, re.S) if f'title="{worker.node}"' in row]
    assert rows, f"{worker.node} not on the dashboard"
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", rows[0], re.S)]
    assert cells[:2] == [worker.node, "Online"], cells
    processed, succeeded = int(cells[3]), int(cells[5])
    assert processed >= before + 30 and succeeded >= before + 30, (before, cells)
