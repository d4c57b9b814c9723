"""The scaling curve: the same flash sale through nginx in front of 1, 2, 3... instances.

    python bench/scaling.py [--layouts 1,1+1,2,2+1,3] [--seats 5000] [--buyers 2000]
                            [--timeout 120] [--send-mail] [--json FILE]
                            [--env BILTEN_NAME=VALUE ...]

For each layout in turn (``N``: N instances with every role; ``N+M``: N instances
``--roles api,realtime`` and M ``--roles workers``, see ``bench/cluster.py``), in one run on
one database and one Redis: the layout is started behind ``deploy/nginx.conf`` in a real nginx
(``apt-get install nginx``), a fresh event of ``--seats`` seats is put on sale and
``bench/flash_sale.py``'s buyers (each from its own loopback address, with its own keep-alive
connection to nginx, booking 1-4 seats with ``Prefer: wait=30`` while watching the live map)
buy until it is sold out; PostgreSQL is checked as flash_sale checks it. Printed per layout:
confirmed bookings per second, the latency of a confirmed booking, and the CPU each process
used during the sale, in % of one core, with the machine's idle share.

What binds on a 2-core machine: every layout shares the same two cores among the instances,
nginx, PostgreSQL, Redis and the load generator, so another instance adds an event loop but no
core. One event's queue is drained by one worker at a time (the holder of the event's lease),
so a single sale's bookings per second do not grow with instances at all: they grow when the
worker stops sharing its event loop with HTTP (``N+1``), and stop at what that one worker
process and PostgreSQL can do. More HTTP instances help the door (202s, refusals, reads), and
only where there are cores for them. Mail is deferred during the sale (``--send-mail`` sends
it), the per-IP API budget is on at its default, and payments are the test provider's, without
latency; PostgreSQL and Redis come from ``BILTEN_DATABASE_URL`` / ``BILTEN_REDIS_URL``, else
embedded ones. Other work on the machine shows in the machine's idle share and in "other".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench.cluster import Layout, Processes, cluster, cpu_between, machine_busy
from bench.common import attendee_tokens, services
from bench.flash_sale import (
    SETTLE,
    forget_in_redis,
    make_buyers,
    make_event,
    percentile,
    run_load,
    verify,
    wait_until_settled,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--layouts", default="1,1+1,2,2+1,3", help="comma-separated layouts")
    parser.add_argument("--seats", type=int, default=5000)
    parser.add_argument("--buyers", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=120, help="bound on each sale, seconds")
    parser.add_argument("--nginx-workers", type=int, default=2)
    parser.add_argument("--send-mail", action="store_true", help="send mail during the sale")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args()
    try:
        args.parsed = [Layout.parse(text) for text in args.layouts.split(",")]
    except ValueError as error:
        parser.error(str(error))
    return args


def env_of(args: argparse.Namespace, data_dir: str) -> dict[str, str]:
    env = {"BILTEN_ACCESS_TOKEN_TTL": "3600", "BILTEN_DATA_DIR": data_dir}
    if not args.send_mail:
        env["BILTEN_MAIL_POLL_INTERVAL"] = "3600"
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("BILTEN_"):
            raise SystemExit(f"--env wants BILTEN_NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def one_layout(
    args: argparse.Namespace,
    layout: Layout,
    database_url: str,
    redis_url: str,
    secret_key: str,
    per_person: int,
    data_dir: str,
) -> dict[str, Any]:
    event_id, seat_ids = asyncio.run(make_event(database_url, args.seats, per_person))
    # Buyers of their own: an Idempotency-Key is the user's, whatever the event.
    buyer_ids = asyncio.run(make_buyers(database_url, args.buyers))
    buyer_tokens = attendee_tokens(secret_key, buyer_ids)
    try:
        with cluster(
            database_url,
            redis_url,
            layout,
            secret_key=secret_key,
            env=env_of(args, data_dir),
            nginx_workers=args.nginx_workers,
        ) as running:
            time.sleep(SETTLE)
            processes = Processes(
                {i.name: i.pid for i in running.instances},
                running.nginx_pid,
                urlsplit(database_url).path.lstrip("/"),
                redis_url,
            )
            roles = processes.roles()
            before = processes.sample(roles)
            busy = machine_busy()
            began = time.perf_counter()
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                load = runner.run(
                    run_load(
                        [running.url],
                        event_id,
                        seat_ids,
                        buyer_tokens,
                        per_person,
                        args.timeout,
                        5,
                        own_addresses=True,
                    )
                )
            busy = machine_busy() - busy
            cpu = cpu_between(before, processes.sample(roles))
            span = time.perf_counter() - began  # the CPU figures' period
            nginx_errors = running.nginx.errors()
        asyncio.run(wait_until_settled(database_url, event_id, 60))
        verdict = asyncio.run(verify(database_url, event_id))
    finally:
        if os.environ.get("BILTEN_REDIS_URL"):
            asyncio.run(forget_in_redis(redis_url, database_url, event_id))
    confirmed = load.outcomes["201 confirmed"]
    window = (load.last_confirmed or load.ended) - load.started
    rate = confirmed / window if window > 0 and confirmed else 0.0
    latencies = load.latencies.get("201 confirmed", [])
    cores = os.cpu_count() or 1
    ours = sum(cpu.values())
    share = {role: 100 * seconds / span for role, seconds in cpu.items()}
    share["other"] = 100 * max(0.0, busy - ours) / span
    idle = max(0.0, 100 * (1 - busy / (cores * span)))
    statuses = dict(sorted(load.statuses.items()))
    ok = verdict.ok and verdict.sold == args.seats and not load.timed_out
    print(
        f"{layout!s:>5}  {layout.describe():<36} {rate:7.0f} bookings/s  "
        f"{load.seats_confirmed / window if window > 0 else 0:7.0f} seats/s  "
        f"confirmed p50 {percentile(latencies, 0.5) if latencies else 0:6.0f} ms "
        f"p99 {percentile(latencies, 0.99) if latencies else 0:6.0f} ms  "
        f"{'ok' if ok else 'CHECKS FAILED'}" + (" TIMED OUT" if load.timed_out else ""),
        flush=True,
    )
    print(
        "       CPU % of a core: "
        + ", ".join(f"{role} {pct:.0f}" for role, pct in share.items() if pct >= 0.5)
        + f"; machine idle {idle:.0f}%; HTTP statuses {statuses}"
        + (f"; oversold {verdict.oversold}" if verdict.oversold else ""),
        flush=True,
    )
    if nginx_errors:
        print(
            "       nginx: " + "; ".join(f"{n} x {m}" for m, n in nginx_errors.most_common(3)),
            flush=True,
        )
    return {
        "layout": str(layout),
        "describe": layout.describe(),
        "bookings_per_s": round(rate, 1),
        "seats_per_s": round(load.seats_confirmed / window, 1) if window > 0 else 0.0,
        "confirmed_p50_ms": round(percentile(latencies, 0.5), 1) if latencies else None,
        "confirmed_p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
        "seconds": round(window, 2),
        "cpu_percent_of_core": {role: round(pct, 1) for role, pct in share.items()},
        "machine_idle_percent": round(idle, 1),
        "statuses": {str(k): v for k, v in statuses.items()},
        "oversold": verdict.oversold,
        "checks_ok": ok,
    }


def main() -> None:
    args = parse_args()
    per_person = min(100, max(10, math.ceil(2 * args.seats / args.buyers)))
    secret_key = secrets.token_urlsafe(48)
    print(
        f"scaling: flash sale of {args.seats} seats, {args.buyers} buyers (each from its own "
        f"address, through nginx), layouts {args.layouts}; mail "
        f"{'sent' if args.send_mail else 'deferred'}; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    with services() as (database_url, redis_url), tempfile.TemporaryDirectory() as data_dir:
        for layout in args.parsed:
            results.append(
                one_layout(
                    args,
                    layout,
                    database_url,
                    redis_url,
                    secret_key,
                    per_person,
                    data_dir,
                )
            )
    best = max(results, key=lambda r: r["bookings_per_s"])
    print(
        "summary: "
        + ", ".join(f"{r['layout']} {r['bookings_per_s']:.0f}/s" for r in results)
        + f"; best {best['layout']} ({best['describe']})",
        flush=True,
    )
    if args.json:
        document = {
            "bench": "scaling",
            "config": {
                "seats": args.seats,
                "buyers": args.buyers,
                "layouts": args.layouts,
                "mail": "sent" if args.send_mail else "deferred",
                "env": args.env,
                "cores": os.cpu_count(),
            },
            "figures": {f"bookings_per_s_{r['layout']}": r["bookings_per_s"] for r in results},
            "layouts": results,
        }
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    if not all(r["checks_ok"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
