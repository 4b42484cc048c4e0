"""The ``inferq`` command: one job, bulk jobs from JSONL, a worker, or the demo.

Heavy imports (torch, transformers) happen only inside the commands that need them.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from pydantic_settings import SettingsError

from producer.contract import LANES, Lane
from producer.errors import InferqConnectionError, InferqError, InputTooLarge, InvalidInput, UnknownModel
from producer.settings import KINDS, Kind, Settings, describe_error

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _settings() -> Settings:
    """The settings, or one line per bad setting and exit 2 (a configuration error is a usage error)."""
    try:
        return Settings()
    except (ValidationError, SettingsError, tomllib.TOMLDecodeError, OSError) as exc:
        click.echo(f"configuration error: {describe_error(exc)}", err=True)
        sys.exit(EXIT_BAD_INPUT)


def _client() -> Any:
    from producer.client import Client

    return Client(_settings())


@contextlib.contextmanager
def _task_errors(after_output: bool = False) -> Iterator[None]:
    """A task's error as one line on stderr, and the exit code: 2 for bad input, 1 for any other failure."""
    try:
        yield
    except InferqError as exc:
        click.echo(("\n" if after_output else "") + f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT if isinstance(exc, InvalidInput | InputTooLarge | UnknownModel) else EXIT_FAILED)


def _run_one(kind: Kind, kwargs: dict[str, Any]) -> None:
    with _task_errors():
        result = _client().submit(kind, **kwargs).get()
    click.echo(json.dumps(result, indent=2))


def _run_file(kind: Kind, path: str, output: str | None, defaults: dict[str, Any], window: int,
              priority: Lane) -> None:
    from producer.bulk import run_bulk

    # Bytes that are not UTF-8 stay in the text as surrogates, so a bad line fails alone (InvalidInput),
    # from a file as from stdin, and every good line is still sent.
    if path == "-":
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")  # type: ignore[union-attr]
        source, total = sys.stdin, None
    else:
        source = open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 - closed below
        with open(path, "rb") as counted:
            total = sum(1 for line in counted if line.strip())
    out = sys.stdout if output in (None, "-") else open(output, "w", encoding="utf-8")  # noqa: SIM115
    try:
        report = run_bulk(_client(), kind, source, out, defaults={k: v for k, v in defaults.items()
                                                                   if v is not None},
                          window=window, total=total, progress=sys.stderr.isatty() or output not in (None, "-"),
                          priority=priority)
    except InferqConnectionError as exc:
        click.echo(f"InferqConnectionError: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        if source is not sys.stdin:
            source.close()
        if out is not sys.stdout:
            out.close()
    click.echo(f"{report.ok} succeeded, {report.failed} failed" +
               (f" ({', '.join(f'{k}: {v}' for k, v in sorted(report.errors.items()))})" if report.errors else ""),
               err=True)
    if report.failed:
        sys.exit(EXIT_FAILED)


_file_option = click.option("--file", "file_", metavar="PATH",
                            type=click.Path(exists=True, dir_okay=False, allow_dash=True),
                            help="bulk: one job per JSONL line (a JSON string or an object of kwargs); '-' is stdin")
_output_option = click.option("--output", "-o", metavar="PATH", type=click.Path(dir_okay=False, allow_dash=True),
                              help="bulk: where result lines go (default stdout)")
_window_option = click.option("--window", default=256, show_default=True, type=click.IntRange(min=1),
                              help="bulk: tasks in flight at once")
_priority_option = click.option("--priority", default="bulk", show_default=True, type=click.Choice(LANES),
                                help="with --file: the lane its tasks take (bulk waits behind interactive work)")


def _texts_or_file(texts: tuple[str, ...], file_: str | None, what: str = "TEXTS") -> None:
    if file_ and texts:
        raise click.UsageError(f"give {what} or --file, not both: with --file every job comes from the file")
_model_option = click.option("--model", help="a model alias from the worker's registry (default: the kind's default)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """inferq: embed, classify and generate through Celery workers and Redis."""


@main.command()
@click.argument("texts", nargs=-1)
@_model_option
@click.option("--normalize/--no-normalize", default=True, show_default=True)
@_file_option
@_output_option
@_window_option
@_priority_option
def embed(texts: tuple[str, ...], model: str | None, normalize: bool, file_: str | None, output: str | None,
          window: int, priority: Lane) -> None:
    """Embed TEXTS (one task), or every line of --file."""
    _texts_or_file(texts, file_)
    if file_:
        _run_file("embed", file_, output, {"model": model, "normalize": normalize}, window, priority)
    else:
        _run_one("embed", {"texts": list(texts), "model": model, "normalize": normalize})


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--labels", help="comma-separated candidate labels: zero-shot over the embedding model")
@click.option("--top-k", default=1, show_default=True)
@_model_option
@_file_option
@_output_option
@_window_option
@_priority_option
def classify(texts: tuple[str, ...], labels: str | None, top_k: int, model: str | None, file_: str | None,
             output: str | None, window: int, priority: Lane) -> None:
    """Classify TEXTS (one task), or every line of --file."""
    _texts_or_file(texts, file_)
    if labels is not None and not labels.strip():
        raise click.BadParameter("is empty: give comma-separated labels, or leave --labels out to use a "
                                 "sequence-classification model's own labels", param_hint="--labels")
    label_list = [label.strip() for label in labels.split(",")] if labels is not None else None
    options = {"labels": label_list, "top_k": top_k, "model": model}
    if file_:
        _run_file("classify", file_, output, options, window, priority)
    else:
        _run_one("classify", {"texts": list(texts), **options})


@main.command()
@click.argument("prompt", required=False)
@click.option("--chat", is_flag=True, help="send PROMPT as a user message, rendered with the chat template")
@click.option("--system", help="with --chat: a system message before it")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--stop", multiple=True, help="stop string (repeatable); the text ends before it")
@click.option("--seed", type=int)
@click.option("--stream", is_flag=True, help="print the text as it is decoded (Ctrl-C cancels the generation)")
@_model_option
@_file_option
@_output_option
@_window_option
@_priority_option
def generate(prompt: str | None, chat: bool, system: str | None, max_new_tokens: int, temperature: float,
             top_p: float, stop: tuple[str, ...], seed: int | None, stream: bool, model: str | None,
             file_: str | None, output: str | None, window: int, priority: Lane) -> None:
    """Generate from PROMPT (one task), or from every line of --file."""
    _texts_or_file((prompt,) if prompt else (), file_, "PROMPT")
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat: a system message only exists in a chat")
    if stream and file_:
        raise click.UsageError("--stream prints one generation as it comes; --file runs many: use one of them")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                               "stop": list(stop) or None, "seed": seed, "model": model}
    if file_:
        _run_file("generate", file_, output, options, window, priority)
        return
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt or ""}]
        request: dict[str, Any] = {"messages": messages, **options}
    else:
        request = {"prompt": prompt, **options}
    if stream:
        _stream_one(request)
    else:
        _run_one("generate", request)


def _stream_one(kwargs: dict[str, Any]) -> None:
    """The text on stdout as it comes; then, on stderr, how it ended. Ctrl-C cancels the task."""
    client = _client()
    with _task_errors():
        generation = client.stream_generate(**kwargs)
    try:
        with _task_errors(after_output=True):
            for piece in generation:
                click.echo(piece, nl=False)
                sys.stdout.flush()
    except KeyboardInterrupt:
        client.cancel(generation.id)
        click.echo(f"\ncancelled task {generation.id}", err=True)
        sys.exit(130)
    click.echo()
    click.echo(f"finish_reason={generation.finish_reason} prompt_tokens={generation.prompt_tokens} "
               f"completion_tokens={generation.completion_tokens} model={generation.model}", err=True)


@main.command()
@click.option("--kinds", default=",".join(KINDS), show_default=True, help="comma-separated kinds to serve")
@click.option("--concurrency", type=int, help="task threads (default: INFERQ_WORKER_CONCURRENCY)")
@click.option("--name", help="Celery node name, e.g. embed1@%h (default: inferq@<host>); single worker only")
@click.option("--gpus", help="supervise one worker per GPU: all, none (CPU) or ids like 0,2")
@click.option("--replicas", type=click.IntRange(min=1), help="with --gpus none: how many CPU workers (default 1)")
@click.option("--receivers", type=click.IntRange(min=1),
              help="with --gpus: receiving processes per device, sharing one device process (default on GPUs: "
                   "from the cores per GPU; on --gpus none: one whole worker)")
def worker(kinds: str, concurrency: int | None, name: str | None, gpus: str | None, replicas: int | None,
           receivers: int | None) -> None:
    """Start workers on this machine.

    Without --gpus: this process is one worker on INFERQ_DEVICE (for a container or service manager that
    supervises it). With --gpus: this process supervises, per GPU, a device process and its receivers
    (gpu0@host, or gpu0-r1@host, ... with --receivers above 1), or --replicas whole CPU workers
    (cpu0@host, ...); it restarts any that dies, and stops them all on SIGTERM or Ctrl-C.
    """
    chosen = _parse_kinds(kinds)
    if gpus is None:
        if replicas is not None:
            raise click.BadParameter("--replicas needs --gpus none", param_hint="--replicas")
        if receivers is not None:
            raise click.BadParameter("--receivers needs --gpus (all, none or ids): the launcher starts the device "
                                     "process and its receivers", param_hint="--receivers")
        from workers.supervision.main import run_worker

        run_worker(_settings(), chosen, concurrency=concurrency, node_name=name)
        return
    if name is not None:
        raise click.BadParameter("--name names one worker; with --gpus the workers are named gpu0@host, cpu0@host, "
                                 "...", param_hint="--name")
    from workers.supervision.launcher import LaunchError
    from workers.supervision.main import run_launcher

    try:
        sys.exit(run_launcher(_settings(), chosen, gpus, replicas, concurrency, receivers))
    except LaunchError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus/--replicas/--receivers") from None


@main.group()
def models() -> None:
    """Configured models, written out for hosts without internet, and checked."""


@models.command("export")
@click.argument("alias")
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(KINDS), help="the registry kind of ALIAS, where it names models of several")
def models_export(alias: str, target: str, kind: str | None) -> None:
    """Write the configured model ALIAS to the folder TARGET (new or empty): tokenizer and weights as safetensors
    (a GGUF checkpoint dequantised), with a manifest of sha256 digests. Needs the worker install."""
    settings = _settings()
    kinds = [one for one in KINDS if alias in settings.models.entries(one)]
    if kind is not None and kind not in kinds:
        raise click.BadParameter(f"no {kind} model is named {alias!r}", param_hint="ALIAS")
    if kind is None and len(kinds) != 1:
        raise click.BadParameter(f"{alias!r} names no configured model" if not kinds else
                                 f"{alias!r} names a model of {' and '.join(kinds)}: say which with --kind",
                                 param_hint="ALIAS")
    chosen: Kind = kind or kinds[0]
    from workers.models.export import ExportError, export

    try:
        manifest = export(chosen, alias, settings.models.entries(chosen)[alias], Path(target))
    except ExportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"exported {chosen} model {alias!r} ({manifest['dtype']}, {len(manifest['files'])} files) to "
               f"{target}; serve it offline with, in the configuration:")
    lines = [f"[models.{chosen}.{alias}]", f"source = {json.dumps(str(Path(target).resolve()))}"]
    lines += [f"{name} = {json.dumps(value)}" for name, value in manifest["settings"].items() if value is not None]
    click.echo("\n".join(lines))


@models.command("list")
@click.option("--timeout", default=2.0, show_default=True, help="seconds to wait for the workers' answers")
def models_list(timeout: float) -> None:
    """The registry (this host's settings; * marks a kind's default), and what each live worker has loaded:
    kind, alias, dtype, device and where from."""
    from producer.client import Client
    from producer.inventory import by_node, registry_lines, worker_lines, worker_statuses

    settings = _settings()
    click.echo("registry:")
    click.echo("\n".join(registry_lines(settings)))
    client = Client(settings)
    try:
        statuses = by_node(worker_statuses(client, timeout))
    except InferqConnectionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        client.close()
    click.echo("workers:")
    click.echo("\n".join(worker_lines(statuses)))


@models.command("verify")
@click.argument("target", type=click.Path(file_okay=False, exists=True))
def models_verify(target: str) -> None:
    """Check an exported folder against its manifest: every file present and unchanged, nothing added."""
    from workers.models.export import ExportError, verify

    try:
        manifest, problems = verify(Path(target))
    except ExportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if problems:
        click.echo(f"{target} does not verify:\n" + "\n".join(f"  {problem}" for problem in problems), err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"{target}: {manifest.get('kind')} model {manifest.get('alias')!r}, {len(manifest['files'])} files "
               "verified")


@main.command("device-server")
@click.option("--listen", required=True, help="the Unix socket path to listen on (workers: INFERQ_DEVICE_SERVER)")
@click.option("--kinds", default=",".join(KINDS), show_default=True, help="comma-separated kinds to serve")
@click.option("--name", default="device", show_default=True, help="the name on its log lines")
def device_server(listen: str, kinds: str, name: str) -> None:
    """Hold the models on INFERQ_DEVICE and run the model work of the workers that connect.

    `inferq worker --gpus ... --receivers N` starts these itself. By hand: start one with
    INFERQ_DEVICE_SERVER_KEY set, and workers with INFERQ_DEVICE_SERVER=<socket> and the same key.
    """
    from workers.supervision.main import run_device_server_process

    run_device_server_process(_settings(), _parse_kinds(kinds), listen, name)


@main.command()
@click.option("--name", "names", multiple=True, help="a worker's node name (repeatable); default: any worker")
@click.option("--local", is_flag=True, help="only workers whose node name ends in @<this host> (a healthcheck)")
@click.option("--expect", default=1, show_default=True, help="healthy workers needed")
@click.option("--timeout", default=10.0, show_default=True,
              help="seconds to wait for answers; with --name it returns as soon as every named worker answered")
def check(names: tuple[str, ...], local: bool, expect: int, timeout: float) -> None:
    """Exit 0 only if workers answer, with their models loaded and their device running a tiny inference."""
    from producer.client import Client
    from producer.health import check_workers, verdict

    client = Client(_settings())
    try:
        found = check_workers(client, names, local, timeout)
    except InferqConnectionError as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        client.close()
    for health in found:
        click.echo(f"{health.node}: {'ok' if health.ok else 'FAILED'} ({health.detail})")
    problem = verdict(found, names, expect)
    if problem is not None:
        click.echo(f"unhealthy: {problem}" if found else f"unhealthy: no worker answered within {timeout:g} s",
                   err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@click.option("--port", type=int, help="default: INFERQ_FLOWER_PORT (5555)")
@click.option("--address", help="default: INFERQ_FLOWER_ADDRESS (127.0.0.1)")
def flower(port: int | None, address: str | None) -> None:
    """Start Flower on the same Redis as the workers; /metrics adds inferq_queue_depth per queue."""
    from producer.monitoring import run_flower

    sys.exit(run_flower(_settings(), port, address))


@main.command()
@click.option("--host", help="default: INFERQ_GATEWAY__HOST (127.0.0.1)")
@click.option("--port", type=int, help="default: INFERQ_GATEWAY__PORT (8080)")
@click.option("--open", "open_access", is_flag=True, help="run without API keys (loopback only)")
def gateway(host: str | None, port: int | None, open_access: bool) -> None:
    """The OpenAI HTTP API (embeddings, chat completions, completions, models) in front of the queue."""
    import ipaddress

    import uvicorn

    from producer.gateway.app import create_app

    settings = _settings()
    host = host or settings.gateway.host
    port = port or settings.gateway.port
    if not settings.gateway.api_keys:
        if not open_access:
            raise click.UsageError("no API keys are set (INFERQ_GATEWAY__API_KEYS='{\"name\": \"key\"}'); set "
                                   "some, or pass --open to run without them on loopback")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: it may resolve anywhere
            loopback = False
        if not loopback:
            raise click.UsageError(f"--open runs without API keys, so only on loopback (127.0.0.1, ::1, "
                                   f"localhost); not on {host}")
    uvicorn.run(create_app(settings, open_access=not settings.gateway.api_keys), host=host, port=port,
                log_level="warning", access_log=False)


@main.command()
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for the three results")
def demo(timeout: float) -> None:
    """Start what is needed (Redis if none answers, a worker), run one task of each kind, stop it all."""
    from producer.demo import run_demo

    sys.exit(run_demo(_settings(), timeout))


@main.command()
@click.option("--kinds", default=",".join(KINDS), show_default=True)
@click.option("--concurrency", "levels", default="1,16,64,256", show_default=True,
              help="comma-separated numbers of requests in flight")
@click.option("--requests", default=2000, show_default=True, help="embed/classify requests per level")
@click.option("--generate-requests", default=64, show_default=True, help="generate requests per level")
@click.option("--processes", default=4, show_default=True, help="producer processes sending")
@click.option("--new-tokens", default="64", show_default=True,
              help="max_new_tokens of each generate request, or a range LOW-HIGH each request draws from")
@click.option("--raw-batch", default=64, show_default=True, help="batch size of the raw encoder loop")
@click.option("--no-worker", is_flag=True, help="use the workers already running instead of starting one")
@click.option("--client", "client_kind", type=click.Choice(["plain", "raw", "inferq"]), default="plain",
              show_default=True, help="plain: send_task by name, one request per message (a foreign client); raw: "
              "protocol-2 messages LPUSHed in pipelines (a lean foreign client); inferq: our Client")
@click.option("--coalesce-ms", default=2.0, show_default=True, help="with --client inferq: the coalescing window")
@click.option("--backlog", type=click.IntRange(min=1), help="with --client raw: push this many messages per kind at "
              "once and time the workers draining them (CPU per message of every worker process and of Redis)")
@click.option("--worker-args", help='the started worker\'s arguments, e.g. "--gpus none --receivers 2"')
@click.option("--stream", is_flag=True, help="generate requests stream their text: time to the first text, per "
              "token and between pieces (plain and raw clients)")
@click.option("--bulk", type=click.IntRange(min=1), help="queue this many bulk single-text embeds and time "
              "interactive ones sent meanwhile against their unloaded latency (benchmarks/lanes.py)")
@click.option("--out", default="benchmarks", show_default=True, type=click.Path(file_okay=False))
def bench(kinds: str, levels: str, requests: int, generate_requests: int, processes: int, new_tokens: str,
          raw_batch: int, no_worker: bool, client_kind: str, coalesce_ms: float, backlog: int | None,
          worker_args: str | None, stream: bool, bulk: int | None, out: str) -> None:
    """Benchmark: the raw model against the same model through the queue (a benchmark, not a test)."""
    import shlex

    from benchmarks.bench import run_backlog_bench, run_bench
    from benchmarks.load import parse_new_tokens

    if worker_args is not None and no_worker:
        raise click.BadParameter("--worker-args is for the worker bench starts; not with --no-worker",
                                 param_hint="--worker-args")
    started_args = shlex.split(worker_args) if worker_args else None
    if stream and (client_kind == "inferq" or backlog is not None):
        raise click.BadParameter("streamed requests are read by the plain and raw clients, without --backlog",
                                 param_hint="--stream")
    if bulk is not None:
        from benchmarks.lanes import run_lanes_bench

        run_lanes_bench(bulk, 30, not no_worker, Path(out), started_args)
        return
    if backlog is not None:
        if client_kind != "raw":
            raise click.BadParameter("--backlog needs --client raw (plain clients cannot push fast enough)",
                                     param_hint="--backlog")
        run_backlog_bench(_parse_kinds(kinds), backlog, not no_worker, Path(out), started_args)
        return
    try:
        spec = parse_new_tokens(new_tokens)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--new-tokens") from None
    run_bench(_parse_kinds(kinds), [int(n) for n in levels.split(",")], requests, processes, spec, raw_batch,
              generate_requests, not no_worker, Path(out), client_kind, coalesce_ms, started_args, stream)


def _parse_kinds(text: str) -> tuple[Kind, ...]:
    chosen: list[Kind] = []
    by_name: dict[str, Kind] = {kind: kind for kind in KINDS}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in by_name:
            raise click.BadParameter(f"{part!r} is not a kind; choose from {', '.join(KINDS)}", param_hint="--kinds")
        chosen.append(by_name[part])
    if not chosen:
        raise click.BadParameter("name at least one kind", param_hint="--kinds")
    return tuple(dict.fromkeys(chosen))


if __name__ == "__main__":
    main()
