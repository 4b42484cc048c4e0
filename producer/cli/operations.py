"""Looking after a deployment: ``inferq models`` (export, list, verify), ``check`` and ``bench``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from producer.cli.common import EXIT_FAILED, parse_kinds, settings_or_exit
from producer.errors import InferqConnectionError
from producer.settings import KINDS, Kind


@click.group()
def models() -> None:
    """Configured models, written out for hosts without internet, and checked."""


@models.command("export")
@click.argument("alias")
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(KINDS), help="the registry kind of ALIAS, where it names models of several")
def models_export(alias: str, target: str, kind: str | None) -> None:
    """Write the configured model ALIAS to the folder TARGET (new or empty): tokenizer and weights as safetensors
    (a GGUF checkpoint dequantised), with a manifest of sha256 digests. Needs the worker install."""
    settings = settings_or_exit()
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

    settings = settings_or_exit()
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


@click.command()
@click.option("--name", "names", multiple=True, help="a worker's node name (repeatable); default: any worker")
@click.option("--local", is_flag=True, help="only workers whose node name ends in @<this host> (a healthcheck)")
@click.option("--expect", default=1, show_default=True, help="healthy workers needed")
@click.option("--timeout", default=10.0, show_default=True,
              help="seconds to wait for answers; with --name it returns as soon as every named worker answered")
def check(names: tuple[str, ...], local: bool, expect: int, timeout: float) -> None:
    """Exit 0 only if workers answer, with their models loaded and their device running a tiny inference."""
    from producer.client import Client
    from producer.health import check_workers, verdict

    client = Client(settings_or_exit())
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


@click.command()
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
        run_backlog_bench(parse_kinds(kinds), backlog, not no_worker, Path(out), started_args)
        return
    try:
        spec = parse_new_tokens(new_tokens)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--new-tokens") from None
    run_bench(parse_kinds(kinds), [int(n) for n in levels.split(",")], requests, processes, spec, raw_batch,
              generate_requests, not no_worker, Path(out), client_kind, coalesce_ms, started_args, stream)
