"""The bench suite (``make bench``): every bench in turn, one JSON file of results, PNG plots.

    python bench/suite.py [--name suite] [--only NAME,...] [--skip NAME,...] [--quick]
                          [--out bench/results] [--plots-only FILE]

Runs, each as its own process with its output shown as it comes (indented) and a progress
line before and after: ``http_ops`` and ``read_path`` (wrk, 5 s per measurement),
``holds`` (1,000 buyers, 2 rounds), ``flash_sale --split-roles --defer-mail`` (5,000 seats,
2,000 buyers, with its SQL-only baselines, then again with a payment provider's tail),
``ws_fanout`` (10,000 sockets, 100 changes at 10/s made by HTTP holds, a burst of 100),
``headline_small`` (10,000 buyers, 1,000 tickets),
``scaling`` (layouts 1, 1+1, 2, 2+1, 3; 3,000 seats) and ``headline``, the headline run
itself (100,000 buyers, 5,000 tickets, bounded at 8 minutes). About 8 minutes on 2 cores,
half of it the headline run; ``--quick`` leaves that out (about 4.5 minutes). A bench
that fails is recorded with its exit status and the suite goes on; the suite's exit status
is 1 if any failed. Needs wrk and nginx (Debian packages); PostgreSQL and Redis as every
bench takes them (``BILTEN_DATABASE_URL`` / ``BILTEN_REDIS_URL``, else embedded).

Writes ``<out>/<date>-<name>.json`` (the schema below), ``<out>/<date>-<name>.log`` (every
bench's output) and the plots of the latest run, ``<out>/<name>-*.png`` (overwritten by the
next run): bookings per second over time, latency percentiles, queue depth over time, memory
per process, the scaling curve, and the WebSocket delta latency histogram (ws_fanout's
deliveries, as they reached the sockets and as its clients read them).
``--plots-only FILE`` draws the plots of a results file again.

JSON schema (version 1)::

    {"schema": 1, "name": str, "started": ISO 8601 UTC, "seconds": float,
     "machine": {"cores": int, "load_average": [1, 5, 15 min] before the suite,
                 "python": str, "platform": str},
     "services": {"postgresql": "external" | "embedded", "redis": "external" | "embedded"},
     "benches": [{"name": str, "command": [str], "seconds": float, "exit_status": int,
                  "result": BENCH | null}]}

    BENCH = {"bench": str,                     # the bench's own --json document
             "config": {...},                  # its arguments, where it has any
             "figures": {name: number | bool | null | {...}},   # flat where it can be
             "series": {name: {"t": [seconds], "values": {label: [number]}}},   # optional
             "histograms": {name: {"edges_ms": [e0, e1, ...], "counts": [c0, c1, ...]}},
             "latency_ms": {operation: {"p50": ms, "p90": ms, "p99": ms}},      # optional
             "layouts": [...]}                 # scaling only: one entry per layout

A histogram's ``counts`` has one bucket more than ``edges_ms``: ``counts[0]`` below the first
edge, ``counts[i]`` from ``edges_ms[i-1]`` up to ``edges_ms[i]``, the last at or above the last
edge. Times in series are seconds from the start of the measured phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    args: tuple[str, ...]
    json: bool = True  # the script takes --json FILE


STEPS = (
    Step("http_ops", "http_ops.py", ("--duration", "5")),
    Step("read_path", "read_path.py", ("--duration", "5")),
    Step("holds", "holds.py", ("--buyers", "1000", "--rounds", "2")),
    Step(
        "flash_sale",
        "flash_sale.py",
        (
            "--split-roles",
            "--defer-mail",
            "--seats",
            "5000",
            "--buyers",
            "2000",
            "--latency",
            "150,2000,0.001",
        ),
    ),
    Step(
        "ws_fanout",
        "ws_fanout.py",
        (
            "--connections",
            "10000",
            "--changes",
            "100",
            "--rate",
            "10",
            "--burst",
            "100",
            "--source",
            "holds",
        ),
    ),
    Step("headline_small", "headline.py", ("--buyers", "10000", "--seats", "1000")),
    Step("scaling", "scaling.py", ("--seats", "3000", "--buyers", "1500")),
    Step("headline", "headline.py", ("--buyers", "100000", "--seats", "5000", "--timeout", "480")),
)


def run_step(step: Step, index: int, total: int, log: Any) -> dict[str, Any]:
    """Run one bench, its output shown indented and kept in the log; its record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(BENCH / step.script), *step.args]
        if step.json:
            command += ["--json", str(out)]
        shown = ["python", f"bench/{step.script}", *step.args]
        print(f"[{index}/{total}] {step.name}: {' '.join(shown)}", flush=True)
        log.write(f"\n=== {step.name}: {' '.join(shown)}\n")
        began = time.monotonic()
        with subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                log.write(line + "\n")
                if line.startswith('{"ts"'):
                    continue  # a server's log line: kept in the log, not shown
                print(f"    {line}", flush=True)
        seconds = time.monotonic() - began
        result: dict[str, Any] | None = None
        if out.exists():
            result = json.loads(out.read_text())
        status = proc.returncode
        print(
            f"[{index}/{total}] {step.name}: {'ok' if status == 0 else f'FAILED ({status})'} "
            f"in {seconds:.0f} s",
            flush=True,
        )
        return {
            "name": step.name,
            "command": shown,
            "seconds": round(seconds, 1),
            "exit_status": status,
            "result": result,
        }


# --- plots --------------------------------------------------------------------------------------


def _result(document: dict[str, Any], *names: str) -> dict[str, Any] | None:
    for name in names:
        for bench in document["benches"]:
            if bench["name"] == name and bench.get("result"):
                return bench["result"]  # type: ignore[no-any-return]
    return None


def _rate(
    t: list[float], values: list[float], span: float = 2.0
) -> tuple[list[float], list[float]]:
    """A counter's rate of change per second over ``span`` seconds."""
    xs: list[float] = []
    ys: list[float] = []
    j = 0
    for i in range(len(t)):
        while t[i] - t[j] > span:
            j += 1
        if t[i] > t[j]:
            xs.append(t[i])
            ys.append((values[i] - values[j]) / (t[i] - t[j]))
    return xs, ys


def plot(document: dict[str, Any], out: Path, name: str) -> list[Path]:
    """Draw the plots of a results document; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True})
    written: list[Path] = []

    def save(fig: Any, kind: str) -> None:
        path = out / f"{name}-{kind}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    headline = _result(document, "headline", "headline_small")
    flash = _result(document, "flash_sale")
    # Bookings per second over time.
    panels = [p for p in (headline, flash) if p and p.get("series")]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        for ax, result in zip(axes[0], panels, strict=True):
            if result["bench"] == "headline":
                queue = result["series"]["queue"]
                t, values = queue["t"], queue["values"]
                for label, key in (
                    ("places given", "tickets"),
                    ("places served", "served"),
                    ("bookings (tickets sold)", "sold"),
                ):
                    xs, ys = _rate(t, values[key])
                    ax.plot(xs, ys, label=label, lw=1)
                cfg = result.get("config", {})
                ax.set_title(
                    f"headline: {cfg.get('buyers', 0):,} buyers, {cfg.get('seats', 0):,} "
                    f"tickets ({cfg.get('layout', '')})"
                )
            else:
                series = result["series"]["confirmed"]
                ax.plot(series["t"], series["values"]["bookings_per_s"], label="bookings", lw=1)
                ax.plot(series["t"], series["values"]["seats_per_s"], label="seats", lw=1)
                ax.set_title("flash_sale --split-roles: confirmed per second")
            ax.set_xlabel("seconds since the opening")
            ax.set_ylabel("per second")
            ax.legend(fontsize=7)
        save(fig, "bookings-per-second")
    # Queue depth over time.
    if headline and headline.get("series"):
        queue = headline["series"]["queue"]
        values = queue["values"]
        depth = [a - b for a, b in zip(values["tickets"], values["served"], strict=True)]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(queue["t"], depth, label="queue depth (given - served)", lw=1.2)
        ax.plot(queue["t"], values["placed"], label="buyers with a place", lw=1, ls="--")
        ax.plot(queue["t"], values["told"], label="buyers told their outcome", lw=1, ls=":")
        ax.set_xlabel("seconds since the opening")
        ax.set_ylabel("requests")
        ax.set_title("headline: the queue")
        ax.legend(fontsize=7)
        save(fig, "queue-depth")
    # Memory per process.
    if headline and headline.get("series", {}).get("rss_mib"):
        rss = headline["series"]["rss_mib"]
        fig, ax = plt.subplots(figsize=(6, 3))
        for role, values in rss["values"].items():
            if max(values, default=0) >= 5:
                ax.plot(rss["t"], values, label=role, lw=1)
        ax.set_xlabel("seconds since the opening")
        ax.set_ylabel("MiB (RSS; PostgreSQL: PSS)")
        ax.set_title("headline: memory per process")
        ax.legend(fontsize=6, ncol=2)
        save(fig, "memory")
    # Latency percentiles.
    bars: list[tuple[str, float, float]] = []
    for bench, label, p50, p99 in (
        ("http_ops", "GET /health", "health_p50_ms", "health_p99_ms"),
        ("read_path", "GET /events/{id}", "detail_p50_ms", "detail_p99_ms"),
        ("read_path", "GET .../seats", "seat_map_p50_ms", "seat_map_p99_ms"),
        ("holds", "POST /holds", "distinct_p50_ms", "distinct_p99_ms"),
        ("ws_fanout", "delta to a socket", "delivery_p50_ms", "delivery_p99_ms"),
        ("ws_fanout", "delta to all", "to_all_p50_ms", "to_all_p99_ms"),
        ("headline", "POST /bookings 202 (100k)", "enqueue_p50_ms", "enqueue_p99_ms"),
        ("headline_small", "POST /bookings 202", "enqueue_p50_ms", "enqueue_p99_ms"),
    ):
        found = _result(document, bench)
        figures = (found or {}).get("figures", {})
        if figures.get(p50) is not None and figures.get(p99) is not None:
            bars.append((label, float(figures[p50]), float(figures[p99])))
    flash_latency = (flash or {}).get("latency_ms", {}).get("201 confirmed")
    if flash_latency:
        bars.append(("booking confirmed (wait)", flash_latency["p50"], flash_latency["p99"]))
    if bars:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        rows = range(len(bars))
        ax.barh([y + 0.2 for y in rows], [b[2] for b in bars], height=0.4, label="p99")
        ax.barh([y - 0.2 for y in rows], [b[1] for b in bars], height=0.4, label="p50")
        ax.set_yticks(list(rows), [b[0] for b in bars])
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_title("latency percentiles")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        save(fig, "latency")
    # The scaling curve.
    scaling = _result(document, "scaling")
    if scaling and scaling.get("layouts"):
        layouts = scaling["layouts"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2))
        names = [r["layout"] for r in layouts]
        left.bar(names, [r["bookings_per_s"] for r in layouts], color="tab:blue")
        left.set_ylabel("confirmed bookings/s")
        left.set_xlabel("layout (N, or N api + M workers)")
        left.set_title("flash sale through nginx")
        groups: dict[str, list[float]] = {}
        for index, result in enumerate(layouts):
            for role, pct in result["cpu_percent_of_core"].items():
                group = (
                    "bilten (HTTP)"
                    if role.startswith("bilten-") and not role.startswith("bilten-w")
                    else "bilten (workers)"
                    if role.startswith("bilten-w")
                    else "nginx"
                    if role.startswith("nginx")
                    else role
                )
                groups.setdefault(group, [0.0] * len(layouts))[index] += pct
        bottom = [0.0] * len(layouts)
        for group, values in groups.items():
            right.bar(names, values, bottom=bottom, label=group)
            bottom = [a + b for a, b in zip(bottom, values, strict=True)]
        right.axhline(100 * (os.cpu_count() or 2), color="black", lw=0.8, ls="--")
        right.set_ylabel("CPU, % of one core")
        right.set_title("where the CPU went")
        right.legend(fontsize=6, ncol=2)
        save(fig, "scaling")
    # The sockets' delta latency histogram.
    ws = _result(document, "ws_fanout")
    histograms = (ws or {}).get("histograms", {})
    if histograms:
        figures = ws["figures"] if ws else {}
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        for key, label, p99 in (
            ("delivery_at_socket", "at the socket (kernel receive time)", "delivery_p99_ms"),
            ("delivery_read", "as read by the clients", "read_p99_ms"),
        ):
            found = histograms.get(key)
            if not found:
                continue
            edges, counts = found["edges_ms"], found["counts"]
            # counts[0] is below the first edge, counts[-1] at or above the last.
            bounds = [edges[0] / 2, *edges, edges[-1] * 2]
            line = ax.stairs(counts, bounds, label=label, lw=1.2)
            if figures.get(p99) is not None:
                ax.axvline(figures[p99], color=line.get_edgecolor(), lw=0.8, ls=":")
        counted = [
            bound
            for found in histograms.values()
            for bound, count in zip(
                [found["edges_ms"][0] / 2, *found["edges_ms"]], found["counts"], strict=False
            )
            if count
        ]
        if counted:
            ax.set_xlim(min(counted) / 2, max(counted) * 4)
        goal = figures.get("goal_p99_ms")
        if goal:
            ax.axvline(goal, color="black", lw=0.8, ls="--", label=f"goal: p99 < {goal:g} ms")
        ax.set_xscale("log")
        ax.set_xlabel("ms from the change (HTTP hold sent) to the socket; dotted: p99")
        ax.set_ylabel("deliveries")
        cfg = (ws or {}).get("config", {})
        ax.set_title(
            f"ws_fanout: seat-delta latency, {figures.get('connections', 0):,} sockets, "
            f"{cfg.get('rate', 0):g} changes/s ({cfg.get('source', '')})"
        )
        ax.legend(fontsize=7)
        save(fig, "ws-latency")
    return written


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="suite", help="names the results' files")
    parser.add_argument("--only", help="comma-separated bench names to run (the others skipped)")
    parser.add_argument("--skip", default="", help="comma-separated bench names to skip")
    parser.add_argument(
        "--quick", action="store_true", help="leave out the 100,000-buyer headline run"
    )
    parser.add_argument("--out", default=str(BENCH / "results"), help="where results go")
    parser.add_argument("--plots-only", metavar="FILE", help="draw the plots of a results file")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plots_only:
        earlier = json.loads(Path(args.plots_only).read_text())
        for path in plot(earlier, out, earlier.get("name", args.name)):
            print(f"plot: {path}")
        return
    steps = [s for s in STEPS if not (args.quick and s.name == "headline")]
    names = {s.name for s in STEPS}
    only = set(args.only.split(",")) if args.only else names
    skip = set(filter(None, args.skip.split(",")))
    unknown = (only | skip) - names
    if unknown:
        parser.error(f"no bench named {', '.join(sorted(unknown))}; there are {sorted(names)}")
    steps = [s for s in steps if s.name in only and s.name not in skip]
    started = datetime.now(UTC)
    stamp = started.strftime("%Y-%m-%d")
    json_path = out / f"{stamp}-{args.name}.json"
    log_path = out / f"{stamp}-{args.name}.log"
    document: dict[str, Any] = {
        "schema": 1,
        "name": args.name,
        "started": started.isoformat(timespec="seconds"),
        "seconds": 0.0,
        "machine": {
            "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "services": {
            "postgresql": "external" if os.environ.get("BILTEN_DATABASE_URL") else "embedded",
            "redis": "external" if os.environ.get("BILTEN_REDIS_URL") else "embedded",
        },
        "benches": [],
    }
    print(
        f"bench suite {args.name!r}: {len(steps)} benches ({', '.join(s.name for s in steps)}); "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; results in {out}",
        flush=True,
    )
    began = time.monotonic()
    with open(log_path, "w") as log:
        for index, step in enumerate(steps, 1):
            document["benches"].append(run_step(step, index, len(steps), log))
            document["seconds"] = round(time.monotonic() - began, 1)
            json_path.write_text(json.dumps(document, indent=1) + "\n")  # kept as it goes
    failed = [b["name"] for b in document["benches"] if b["exit_status"] != 0]
    written = plot(document, out, args.name)
    print(
        f"bench suite done in {document['seconds']:.0f} s: "
        + (f"FAILED: {', '.join(failed)}" if failed else "every bench passed")
        + f"; results {json_path}"
        + (f", plots {', '.join(p.name for p in written)}" if written else ""),
        flush=True,
    )
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
