"""The long-running roles: ``inferq worker``, ``device-server``, ``flower``, ``gateway``, and the ``demo``."""

from __future__ import annotations

import ipaddress
import sys

import click

from producer.cli.common import parse_kinds, settings_or_exit
from producer.settings import KINDS


@click.command()
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
    chosen = parse_kinds(kinds)
    if gpus is None:
        if replicas is not None:
            raise click.BadParameter("--replicas needs --gpus none", param_hint="--replicas")
        if receivers is not None:
            raise click.BadParameter("--receivers needs --gpus (all, none or ids): the launcher starts the device "
                                     "process and its receivers", param_hint="--receivers")
        from workers.supervision.main import run_worker

        run_worker(settings_or_exit(), chosen, concurrency=concurrency, node_name=name)
        return
    if name is not None:
        raise click.BadParameter("--name names one worker; with --gpus the workers are named gpu0@host, cpu0@host, "
                                 "...", param_hint="--name")
    from workers.supervision.launcher import LaunchError
    from workers.supervision.main import run_launcher

    try:
        sys.exit(run_launcher(settings_or_exit(), chosen, gpus, replicas, concurrency, receivers))
    except LaunchError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus/--replicas/--receivers") from None


@click.command("device-server")
@click.option("--listen", required=True, help="the Unix socket path to listen on (workers: INFERQ_DEVICE_SERVER)")
@click.option("--kinds", default=",".join(KINDS), show_default=True, help="comma-separated kinds to serve")
@click.option("--name", default="device", show_default=True, help="the name on its log lines")
def device_server(listen: str, kinds: str, name: str) -> None:
    """Hold the models on INFERQ_DEVICE and run the model work of the workers that connect.

    `inferq worker --gpus ... --receivers N` starts these itself. By hand: start one with
    INFERQ_DEVICE_SERVER_KEY set, and workers with INFERQ_DEVICE_SERVER=<socket> and the same key.
    """
    from workers.supervision.main import run_device_server_process

    run_device_server_process(settings_or_exit(), parse_kinds(kinds), listen, name)


@click.command()
@click.option("--port", type=int, help="default: INFERQ_FLOWER_PORT (5555)")
@click.option("--address", help="default: INFERQ_FLOWER_ADDRESS (127.0.0.1)")
def flower(port: int | None, address: str | None) -> None:
    """Start Flower on the same Redis as the workers; /metrics adds inferq_queue_depth per queue."""
    from producer.monitoring import run_flower

    settings = settings_or_exit()
    address = address or settings.flower_address
    if settings.flower_basic_auth is None and not _on_loopback(address):
        # Flower shows every task's arguments and results, and its API can revoke tasks and stop workers
        raise click.UsageError(f"Flower off loopback ({address}) needs a password: set INFERQ_FLOWER_BASIC_AUTH "
                               "(user:password)")
    sys.exit(run_flower(settings, port, address))


def _on_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


@click.command()
@click.option("--host", help="default: INFERQ_GATEWAY__HOST (127.0.0.1)")
@click.option("--port", type=int, help="default: INFERQ_GATEWAY__PORT (8080)")
@click.option("--open", "open_access", is_flag=True, help="run without API keys (loopback only)")
def gateway(host: str | None, port: int | None, open_access: bool) -> None:
    """The OpenAI HTTP API (embeddings, chat completions, completions, models) in front of the queue."""
    import uvicorn

    from producer.gateway.app import create_app
    from producer.gateway.closing import GatewayServer

    settings = settings_or_exit()
    host = host or settings.gateway.host
    port = port or settings.gateway.port
    if not settings.gateway.api_keys:
        if not open_access:
            raise click.UsageError("no API keys are set (INFERQ_GATEWAY__API_KEYS='{\"name\": \"key\"}'); set "
                                   "some, or pass --open to run without them on loopback")
        if not _on_loopback(host):
            raise click.UsageError(f"--open runs without API keys, so only on loopback (127.0.0.1, ::1, "
                                   f"localhost); not on {host}")
    app = create_app(settings, open_access=not settings.gateway.api_keys)
    grace = settings.gateway.shutdown_grace_s
    server = GatewayServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                          timeout_graceful_shutdown=grace), app.state.closing, grace)
    server.run()
    if not server.started:  # as uvicorn.run: the port was taken, say
        sys.exit(3)


@click.command()
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for the three results")
def demo(timeout: float) -> None:
    """Start what is needed (Redis if none answers, a worker), run one task of each kind, stop it all."""
    from producer.demo import run_demo

    sys.exit(run_demo(settings_or_exit(), timeout))
