"""One job, or bulk jobs from JSONL: ``inferq embed``, ``classify`` and ``generate``."""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any

import click

from producer.cli.common import EXIT_FAILED, make_client, task_errors
from producer.contract import LANES, Lane
from producer.errors import InferqConnectionError
from producer.settings import Kind


def _run_one(kind: Kind, kwargs: dict[str, Any], priority: Lane | None) -> None:
    with task_errors():
        result = make_client().submit(kind, priority=priority or "interactive", **kwargs).get()
    click.echo(json.dumps(result, indent=2))


def _run_file(kind: Kind, path: str, output: str | None, defaults: dict[str, Any], window: int,
              priority: Lane | None, chat: list[dict[str, str]] | None = None) -> None:
    from producer.bulk import run_bulk

    # Bytes that are not UTF-8 stay in the text as surrogates, so a bad line fails alone (InvalidInput),
    # from a file as from stdin, and every good line is still sent. utf-8-sig: a byte-order mark that an
    # editor wrote at the start is not part of the first line.
    if path == "-":
        sys.stdin.reconfigure(encoding="utf-8-sig", errors="surrogateescape")  # type: ignore[union-attr]
        source, total = sys.stdin, None
    else:
        source = open(path, encoding="utf-8-sig", errors="surrogateescape")  # noqa: SIM115 - closed below
        total = None
        if stat.S_ISREG(os.stat(path).st_mode):  # counting a pipe (<(zcat ...)) would read it empty
            with open(path, "rb") as counted:
                total = sum(1 for line in counted if line.strip())
    out = sys.stdout if output in (None, "-") else open(output, "w", encoding="utf-8")  # noqa: SIM115
    try:
        report = run_bulk(make_client(), kind, source, out, defaults={k: v for k, v in defaults.items()
                                                                   if v is not None},
                          window=window, total=total, progress=sys.stderr.isatty() or output not in (None, "-"),
                          priority=priority or "bulk", chat=chat)
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
# a backfill from a file must not make the web app's requests wait behind it; one job is someone waiting
_priority_option = click.option("--priority", type=click.Choice(LANES),
                                help="the lane the tasks take: bulk waits behind interactive work "
                                     "[default: bulk with --file, else interactive]")


def _texts_or_file(texts: tuple[str, ...], file_: str | None, what: str = "TEXTS") -> None:
    if file_ and texts:
        raise click.UsageError(f"give {what} or --file, not both: with --file every job comes from the file")
_model_option = click.option("--model", help="a model alias from the worker's registry (default: the kind's default)")


@click.command()
@click.argument("texts", nargs=-1)
@_model_option
@click.option("--normalize/--no-normalize", default=True, show_default=True)
@_file_option
@_output_option
@_window_option
@_priority_option
def embed(texts: tuple[str, ...], model: str | None, normalize: bool, file_: str | None, output: str | None,
          window: int, priority: Lane | None) -> None:
    """Embed TEXTS (one task), or every line of --file."""
    _texts_or_file(texts, file_)
    if file_:
        _run_file("embed", file_, output, {"model": model, "normalize": normalize}, window, priority)
    else:
        _run_one("embed", {"texts": list(texts), "model": model, "normalize": normalize}, priority)


@click.command()
@click.argument("texts", nargs=-1)
@click.option("--labels", help="comma-separated candidate labels: zero-shot over the embedding model")
@click.option("--top-k", default=1, show_default=True)
@_model_option
@_file_option
@_output_option
@_window_option
@_priority_option
def classify(texts: tuple[str, ...], labels: str | None, top_k: int, model: str | None, file_: str | None,
             output: str | None, window: int, priority: Lane | None) -> None:
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
        _run_one("classify", {"texts": list(texts), **options}, priority)


@click.command()
@click.argument("prompt", required=False)
@click.option("--chat", is_flag=True, help="send PROMPT (with --file: each line that is a string) as a user "
              "message, rendered with the chat template")
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
             file_: str | None, output: str | None, window: int, priority: Lane | None) -> None:
    """Generate from PROMPT (one task), or from every line of --file."""
    _texts_or_file((prompt,) if prompt else (), file_, "PROMPT")
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat: a system message only exists in a chat")
    if stream and file_:
        raise click.UsageError("--stream prints one generation as it comes; --file runs many: use one of them")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                               "stop": list(stop) or None, "seed": seed, "model": model}
    before = ([{"role": "system", "content": system}] if system else []) if chat else None
    if file_:  # with --chat, each string line is a user's message
        _run_file("generate", file_, output, options, window, priority, before)
        return
    if before is not None:
        request: dict[str, Any] = {"messages": [*before, {"role": "user", "content": prompt or ""}], **options}
    else:
        request = {"prompt": prompt, **options}
    if stream:
        _stream_one({**request, "priority": priority or "interactive"})
    else:
        _run_one("generate", request, priority)


def _stream_one(kwargs: dict[str, Any]) -> None:
    """The text on stdout as it comes; then, on stderr, how it ended. Ctrl-C cancels the task."""
    client = make_client()
    with task_errors():
        generation = client.stream_generate(**kwargs)
    try:
        with task_errors(after_output=True):
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
