"""What the device side shows Prometheus: batches, device time, waits, outcomes, generation, device memory.

Every process of a worker host writes these to one folder (prometheus_client's multiprocess mode, set up by
``workers.supervision.metrics_server`` before any of them imports prometheus_client); the process that serves
``/metrics`` sums them at each scrape. Without a metrics port they are kept in memory and never read.

The loop records per batch where it can (a batch's size, its time, its outcomes counted together) and per
request only the queue wait, so the cost stays near a microsecond a message (benchmarks/RESULTS.md, "Worker
metrics"). ``model`` is the loop's key, ``kind/alias``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MEMORY_SAMPLE_S = 2.0

BATCH_REQUESTS = Histogram("inferq_batch_requests", "Requests in each batch the device ran", ["model"],
                           buckets=SIZE_BUCKETS)
BATCH_TEXTS = Histogram("inferq_batch_texts", "Texts (or prompts) in each batch the device ran", ["model"],
                        buckets=SIZE_BUCKETS)
BUSY = Counter("inferq_device_busy_seconds", "Seconds the device thread ran this model's batches and steps "
               "(its rate is the device's busy share)", ["model"])
RUN = Histogram("inferq_device_run_seconds", "Time of each run on the device: an encoder batch, or one "
                "generation step or prefill chunk", ["model"], buckets=SECONDS_BUCKETS)
QUEUE_WAIT = Histogram("inferq_queue_wait_seconds", "From a request reaching the device's queue to its batch "
                       "starting", ["model"], buckets=SECONDS_BUCKETS)
REQUESTS = Counter("inferq_requests", "Requests the device side finished, by outcome: ok, or the error's type",
                   ["model", "outcome"])
TOKENS = Counter("inferq_generated_tokens", "Tokens generated (its rate is tokens per second)", ["model"])
FIRST_TOKEN = Histogram("inferq_time_to_first_token_seconds", "From a generate request reaching the device's "
                        "queue to its first token", ["model"], buckets=SECONDS_BUCKETS)
INTER_TOKEN = Histogram("inferq_inter_token_seconds", "Time of each decoding step: between one token and the "
                        "next of every row in it (one sample a step, not a row)", ["model"], buckets=SECONDS_BUCKETS)
DEVICE_MEMORY = Gauge("inferq_device_memory_bytes", "GPU memory: allocated and reserved by torch in this "
                      "process, used (by every process) and total", ["device", "state"], multiprocess_mode="liveall")
GPU_UTILIZATION = Gauge("inferq_gpu_utilization_ratio", "GPU utilisation over NVML's last sample period "
                        "(where NVML is there)", ["device"], multiprocess_mode="liveall")


@dataclass(slots=True)
class ModelMetrics:
    """One model's series, looked up once: a label lookup costs more than the observation itself."""

    batch_requests: Any
    batch_texts: Any
    busy: Any
    run: Any
    queue_wait: Any
    tokens: Any
    first_token: Any
    inter_token: Any
    model: str

    @classmethod
    def of(cls, model: str) -> ModelMetrics:
        return cls(BATCH_REQUESTS.labels(model), BATCH_TEXTS.labels(model), BUSY.labels(model), RUN.labels(model),
                   QUEUE_WAIT.labels(model), TOKENS.labels(model), FIRST_TOKEN.labels(model),
                   INTER_TOKEN.labels(model), model)

    def finished(self, outcomes: Tally[str]) -> None:
        for outcome, count in outcomes.items():
            REQUESTS.labels(self.model, outcome).inc(count)


def outcome_label(outcome: Any) -> str:
    return type(outcome).__name__ if isinstance(outcome, BaseException) else "ok"


def sample_device_memory(device: Any) -> None:
    """Starts a thread that samples a CUDA device's memory (and NVML's utilisation, where it answers) every
    couple of seconds; on a CPU there is nothing to sample."""
    if getattr(device, "type", None) != "cuda":
        return
    import torch

    label = str(device)

    def sample() -> None:
        utilization = True
        while True:
            try:
                free, total = torch.cuda.mem_get_info(device)
                DEVICE_MEMORY.labels(label, "allocated").set(torch.cuda.memory_allocated(device))
                DEVICE_MEMORY.labels(label, "reserved").set(torch.cuda.memory_reserved(device))
                DEVICE_MEMORY.labels(label, "used").set(total - free)
                DEVICE_MEMORY.labels(label, "total").set(total)
                if utilization:
                    try:
                        GPU_UTILIZATION.labels(label).set(torch.cuda.utilization(device) / 100)
                    except Exception:  # no NVML (pynvml missing, or a driver without it): not sampled again
                        utilization = False
            except Exception:  # the device is gone: the stall watch or the next batch reports it
                log.debug("could not sample %s's memory", label, exc_info=True)
            time.sleep(MEMORY_SAMPLE_S)

    threading.Thread(target=sample, name="inferq-device-memory", daemon=True).start()
