"""One log format for every inferq process: the node name on every line, since a launcher's children
(receivers and device processes) share one log stream."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s {node} %(name)s: %(message)s"


def configure(level: str, node: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT.format(node=node.replace("%", "%%")))
