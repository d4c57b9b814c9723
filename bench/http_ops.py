"""Overhead of Bilten's HTTP stack (middleware, metrics, error shape) against a hello-world.

    python bench/http_ops.py [--duration 10] [--connections 64]

Serves `GET /health` (process alive: the whole middleware stack, no I/O) and
`GET /health/ready` (one PostgreSQL and one Redis round trip) from one `bilten serve`
process, and a Starlette hello-world from one uvicorn process configured the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bilten, hello_world, report, services, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    load = {"duration": args.duration, "connections": args.connections}
    with hello_world() as url:
        baseline = wrk(url + "/", **load)
    report("hello-world GET /", baseline)
    with services() as (database_url, redis_url), bilten(database_url, redis_url) as url:
        report("bilten GET /health", wrk(url + "/health", **load), baseline)
        report("bilten GET /health/ready", wrk(url + "/health/ready", **load), baseline)


if __name__ == "__main__":
    main()
