"""What every inferq command shares: the settings, a client, a task's errors as exit codes, the kinds."""

from __future__ import annotations

import contextlib
import sys
import tomllib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError
from pydantic_settings import SettingsError

from producer.errors import InferqError, InputTooLarge, InvalidInput, UnknownModel
from producer.settings import KINDS, Kind, Settings, describe_error

if TYPE_CHECKING:
    from producer.client import Client

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def settings_or_exit() -> Settings:
    """The settings, or one line per bad setting and exit 2 (a configuration error is a usage error)."""
    try:
        return Settings()
    except (ValidationError, SettingsError, tomllib.TOMLDecodeError, OSError) as exc:
        click.echo(f"configuration error: {describe_error(exc)}", err=True)
        sys.exit(EXIT_BAD_INPUT)


def make_client() -> Client:
    from producer.client import Client  # here: --help and bad arguments never import Celery

    return Client(settings_or_exit())


@contextlib.contextmanager
def task_errors(after_output: bool = False) -> Iterator[None]:
    """A task's error as one line on stderr, and the exit code: 2 for bad input, 1 for any other failure."""
    try:
        yield
    except InferqError as exc:
        click.echo(("\n" if after_output else "") + f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT if isinstance(exc, InvalidInput | InputTooLarge | UnknownModel) else EXIT_FAILED)


def parse_kinds(text: str) -> tuple[Kind, ...]:
    chosen: list[Kind] = []
    by_name: dict[str, Kind] = {kind: kind for kind in KINDS}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in by_name:
            raise click.BadParameter(f"{part!r} is not a kind; choose from {', '.join(KINDS)}", param_hint="--kinds")
        chosen.append(by_name[part])
    if not chosen:
        raise click.BadParameter("name at least one kind", param_hint="--kinds")
    return tuple(dict.fromkeys(chosen))
