"""The ``inferq`` command: one job or bulk jobs from JSONL (jobs.py), the long-running roles (serving.py),
and looking after a deployment (operations.py).

Heavy imports (torch, transformers) happen only inside the commands that need them.
"""

from __future__ import annotations

import click

from producer.cli import jobs, operations, serving


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """inferq: embed, classify and generate through Celery workers and Redis."""


for command in (jobs.embed, jobs.classify, jobs.generate, serving.worker, operations.models, serving.device_server,
                operations.check, serving.flower, serving.gateway, serving.demo, operations.bench):
    main.add_command(command)
