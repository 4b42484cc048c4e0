"""What admission control costs a gateway request: ``Admission.admit`` timed in a loop against Redis.

``python -m benchmarks.admission_cost [--checks N] [--rounds R]``: microseconds of wall time and of this
process's CPU per check, with the depth read on every check (``cache_s`` 0: one LLEN round trip) and with the
default window (50 ms: one read per window per kind, shared by every request meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from producer.gateway.admission import Admission
from producer.settings import Settings


async def _cost(url: str, cache_s: float, checks: int) -> tuple[float, float]:
    admission = Admission(url, limit=1_000_000, cache_s=cache_s, retry_after=1, connect_timeout=2.0)
    await admission.admit("embed")  # connected
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(checks):
        await admission.admit("embed")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await admission.close()
    return wall / checks * 1e6, cpu / checks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    url = Settings().broker
    for cache_s in (0.0, 0.05):
        figures = [asyncio.run(_cost(url, cache_s, args.checks)) for _ in range(args.rounds)]
        print(f"cache {cache_s * 1000:.0f} ms: wall us/check " + " / ".join(f"{w:.1f}" for w, _ in figures)
              + "; CPU us/check " + " / ".join(f"{c:.1f}" for _, c in figures))


if __name__ == "__main__":
    main()
