"""The worker's models, and the path of one request through them.

Models load once, when the worker starts. A task thread validates its request, tokenises it, and hands
it to the device loop, which runs it in a batch with whatever else is waiting for the same model; the
task thread then turns its own rows into its JSON result. Only the device loop touches the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from producer.contract import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    validate,
)
from producer.errors import Cancelled, InferqError, InputTooLarge, InvalidInput, OutOfMemory, TaskTimeout, UnknownModel
from producer.settings import Kind, Settings
from workers.device.jobs import Progress
from workers.device.label_cache import LabelVectors
from workers.device.loop import DeviceLoop
from workers.device.passes import EncodeJob, Models, load_models, start_loop
from workers.device.process import DeviceProcess
from workers.device.remote import RemoteDevice
from workers.errors import WorkerError
from workers.models.base import ClassifyModel, EmbedModel, GenerateModel
from workers.models.classify import top_k, zero_shot
from workers.models.loading import device_label, pick_device, prepare_collector_for_serving

if TYPE_CHECKING:
    from workers.receiving.cancels import CancelWatch
    from workers.receiving.streams import StreamPublisher

log = logging.getLogger(__name__)

Result = EmbedResult | ClassifyResult | GenerateResult
LABEL_CACHE_SIZE = 4096  # zero-shot label vectors kept (workers/device/label_cache.py)
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default
# A receiver waits this long for its device process to listen: it listens once its models are loaded,
# which the first time on a host can include downloading them.
DEVICE_PROCESS_WAIT_S = 900.0


@dataclass(slots=True)
class Pending:
    """A request on its way through the device loop: its future, and what turns the outcome into its result."""

    kind: Kind
    future: Future[Any]
    build: Callable[[Any], Result]
    items: int
    longest: int
    limit: float
    cancelled: bool = False  # by its caller (Client.cancel), not by a time limit


class Runtime:
    def __init__(self, settings: Settings, kinds: tuple[Kind, ...]) -> None:
        self.settings = settings
        self.kinds = kinds
        # Model work runs in a device process (the launcher's, shared by receivers, or this worker's own
        # child), or here on the device loop thread.
        self.remote_device = settings.device_server is not None or settings.device_process
        self.device = torch.device("cpu") if self.remote_device else pick_device(settings.device)
        self.models = Models()
        self.loaded_at: float | None = None
        self.loop: DeviceLoop | RemoteDevice | None = None
        self.device_process: DeviceProcess | None = None
        self._labels = LabelVectors(LABEL_CACHE_SIZE)
        # Streams and cancels need the result backend's Redis: the receiving side sets them (WorkerApp).
        self.streams: StreamPublisher | None = None
        self.cancels: CancelWatch | None = None
        self._generating: dict[str, Pending] = {}  # generate requests under way, by task id: what cancel finds
        self._generating_lock = threading.Lock()

    @property
    def embedders(self) -> dict[str, EmbedModel]:
        return self.models.embedders

    @property
    def classifiers(self) -> dict[str, ClassifyModel]:
        return self.models.classifiers

    @property
    def generators(self) -> dict[str, GenerateModel]:
        return self.models.generators

    # --- start-up -------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load every model the served kinds need, then start the device loop. Runs once."""
        started = time.perf_counter()
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)
        # with a device process this process tokenises and builds results: tokenizers and configs only
        self.models = load_models(self.settings, self.kinds, self.device, weights=not self.remote_device)
        self.loop = self._connect() if self.remote_device else start_loop(self.settings, self.models, self.device)
        loaded = time.perf_counter() - started
        warm_up = self.self_test()  # the first pass pays for kernel selection and allocator growth, not a user
        prepare_collector_for_serving()
        self.loaded_at = time.time()
        log.info("ready for %s on %s: models loaded in %.1f s, warm-up %.2f s, %s", ",".join(self.kinds),
                 self._device_label(), loaded, warm_up["seconds"], self._memory_label())

    def _connect(self) -> RemoteDevice:
        settings = self.settings
        if settings.device_server is not None:
            assert settings.device_server_key is not None  # the settings refuse one without the other
            remote = RemoteDevice(settings.device_server, settings.device_server_key.get_secret_value().encode(),
                                  DEVICE_PROCESS_WAIT_S)
        else:
            own = self.device_process = DeviceProcess(settings, self.kinds, f"pid {os.getpid()}")
            remote = RemoteDevice(own.address, own.authkey, DEVICE_PROCESS_WAIT_S, own.exitcode)
        missing = sorted(set(self.models.keys()) - set(remote.hello["keys"]))
        # the same alias must be the same model, tokenised for the same limit, on both sides
        ours, theirs = self.models.describe(), remote.hello["models"]
        different = sorted(f"{kind}/{alias}" for kind, group in ours.items() for alias, model in group.items()
                           if f"{kind}/{alias}" not in missing
                           and any(theirs[kind][alias][field] != model[field] for field in ("location", "max_length")))
        if missing or different:
            remote.stop()
            raise WorkerError(f"the device process at {remote.address} does not serve "
                              f"{', '.join(missing + different)} as this worker configures it (it serves "
                              f"{', '.join(remote.hello['keys']) or 'nothing'}): start both with the same kinds and "
                              "models")
        self.device = torch.device(remote.hello["device"])
        log.info("model work goes to the device process %d on %s", remote.hello["pid"], remote.hello["device_label"])
        return remote

    def self_test(self) -> dict[str, Any]:
        """One tiny request through every loaded model, by the same path as a task: the warm-up at start and
        the health check (`inferq check`) later. Raises what a task would raise."""
        started = time.perf_counter()
        requests: list[tuple[Kind, dict[str, Any]]] = (
            [("embed", {"texts": ["inferq self-test"], "model": alias}) for alias in self.embedders]
            + [("classify", {"texts": ["inferq self-test"], "model": alias}) for alias in self.classifiers]
            + [("generate", {"prompt": "Hello", "max_new_tokens": 1, "model": alias}) for alias in self.generators])
        for kind, kwargs in requests:
            self.handle(kind, (), kwargs)
        return {"ok": True, "seconds": round(time.perf_counter() - started, 4),
                "models": [f"{kind}/{kwargs['model']}" for kind, kwargs in requests]}

    def _device_label(self) -> str:
        if isinstance(self.loop, RemoteDevice):
            return f"{self.loop.hello['device_label']} in device process {self.loop.hello['pid']}"
        return device_label(self.device)

    def _memory_label(self) -> str:
        if self.device.type == "cuda" and not self.remote_device:
            return f"{torch.cuda.memory_allocated(self.device) / 2**20:.0f} MiB GPU memory allocated"
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"peak RSS {peak_kib / 1024:.0f} MiB"

    def describe(self) -> dict[str, Any]:
        """What the worker serves, for `inferq_status` and health checks."""
        remote = self.loop if isinstance(self.loop, RemoteDevice) else None
        defaults = {kind: self.settings.models.default_alias(kind) for kind in self.kinds}
        status: dict[str, Any] = {
            "kinds": list(self.kinds), "device": str(self.device), "pid": os.getpid(),
            "rss_mib": round(_rss_bytes() / 2**20, 1), "ready": self.loaded_at is not None,
            # where the weights are: the device process's models when it holds them
            "models": remote.hello["models"] if remote else self.models.describe(), "defaults": defaults,
            "load_counts": remote.hello["load_counts"] if remote else dict(self.models.load_counts)}
        if isinstance(self.loop, DeviceLoop):
            status.update(self.loop.stats())
        elif remote is not None:
            # shared by every receiver of the device process: readers count each pid once
            status["hand_offs"] = dict(remote.sent)
            with contextlib.suppress(FutureTimeout):
                status["device_process"] = remote.stats(timeout=2.0)
        if self.device.type == "cuda" and not remote:
            status["gpu"] = torch.cuda.get_device_name(self.device)
            status["memory_allocated_mib"] = round(torch.cuda.memory_allocated(self.device) / 2**20, 1)
            status["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return status

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        if self.device_process is not None:
            self.device_process.close()

    def hold_hand_offs(self) -> None:
        """Requests this thread begins from now on are sent to the device process at the next
        ``flush_hand_offs()``, together; with the device loop in this process, nothing to hold."""
        if isinstance(self.loop, RemoteDevice):
            self.loop.hold_this_thread()

    def answer_together(self, together: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        """The device side answers each batch's requests inside ``together()`` (their done-callbacks may
        gather what they hand on, and pass it on once)."""
        if self.loop is not None:
            self.loop.answering = together

    def flush_hand_offs(self) -> None:
        if isinstance(self.loop, RemoteDevice):
            self.loop.flush()

    # --- serving (task threads) -----------------------------------------------------------------------

    def handle(self, kind: Kind, args: Any, kwargs: Any, task_id: str | None = None, priority: int = 0) -> Result:
        """Validate and tokenise here, run on the device loop, build the result here (a task thread's path)."""
        try:
            result = self._handle(kind, args, kwargs, task_id, priority)
        except BaseException as exc:
            if kind == "generate" and task_id is not None:
                self.settle(task_id, stream_requested(kwargs), exc)
            raise
        if kind == "generate" and task_id is not None:
            self.settle(task_id, stream_requested(kwargs), result)
        return result

    def _handle(self, kind: Kind, args: Any, kwargs: Any, task_id: str | None, priority: int) -> Result:
        pending = self.begin(kind, args, kwargs, task_id, priority)
        try:
            outcome = pending.future.result(timeout=pending.limit)
        except FutureTimeout:
            pending.future.cancel()
            raise self.timed_out(pending) from None
        except CancelledError:
            raise self.cancelled(pending) from None
        except torch.OutOfMemoryError as exc:
            raise self.out_of_memory(pending, exc) from None
        return pending.build(outcome)

    def begin(self, kind: Kind, args: Any, kwargs: Any, task_id: str | None = None, priority: int = 0) -> Pending:
        """Validate and tokenise a request and hand it to the device loop; raises InferqError for bad input.
        ``priority`` is its message's: the device takes lower first (0 interactive, 9 bulk).
        The caller waits on the future (or is called back), then builds the result with `build`; a generate
        request with a ``task_id`` is then ``settle``d with its outcome (its stream's end, and no longer
        cancellable)."""
        request = validate(kind, kwargs, self.settings.limits, args)
        crash = self.settings.fault_crash_on_text
        if crash is not None and crash in repr(kwargs):
            log.critical("fault_crash_on_text matched a %s request: exiting as a crash would", kind)
            os._exit(86)
        if isinstance(request, EmbedRequest):
            return self._embed(request, priority)
        if isinstance(request, ClassifyRequest):
            return self._classify(request, priority)
        return self._generate(request, task_id, priority)

    def settle(self, task_id: str, stream: bool, outcome: Any) -> None:
        """A generate task's outcome (its result, or the exception it fails with), before it is stored;
        ``stream``: its message asked for a stream (``stream_requested``)."""
        with self._generating_lock:
            self._generating.pop(task_id, None)
        if self.streams is not None:
            self.streams.end(task_id, outcome, stream)

    def cancel(self, task_id: str) -> bool:
        """Stop the generate request of this task if it is under way here (its caller cancelled it)."""
        with self._generating_lock:
            pending = self._generating.get(task_id)
        if pending is None or self.loop is None:
            return False
        if pending.cancelled:  # asked again (the key is read again while the request is under way)
            return True
        log.info("cancelling generate task %s at its caller's request", task_id)
        pending.cancelled = True
        self.loop.cancel(pending.future)
        return True

    def generating(self) -> list[str]:
        """The task ids of the generate requests under way in this process."""
        with self._generating_lock:
            return list(self._generating)

    def timed_out(self, pending: Pending) -> TaskTimeout:
        return TaskTimeout(f"the {pending.kind} request ran past its limit of {pending.limit:g} s")

    def cancelled(self, pending: Pending) -> InferqError:
        """What a request whose future was cancelled fails with: Cancelled, or TaskTimeout if a limit did it."""
        if pending.cancelled:
            return Cancelled(f"the {pending.kind} request was cancelled by its caller before it ran")
        return self.timed_out(pending)

    def out_of_memory(self, pending: Pending, exc: BaseException) -> OutOfMemory:
        # The device loop already retried it in ever smaller batches; it failed alone.
        return OutOfMemory(f"the {pending.kind} request does not fit in device memory even on its own "
                           f"({pending.items} input(s), longest {pending.longest} tokens): send fewer or shorter "
                           f"inputs, or fewer new tokens; {exc}")

    def _submit(self, kind: Kind, key: str, payload: Any, items: int, longest: int, priority: int,
                build: Callable[[Any], Result], progress: Progress | None = None) -> Pending:
        if self.loop is None:
            raise RuntimeError("the runtime is not loaded")
        limit = getattr(self.settings.time_limits, kind)
        return Pending(kind, self.loop.submit(key, payload, items, longest, limit, progress, priority), build, items,
                       longest, limit)

    def _encode(self, kind: Kind, key: str, ids: list[list[int]], priority: int,
                build: Callable[[torch.Tensor], Result]) -> Pending:
        return self._submit(kind, key, EncodeJob(ids), len(ids), max(len(row) for row in ids), priority, build)

    def _embed(self, request: EmbedRequest, priority: int) -> Pending:
        alias = self._alias("embed", request.model, self.embedders)
        embedder = self.embedders[alias]

        ids = embedder.tokenize(list(request.texts))
        text_tokens = [len(row) for row in ids]

        def build(vectors: torch.Tensor) -> EmbedResult:
            rows = vectors.numpy()
            if request.normalize:
                # torch's normalize, in numpy: a torch call per request cost ~7% of a receiver's CPU
                rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), NORM_EPS)
            return EmbedResult(model=alias, dim=embedder.dim, embeddings=rows.tolist(),
                               prompt_tokens=sum(text_tokens), text_tokens=text_tokens)

        return self._encode("embed", f"embed/{alias}", ids, priority, build)

    def _classify(self, request: ClassifyRequest, priority: int) -> Pending:
        name, texts = request.model, list(request.texts)
        if name is not None and name in self.classifiers:
            classifier = self.classifiers[name]
            if request.labels is not None:
                raise InvalidInput(f"model {name!r} classifies into its own labels ({', '.join(classifier.labels)}); "
                                   "omit labels, or omit model to classify zero-shot into the labels you pass")
        elif request.labels is not None:
            alias = self._alias("embed", name, self.embedders, also=self.classifiers, also_note="without labels")
            return self._zero_shot(alias, texts, list(request.labels), request.top_k, priority)
        elif name is not None and name in self.embedders:
            raise InvalidInput(f"model {name!r} is an embedding model: it classifies zero-shot, so pass labels")
        else:
            if name is None and self.settings.models.default_alias("classify") is None:
                raise InvalidInput("no sequence-classification model is configured on this worker: pass labels "
                                   "to classify zero-shot, or configure one under models.classify")
            classifier = self.classifiers[self._alias("classify", name, self.classifiers, also=self.embedders,
                                                      also_note="zero-shot, with labels")]
        alias = classifier.loaded.alias

        def build(probabilities: torch.Tensor) -> ClassifyResult:
            return ClassifyResult(model=alias, results=top_k(probabilities, classifier.labels, request.top_k))

        return self._encode("classify", f"classify/{alias}", classifier.tokenize(texts), priority, build)

    def _zero_shot(self, alias: str, texts: list[str], labels: list[str], k: int, priority: int) -> Pending:
        """Text vectors, and label vectors from the cache or computed in the same batch as the texts."""
        embedder = self.embedders[alias]
        label_texts = [self.settings.classify_label_template.format(label) for label in labels]
        known = self._labels.lookup(alias, label_texts)
        missing = [text for text, vector in known.items() if vector is None]
        ids = embedder.tokenize(texts)
        try:
            ids += embedder.tokenize(missing, "labels") if missing else []
        except InputTooLarge:  # named by its place among the cached ones too: tokenise them all to say where
            embedder.tokenize(label_texts, "labels")
            raise

        def build(rows: torch.Tensor) -> ClassifyResult:
            known.update(self._labels.keep(alias, missing, rows[len(texts):]))
            label_rows = torch.stack([row for row in (known[text] for text in label_texts) if row is not None])
            scores = zero_shot(rows[: len(texts)], label_rows, self.settings.classify_temperature)
            return ClassifyResult(model=alias, results=top_k(scores, labels, k))

        return self._encode("classify", f"embed/{alias}", ids, priority, build)

    def _generate(self, request: GenerateRequest, task_id: str | None, priority: int) -> Pending:
        alias = self._alias("generate", request.model, self.generators)
        generator = self.generators[alias]
        prepared = generator.prepare(request, task_id)
        progress = None
        if request.stream and task_id is not None and self.streams is not None:
            progress = self.streams.open(task_id, lambda tokens: generator.settled(prepared, tokens))
        pending = self._submit("generate", f"generate/{alias}", prepared, 1, prepared.total_tokens, priority,
                               lambda completion: generator.finish(prepared, completion), progress)
        if task_id is not None and self.cancels is not None:
            with self._generating_lock:
                self._generating[task_id] = pending
            self.cancels.check(task_id)  # after it can be found: a cancel is seen by one of the two
        return pending

    def _alias(self, kind: Kind, name: str | None, group: dict[str, Any], also: dict[str, Any] | None = None,
               also_note: str = "") -> str:
        """The alias to serve; UnknownModel lists the available ones, and how the others in `also` are used."""
        alias = name if name is not None else self.settings.models.default_alias(kind)
        if alias is None or alias not in group:
            available = sorted(group) + [f"{other} ({also_note})" for other in sorted(also or {})]
            shown = ", ".join(available) if available else "none configured"
            raise UnknownModel(f"model {name!r} is not configured for {kind} on this worker; "
                               f"available: {shown}")
        return alias


def stream_requested(kwargs: Any) -> bool:
    """Whether a generate message asked for a stream, valid or not (a bad one gets its error entry)."""
    return isinstance(kwargs, dict) and kwargs.get("stream") is True


def _rss_bytes() -> int:
    """This process's resident memory now (Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
