"""`inferq models list`: the models the registry configures, and what each live worker has loaded, where.

The registry is this host's settings; what a worker loaded comes from its ``inferq_status`` reply (the models
on its device process when it has one), so a worker started with other settings shows what it really serves.
"""

from __future__ import annotations

from typing import Any

from producer.client import Client
from producer.connection import ConnectionErrors, broadcast
from producer.settings import KINDS, Settings, redact


def registry_lines(settings: Settings) -> list[str]:
    lines = []
    for kind in KINDS:
        default = settings.models.default_alias(kind)
        for alias, entry in settings.models.entries(kind).items():
            source = entry.source + (f" ({entry.gguf_file})" if entry.gguf_file else "")
            lines.append(f"  {kind:<9} {alias + (' *' if alias == default else ''):<20} {source}  "
                         f"dtype={entry.dtype} max_length={entry.max_length}")
    return lines or ["  (none)"]


def worker_statuses(client: Client, timeout: float) -> list[dict[str, Any]]:
    """The live workers' ``inferq_status`` replies (each ``{node: status}``), waiting ``timeout`` for them."""
    with ConnectionErrors(f"the broker at {redact(client.settings.broker)}"):
        return broadcast(client.app, "inferq_status", reply=True, timeout=timeout)


def by_node(replies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {node: status for reply in replies for node, status in reply.items() if isinstance(status, dict)}


def worker_lines(statuses: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for node, status in sorted(statuses.items()):
        where = "its device process" if "device_process" in status or "hand_offs" in status else "its own process"
        lines.append(f"  {node}: {', '.join(status.get('kinds', []))} on {status.get('device', '?')} (weights in "
                     f"{where}){'' if status.get('ready') else ', not ready'}")
        for kind, group in sorted((status.get("models") or {}).items()):
            for alias, model in sorted(group.items()):
                lines.append(f"    {kind:<9} {alias:<18} {model.get('dtype', '?'):<9} on {model.get('device', '?'):<7} "
                             f"from {model.get('location', '?')}")
    return lines or ["  (no worker answered)"]
