"""``inferq bench``: the raw model against the same model through the queue, in one run on one machine.

    inferq bench                                   # starts a worker, all kinds, default levels
    inferq bench --kinds embed --concurrency 1,64,256 --requests 2000 --processes 4
    inferq bench --no-worker                       # use workers already running on INFERQ_REDIS_URL
    inferq bench --client raw --kinds embed --backlog 20000      # drain a backlog; CPU per message
    inferq bench --client raw --backlog 20000 --worker-args "--gpus none --receivers 2"

Writes benchmarks/bench-<host>.json and benchmarks/bench-<host>.png (throughput and p95 latency against
concurrency) and prints a table. The raw figures come first, while the worker sits idle.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.load import Load, NewTokens, Sample, run_load
from benchmarks.raw import encode_rate, first_token_ms, load_embedder, raw_encode, raw_generate, single_ms
from producer.client import Client
from producer.settings import Kind, Settings


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(load: Load) -> dict[str, Any]:
    samples = load.samples
    latencies = [(s.done - s.sent) * 1000 for s in samples]
    first_send, last_send = min(s.sent for s in samples), max(s.sent for s in samples)
    last_done = max(s.done for s in samples)
    elapsed = last_done - first_send
    return {
        "requests": len(samples),
        "failed": sum(not s.ok for s in samples),
        "requests_per_s": len(samples) / elapsed,
        "tokens_per_s": sum(s.tokens for s in samples) / elapsed,
        "send_per_s": len(samples) / max(last_send - first_send, 1e-9),
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        # the producers' own CPU per request: on a small machine it comes out of the worker's share
        "client_cpu_ms_per_req": load.client_cpu_s * 1000 / len(samples),
        **streamed(samples),
    }


def streamed(samples: list[Sample]) -> dict[str, float]:
    """Streamed requests' latency as a chat user sees it: time to the first piece of final text, time per
    output token after it (each request's mean, as vLLM's TPOT), and the gaps between pieces as they arrive."""
    firsts = [(s.pieces[0] - s.sent) * 1000 for s in samples if s.pieces]
    if not firsts:
        return {}
    per_token = [(s.pieces[-1] - s.pieces[0]) * 1000 / (s.tokens - 1) for s in samples if s.pieces and s.tokens > 1]
    gaps = [(later - earlier) * 1000 for s in samples for earlier, later in pairwise(s.pieces)]
    figures = {"first_text_p50_ms": percentile(firsts, 50), "first_text_p95_ms": percentile(firsts, 95)}
    if per_token:
        figures |= {"per_token_p50_ms": percentile(per_token, 50), "per_token_p95_ms": percentile(per_token, 95)}
    if gaps:
        figures |= {"piece_gap_p50_ms": percentile(gaps, 50), "piece_gap_p95_ms": percentile(gaps, 95)}
    return figures


def worker_status(client: Client) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for reply in client.app.control.broadcast("inferq_status", reply=True, timeout=2.0):
        merged.update(reply)
    return merged


def device_loops(statuses: dict[str, Any]) -> dict[str, Any]:
    """Each device loop once: a whole worker's own, or a device process that its receivers all report."""
    loops: dict[str, Any] = {}
    for node, status in statuses.items():
        shared = status.get("device_process")
        if shared is not None:
            loops[f"device process {shared['pid']}"] = shared
        elif "batch_sizes" in status:
            loops[node] = status
    return loops


def batch_histogram(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Batches the workers ran between two status reads: requests per batch -> how many batches."""
    histogram: dict[str, int] = {}
    before, after = device_loops(before), device_loops(after)
    for node, status in after.items():
        for key, sizes in status.get("batch_sizes", {}).items():
            earlier = before.get(node, {}).get("batch_sizes", {}).get(key, {})
            for size, n in sizes.items():
                grown = n - earlier.get(size, 0)
                if grown:
                    histogram[size] = histogram.get(size, 0) + grown
    return dict(sorted(histogram.items(), key=lambda kv: int(kv[0])))


def device_time(before: dict[str, Any], after: dict[str, Any], elapsed: float) -> dict[str, float]:
    """The workers' device threads between two status reads: busy fraction, milliseconds per batch, and for
    stepped (generate) batches the requests one decoding step served on average (occupancy)."""
    busy = batches = steps = step_rows = 0
    before, after = device_loops(before), device_loops(after)
    for node, status in after.items():
        earlier = before.get(node, {}).get("counts", {})
        for name, value in status.get("counts", {}).items():
            grown = value - earlier.get(name, 0)
            if name.endswith(":busy_ms"):
                busy += grown
            elif name.endswith(":batches"):
                batches += grown
            elif name.endswith(":steps"):
                steps += grown
            elif name.endswith(":step_rows"):
                step_rows += grown
    timing = {"device_busy_fraction": busy / 1000 / max(elapsed, 1e-9), "device_ms_per_batch": busy / max(batches, 1)}
    return {**timing, "rows_per_step": step_rows / steps} if steps else timing


def start_worker(log_path: Path, worker_args: list[str] | None = None) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    args = worker_args if worker_args else ["--name", f"bench-{os.getpid()}@%h"]
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", *args],
                            stdout=log, stderr=subprocess.STDOUT)


def wait_ready(client: Client, process: subprocess.Popen[bytes] | None, timeout: float = 300,
               settle: float = 5.0) -> None:
    """Until a worker is ready and no more have become ready for ``settle`` seconds: a launcher's receivers
    come up one by one, and a measurement that started with the first would be one receiver's."""
    deadline = time.monotonic() + timeout
    ready, since = 0, time.monotonic()
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the worker exited with {process.returncode}")
        now_ready = sum(bool(status.get("ready")) for status in worker_status(client).values())
        if now_ready != ready:
            ready, since = now_ready, time.monotonic()
        elif ready and time.monotonic() - since >= settle:
            return
        time.sleep(0.5)
    raise SystemExit("no worker became ready")


def run_bench(kinds: tuple[Kind, ...], levels: list[int], requests: int, processes: int, new_tokens: NewTokens,
              raw_batch: int, generate_requests: int, start: bool, out_dir: Path, client_kind: str = "plain",
              coalesce_ms: float = 2.0, worker_args: list[str] | None = None, stream: bool = False) -> dict[str, Any]:
    settings = Settings()
    load_settings = settings.model_copy(update={"coalesce_ms": coalesce_ms}) if client_kind == "inferq" else settings
    client = Client(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    worker = start_worker(out_dir / "bench-worker.log", worker_args) if start else None
    report: dict[str, Any] = {"machine": machine(), "host": socket.gethostname(), "client": client_kind,
                              "stream": stream,
                              "coalesce_ms": coalesce_ms if client_kind == "inferq" else None,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "kinds": {}}
    try:
        # The raw loop runs once the worker has loaded and sits idle, so the two never share the CPU.
        wait_ready(client, worker)
        raw: dict[str, Any] = {}
        embedder = load_embedder(settings) if "embed" in kinds or "classify" in kinds else None
        if embedder is not None:
            raw["encode"] = raw_encode(settings, raw_batch, seconds=5.0, embedder=embedder)
        if "generate" in kinds:
            raw["generate"] = raw_generate(settings, max(levels), new_tokens, rounds=1)
            if stream:
                raw["generate"] |= first_token_ms(settings)
        report["raw"] = raw
        total = sum((generate_requests if kind == "generate" else requests) * len(levels) for kind in kinds)
        with tqdm(total=total, unit="req", desc="through the queue", dynamic_ncols=True) as bar:
            for kind in kinds:
                count = generate_requests if kind == "generate" else requests
                rows = []
                for level in levels:
                    # This machine's speed drifts by up to 40% within minutes (other tenants): each encoder row
                    # is compared with a raw loop run just before it, while the worker sits idle.
                    raw_now = encode_rate(embedder, raw_batch, seconds=3.0) if embedder and kind != "generate" else None
                    before = worker_status(client)
                    load = run_load(load_settings, kind, count, level, processes, new_tokens, progress=bar.update,
                                    client=client_kind, stream=stream)
                    after = worker_status(client)
                    summary = summarize(load)
                    elapsed = summary["requests"] / max(summary["requests_per_s"], 1e-9)
                    row = {"concurrency": level, **summary, "batch_sizes": batch_histogram(before, after),
                           **device_time(before, after, elapsed)}
                    if raw_now is not None:
                        row["raw_texts_per_s"] = raw_now
                    rows.append(row)
                report["kinds"][kind] = rows
        light = {}
        for kind in kinds:
            if kind == "generate":
                if stream:  # one streamed prompt at a time: its first text against one raw prefill and step
                    alone = summarize(run_load(load_settings, kind, 10, 1, 1, new_tokens, client=client_kind,
                                               stream=True))
                    light["generate_first_text"] = alone["first_text_p50_ms"]
                continue
            light[kind] = summarize(run_load(load_settings, kind, 50, 1, 1, new_tokens, client=client_kind))["p50_ms"]
        if embedder is not None:  # measured again now, for the same drift reason as each row's raw loop
            raw["encode"]["single_ms_p50_at_light_load"] = single_ms(embedder)
        report["light_load_p50_ms"] = light
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        client.close()
    _ratios(report)
    name = f"bench-{socket.gethostname()}-{client_kind}-{'-'.join(kinds)}"
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    _plot(report, out_dir / f"{name}.png")
    _print(report)
    return report


def run_backlog_bench(kinds: tuple[Kind, ...], count: int, start: bool, out_dir: Path,
                      worker_args: list[str] | None = None) -> dict[str, Any]:
    """Per kind: ``count`` raw messages pushed at once, drained by the workers (``benchmarks/backlog.py``)."""
    from benchmarks.backlog import run_backlog

    settings = Settings()
    client = Client(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    worker = start_worker(out_dir / "bench-worker.log", worker_args) if start else None
    report: dict[str, Any] = {"machine": machine(), "host": socket.gethostname(), "client": "raw",
                              "backlog": count, "worker_args": worker_args,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "kinds": {}}
    try:
        wait_ready(client, worker)
        # the launcher's children (or the one worker) and everything under them: a started worker's tree, or
        # the pids the live workers report
        pids = [worker.pid] if worker is not None else sorted(
            {int(s["pid"]) for s in worker_status(client).values()}
            | {int(s["device_process"]["pid"]) for s in worker_status(client).values() if "device_process" in s})
        for kind in kinds:
            report["kinds"][kind] = run_backlog(settings, kind, count, pids)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        client.close()
    name = f"backlog-{socket.gethostname()}-{'-'.join(kinds)}"
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}; raw clients, a backlog of {count} per kind; worker: "
          f"{' '.join(worker_args or []) or 'inferq worker (one process)'}")
    print(f"{'kind':<9}{'msg/s':>9}{'drain s':>9}{'worker us/msg':>15}{'redis us/msg':>14}{'cores':>7}"
          f"{'events':>8}{'failed':>7}{'missing':>8}  us/msg by process")
    for kind, row in report["kinds"].items():
        print(f"{kind:<9}{row['messages_per_s']:>9.0f}{row['drain_s']:>9.1f}{row['worker_cpu_us_per_message']:>15.0f}"
              f"{row['redis_cpu_us_per_message']:>14.0f}{row['worker_cores_busy']:>7.2f}"
              f"{row['task_succeeded_events']:>8}{row['failed']:>7}{row['unanswered']:>8}  "
              f"{row['worker_cpu_us_per_message_by_process']}")
    return report


def _ratios(report: dict[str, Any]) -> None:
    raw = report.get("raw", {})
    for kind, rows in report["kinds"].items():
        for row in rows:
            if kind == "generate" and "generate" in raw:
                row["ratio_to_raw"] = row["tokens_per_s"] / raw["generate"]["tokens_per_s"]
            elif kind != "generate" and "encode" in raw:
                row["ratio_to_raw"] = row["requests_per_s"] / row.get("raw_texts_per_s", raw["encode"]["texts_per_s"])


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, rows in report["kinds"].items():
        levels = [row["concurrency"] for row in rows]
        value = "tokens_per_s" if kind == "generate" else "requests_per_s"
        throughput.plot(levels, [row[value] for row in rows], marker="o",
                        label=f"{kind} ({'tokens' if kind == 'generate' else 'requests'}/s)")
        latency.plot(levels, [row["p95_ms"] for row in rows], marker="o", label=kind)
    for key, raw in report.get("raw", {}).items():
        value = raw.get("texts_per_s") or raw.get("tokens_per_s")
        throughput.axhline(value, linestyle="--", linewidth=1, label=f"raw {key} ({value:.0f}/s)")
    for axis, title in ((throughput, "throughput"), (latency, "p95 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("requests in flight")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"inferq bench: {report['machine']} ({report['date']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _print(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}; clients: {report['client']}"
          + (f" (coalescing {report['coalesce_ms']} ms)" if report.get("coalesce_ms") else ""))
    for key, raw in report.get("raw", {}).items():
        print(f"raw {key}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in raw.items()))
    print(f"{'kind':<9}{'in flight':>10}{'req/s':>9}{'tok/s':>9}{'send/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'p99 ms':>9}{'raw/s':>7}{'vs raw':>8}{'failed':>7}{'device':>8}{'ms/batch':>9}{'client':>8}  batch sizes")
    for kind, rows in report["kinds"].items():
        for r in rows:
            print(f"{kind:<9}{r['concurrency']:>10}{r['requests_per_s']:>9.1f}{r['tokens_per_s']:>9.1f}"
                  f"{r['send_per_s']:>9.0f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                  f"{r.get('raw_texts_per_s', 0):>7.0f}{r.get('ratio_to_raw', 0):>8.2f}{r['failed']:>7}"
                  f"{r.get('device_busy_fraction', 0):>8.0%}"
                  f"{r.get('device_ms_per_batch', 0):>9.1f}{r.get('client_cpu_ms_per_req', 0):>8.2f}"
                  f"  {r['batch_sizes']}"
                  + (f"; {r['rows_per_step']:.1f} requests per decoding step" if "rows_per_step" in r else ""))
            if "first_text_p50_ms" in r:
                print(f"{'':<9}streamed: first text p50/p95 "
                      f"{r['first_text_p50_ms']:.0f}/{r['first_text_p95_ms']:.0f} ms"
                      + (f", per token after it {r['per_token_p50_ms']:.1f}/{r['per_token_p95_ms']:.1f} ms"
                         if "per_token_p50_ms" in r else "")
                      + (f", gaps between pieces {r['piece_gap_p50_ms']:.1f}/{r['piece_gap_p95_ms']:.1f} ms"
                         if "piece_gap_p50_ms" in r else ""))
    print("raw/s: the raw loop just before the row (texts/s); client: the producer processes' own CPU in ms per "
          "request (on one machine it is the worker's loss)")
    if report.get("light_load_p50_ms"):
        encode = report.get("raw", {}).get("encode", {})
        single = encode.get("single_ms_p50_at_light_load", encode.get("single_ms_p50"))
        raw_generate = report.get("raw", {}).get("generate", {})
        if "prefill_ms_p50" in raw_generate:
            print(f"raw generate, one prompt alone (p50): prefill {raw_generate['prefill_ms_p50']:.1f} ms, then one "
                  f"decoding step {raw_generate['step_ms_p50']:.1f} ms")
        print("light load p50 (one request at a time): " +
              ", ".join(f"{k} {v:.1f} ms" for k, v in report["light_load_p50_ms"].items()) +
              (f"; raw single text (tokenise + forward) {single:.1f} ms" if single else ""))
