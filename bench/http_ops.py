"""Overhead of Bilten's HTTP stack (middleware, metrics, error shape) against a hello-world.

    python bench/http_ops.py [--duration 10] [--connections 64] [--json FILE]

Serves `GET /health` (process alive: the whole middleware stack, no I/O) and
`GET /health/ready` (one PostgreSQL and one Redis round trip) from one `bilten serve`
process, and a Starlette hello-world from one uvicorn process configured the same way; the
hello-world is measured right before each figure, which is compared with that run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, bilten, hello_world, report, services, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    load = {"duration": args.duration, "connections": args.connections}
    results: dict[str, Result] = {}
    with (
        hello_world() as hello,
        services() as (database_url, redis_url),
        bilten(database_url, redis_url) as url,
    ):
        for name, path in (("health", "/health"), ("ready", "/health/ready")):
            baseline = results[f"hello_{name}"] = wrk(hello + "/", **load)
            report("hello-world GET /", baseline)
            results[name] = wrk(url + path, **load)
            report(f"bilten GET {path}", results[name], baseline)
    if args.json:
        write_json(args.json, "http_ops", results)


def write_json(path: str, bench: str, results: dict[str, Result]) -> None:
    """wrk's figures by name: requests per second, p50 and p99 in ms, errors."""
    figures: dict[str, float] = {}
    for name, result in results.items():
        figures[f"{name}_rps"] = round(result.requests_per_second, 1)
        figures[f"{name}_p50_ms"] = result.p50_ms
        figures[f"{name}_p99_ms"] = result.p99_ms
        figures[f"{name}_errors"] = result.errors
    for name, result in results.items():
        # Against the yardstick measured beside it (``hello_<name>``), else the one ``hello``.
        baseline = results.get(f"hello_{name}", results.get("hello"))
        if baseline is not None and not name.startswith("hello"):
            figures[f"{name}_ratio"] = round(
                result.requests_per_second / baseline.requests_per_second, 3
            )
    Path(path).write_text(json.dumps({"bench": bench, "figures": figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
