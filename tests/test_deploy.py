"""The deployment files, checked by the real tools: docker-compose (the compose schema), hadolint (the
Dockerfiles), promtool (the Prometheus config), and the Grafana dashboard's queries against real metric names.

scripts/test.sh installs docker-compose, prometheus and chromium from Debian's packages when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

COMPOSE_ENV = {"REDIS_PASSWORD": "compose-test-password", "FLOWER_BASIC_AUTH": "admin:compose-test",
               "INFERQ_API_KEYS": '{"webapp": "sk-compose-test"}'}


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is missing: scripts/test.sh installs it"
    return found


def compose(*args: str, file: Path = ROOT / "docker-compose.yml",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    return subprocess.run([tool("docker-compose"), "-f", str(file), "--project-directory", str(ROOT), *args],
                          capture_output=True, text=True, env={**base, **(env if env is not None else COMPOSE_ENV)},
                          timeout=120)


def test_the_compose_file_validates() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_the_compose_validation_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("stop_grace_period:", "stop_grace_perod:"))
    done = compose("config", "-q", file=broken)
    assert done.returncode != 0
    assert "stop_grace_perod" in done.stderr


def test_compose_refuses_to_start_without_the_passwords() -> None:
    done = compose("config", "-q", env={})
    assert done.returncode != 0
    assert "set REDIS_PASSWORD" in done.stderr


def resolved() -> dict[str, Any]:
    done = compose("--profile", "cpu", "--profile", "monitoring", "config")
    assert done.returncode == 0, done.stderr
    import yaml

    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_wires_redis_flower_workers_and_the_web_app() -> None:
    services = resolved()["services"]
    assert set(services) == {"redis", "worker", "worker-cpu", "flower", "gateway", "webapp", "prometheus",
                             "grafana"}
    redis_command = services["redis"]["command"]
    assert "--appendonly yes" in redis_command and "--appendfsync everysec" in redis_command
    assert "--requirepass" in redis_command
    url = "redis://:compose-test-password@redis:6379/0"
    for name in ("worker", "worker-cpu", "flower", "gateway", "webapp"):
        assert services[name]["environment"]["INFERQ_REDIS_URL"] == url, name
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert services["worker"]["command"][:2] == ["--gpus", "all"]
    assert services["worker-cpu"]["command"][:2] == ["--gpus", "none"]
    flower = services["flower"]
    assert flower["command"] == ["inferq", "flower"]
    assert flower["environment"]["INFERQ_FLOWER_BASIC_AUTH"] == "admin:compose-test"
    assert flower["environment"]["INFERQ_FLOWER_DB"].startswith("/data/")
    assert "flower-data:/data:rw" in flower["volumes"]  # Flower's state outlives its container
    gateway = services["gateway"]
    assert gateway["command"][:2] == ["inferq", "gateway"] and "0.0.0.0" in gateway["command"]
    assert gateway["environment"]["INFERQ_GATEWAY__API_KEYS"] == '{"webapp": "sk-compose-test"}'
    assert "/health" in " ".join(gateway["healthcheck"]["test"])


def test_a_second_host_points_its_workers_at_the_first_hosts_redis() -> None:
    # The variables of the README's command for a second host, and no others.
    done = compose("config", env={"REDIS_HOST": "10.1.2.3", "REDIS_PASSWORD": "compose-test-password",
                                  "FLOWER_BASIC_AUTH": "unused", "INFERQ_API_KEYS": "{}"})
    assert done.returncode == 0, done.stderr
    assert "redis://:compose-test-password@10.1.2.3:6379/0" in done.stdout


def test_the_dockerfiles_pass_hadolint() -> None:
    done = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"),
                           str(ROOT / "docker/worker.Dockerfile"), str(ROOT / "docker/producer.Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_worker_image_checks_its_health_and_pins_cuda_torch() -> None:
    dockerfile = (ROOT / "docker/worker.Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM nvidia/cuda:" in dockerfile
    assert 'HEALTHCHECK' in dockerfile and '"inferq", "check", "--local"' in dockerfile
    assert 'pip install "torch==2.13.0"' in dockerfile


def test_prometheus_finds_every_compose_service_that_serves_worker_metrics() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    workers = next(job for job in config["scrape_configs"] if job["job_name"] == "inferq-workers")
    discovered = {(name, sd["port"]) for sd in workers["dns_sd_configs"] for name in sd["names"]}
    serving = {(name, int(service["environment"]["INFERQ_METRICS_PORT"]))
               for name, service in resolved()["services"].items()
               if "INFERQ_METRICS_PORT" in service.get("environment", {})}
    assert serving == {("worker", 9810), ("worker-cpu", 9810)}
    assert serving <= discovered
    gateways = next(job for job in config["scrape_configs"] if job["job_name"] == "inferq-gateway")
    gateway = resolved()["services"]["gateway"]["environment"]
    assert gateway["INFERQ_GATEWAY__METRICS_ADDRESS"] == "0.0.0.0"
    assert {("gateway", int(gateway["INFERQ_GATEWAY__METRICS_PORT"]))} == {
        (name, sd["port"]) for sd in gateways["dns_sd_configs"] for name in sd["names"]}


def test_the_prometheus_config_passes_promtool() -> None:
    done = subprocess.run([tool("promtool"), "check", "config", str(ROOT / "deploy/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/inferq.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_dashboard_query_parses() -> None:
    # promtool parses PromQL inside rule files: wrap each panel's query as a recording rule
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"inferq:panel_{i}", "expr": expr}
                                                        for i, expr in enumerate(dashboard_queries())]}]}
    path = ROOT / "test-artifacts" / "dashboard-rules.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(rules))
    done = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(dashboard_queries())} rules found" in done.stdout


@pytest.mark.parametrize("needed", ["flower_events_total", "flower_task_runtime_seconds_bucket",
                                    "inferq_queue_depth", "flower_worker_online", "inferq_gateway_requests_total",
                                    "inferq_gateway_request_seconds_bucket", "inferq_gateway_streams_open"])
def test_the_dashboard_shows_tasks_runtime_queue_depth_and_workers(needed: str) -> None:
    assert any(needed in expr for expr in dashboard_queries())
