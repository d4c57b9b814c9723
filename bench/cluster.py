"""Several ``bilten serve`` instances behind a real nginx, and what their processes cost.

Shared by ``bench/headline.py`` and ``bench/scaling.py``. nginx runs ``deploy/nginx.conf``
itself, its upstream lines and listen address replaced and nothing else (as
``tests/test_deploy.py`` does), inside a small main configuration of its own: worker processes,
file limits, temporary folders in a throwaway directory, no access log. Every instance trusts
127.0.0.1, the address nginx connects from, as ``deploy/README.md`` asks.

A layout names the processes: ``N`` is N instances with every role; ``N+M`` is N instances
serving HTTP and WebSockets (``api,realtime``) and M more running the workers (``workers``).

:class:`Processes` reads ``/proc`` (Linux) for the memory and CPU time of every process that
takes part: each instance with its children, nginx's master and workers, the PostgreSQL server
(its own processes and the backends of the bench's database only), the Redis server and the
load generator itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.common import ROOT, bilten_process, free_port

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)

NGINX_MAIN = """
worker_processes {workers};
worker_rlimit_nofile {nofile};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    log_format timing '$remote_addr "$request" $status $request_time '
                      'up=$upstream_addr connect=$upstream_connect_time '
                      'header=$upstream_header_time response=$upstream_response_time';
    access_log {access_log};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/bilten.conf;
}}
"""


def render_nginx_conf(text: str, upstreams: list[str], listen: str) -> str:
    """deploy/nginx.conf with its instances and listen address replaced; the rest unchanged."""
    block = re.search(r"^upstream bilten \{\n(.*?)^\}", text, re.M | re.S)
    if block is None:
        raise SystemExit("deploy/nginx.conf has no `upstream bilten` block")
    lines = re.findall(r"^\s*server\s+(\S+)(.*);$", block.group(1), re.M)
    if not lines:
        raise SystemExit("deploy/nginx.conf lists no server in its upstream block")
    options = lines[0][1]  # max_fails, fail_timeout: what the file says, for every instance
    servers = "".join(f"    server {urlsplit(u).netloc}{options};\n" for u in upstreams)
    body = re.sub(r"^\s*server\s+\S+.*;\n", "", block.group(1), flags=re.M)
    body = re.sub(r"^(\s*least_conn;\n)", lambda m: m.group(1) + servers, body, flags=re.M)
    text = text[: block.start(1)] + body + text[block.end(1) :]
    text, listens = re.subn(r"^(\s*)listen 80;$", rf"\1listen {listen};", text, flags=re.M)
    if listens != 1 or servers not in text:
        raise SystemExit("deploy/nginx.conf no longer has the shape this bench rewrites")
    return text


@dataclass
class Nginx:
    url: str
    process: subprocess.Popen[bytes]
    folder: Path

    def errors(self) -> Counter[str]:
        """The error log's messages so far, counted (addresses and ids left out)."""
        found: Counter[str] = Counter()
        for line in _read(str(self.folder / "error.log")).splitlines():
            message = re.sub(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (\*\d+ )?", r"[\1] ", line)
            message = re.sub(r", client: .*", "", message)
            message = re.sub(r"\d+\.\d+\.\d+\.\d+(:\d+)?", "ADDR", message)
            found[message[:160]] += 1
        return found


@contextlib.contextmanager
def nginx(
    upstreams: list[str],
    *,
    workers: int = 2,
    connections: int = 16384,
    access_log: str | None = None,
) -> Iterator[Nginx]:
    """deploy/nginx.conf in a real nginx in front of ``upstreams``; with ``access_log`` a file
    that logs every request with its upstream's timings (else no access log)."""
    if NGINX is None:
        raise SystemExit("nginx is needed: apt-get install nginx (Debian's package)")
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with tempfile.TemporaryDirectory(prefix="bilten-nginx-") as tmp:
        folder = Path(tmp)
        port = free_port()
        listen = f"127.0.0.1:{port}"
        conf = render_nginx_conf((ROOT / "deploy/nginx.conf").read_text(), upstreams, listen)
        (folder / "bilten.conf").write_text(conf)
        main = folder / "nginx-main.conf"
        main.write_text(
            NGINX_MAIN.format(
                tmp=folder,
                workers=workers,
                nofile=nofile,
                connections=min(connections, max(1024, nofile - 100)),
                access_log=f"{Path(access_log).resolve()} timing" if access_log else "off",
            )
        )
        with open(folder / "nginx.out", "wb") as out:
            proc = subprocess.Popen([NGINX, "-c", str(main), "-p", str(folder)], stderr=out)
        url = f"http://{listen}"
        try:
            deadline = time.monotonic() + 15
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    errors = (folder / "nginx.out").read_text(errors="replace")
                    raise SystemExit(f"nginx did not come up: {errors.strip()}")
                time.sleep(0.05)
            yield Nginx(url, proc, folder)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@dataclass(frozen=True)
class Layout:
    """``http`` instances (every role unless ``workers`` > 0, then api,realtime) and
    ``workers`` instances running the workers only."""

    http: int
    workers: int = 0

    @classmethod
    def parse(cls, text: str) -> Layout:
        found = re.fullmatch(r"\s*(\d+)\s*(?:\+\s*(\d+))?\s*", text)
        if found is None or int(found[1]) < 1:
            raise ValueError(f"a layout is N or N+M (N >= 1), not {text!r}")
        return cls(int(found[1]), int(found[2] or 0))

    def __str__(self) -> str:
        return f"{self.http}+{self.workers}" if self.workers else str(self.http)

    def describe(self) -> str:
        if not self.workers:
            return f"{self.http} instance(s) with every role"
        return f"{self.http} x api,realtime + {self.workers} x workers"


@dataclass
class Instance:
    name: str
    roles: str
    url: str
    pid: int


@dataclass
class Cluster:
    url: str  # nginx
    instances: list[Instance]
    nginx: Nginx
    layout: Layout

    @property
    def nginx_pid(self) -> int:
        return self.nginx.process.pid

    @property
    def pids(self) -> list[int]:
        return [i.pid for i in self.instances]


@contextlib.contextmanager
def cluster(
    database_url: str,
    redis_url: str,
    layout: Layout,
    *,
    secret_key: str,
    env: dict[str, str],
    nginx_workers: int = 2,
    access_log: str | None = None,
) -> Iterator[Cluster]:
    """The layout's instances (trusting nginx's X-Forwarded-For) and nginx in front of the HTTP
    ones; everything stopped afterwards."""
    env = {"BILTEN_TRUSTED_PROXIES": "127.0.0.1", **env}
    http_roles = "api,realtime" if layout.workers else "api,realtime,workers"
    plan = [(f"bilten-{n + 1}", http_roles) for n in range(layout.http)]
    plan += [(f"bilten-w{n + 1}", "workers") for n in range(layout.workers)]
    with contextlib.ExitStack() as stack:
        instances = []
        for name, roles in plan:
            url, proc = stack.enter_context(
                bilten_process(
                    database_url,
                    redis_url,
                    secret_key=secret_key,
                    **{**env, "BILTEN_ROLES": roles},
                )
            )
            instances.append(Instance(name, roles, url, proc.pid))
        upstreams = [i.url for i in instances if "api" in i.roles]
        front = stack.enter_context(nginx(upstreams, workers=nginx_workers, access_log=access_log))
        yield Cluster(front.url, instances, front, layout)


# --- what the processes cost ---------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(name, parent pid, CPU seconds) of a process, None when it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; PSS splits shared pages among their processes (shared buffers)."""
    rss = pss = 0
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    if not rss:  # smaps_rollup unreadable: RSS from status, PSS unknown (taken as RSS)
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("VmRSS:"):
                rss = pss = int(line.split()[1]) * 1024
    return rss, pss


@dataclass
class Usage:
    """One sample of one role's processes together."""

    rss: int = 0  # bytes, summed over its processes
    pss: int = 0
    cpu: float = 0.0  # CPU seconds so far, summed
    processes: int = 0


@dataclass
class Processes:
    """Finds the processes of a run by role and samples them.

    Roles: each instance by name (with its children), ``nginx master`` and ``nginx worker N``,
    ``postgresql`` (the server's own processes and the backends of ``database``; other
    databases' backends on a shared server are left out), ``redis`` (the server listening on
    the run's port, or an embedded one), ``load generator`` (this process).
    """

    instances: dict[str, int]  # name -> pid
    nginx_pid: int | None
    database: str
    redis_url: str
    samples: list[tuple[float, dict[str, Usage]]] = field(default_factory=list)

    def roles(self) -> dict[str, list[int]]:
        table: dict[int, tuple[str, int, float]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                found = _stat(int(entry))
                if found is not None:
                    table[int(entry)] = found
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (_, parent, _) in table.items():
            children[parent].append(pid)

        def tree(root: int) -> list[int]:
            found, todo = [], [root]
            while todo:
                pid = todo.pop()
                if pid in table:
                    found.append(pid)
                    todo += children.get(pid, [])
            return found

        roles: dict[str, list[int]] = {name: tree(pid) for name, pid in self.instances.items()}
        if self.nginx_pid is not None and self.nginx_pid in table:
            roles["nginx master"] = [self.nginx_pid]
            for n, pid in enumerate(sorted(children.get(self.nginx_pid, []))):
                roles[f"nginx worker {n + 1}"] = [pid]
        own = os.getpid()
        roles["load generator"] = [own]
        redis_port = urlsplit(self.redis_url).port
        postgres: list[int] = []
        redis: list[int] = []
        mine = set(tree(own))
        for pid, (name, _, _) in table.items():
            if name.startswith("postgres") or name == "postmaster":
                title = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
                backend = "(" in title or "[local]" in title
                if not backend or f" {self.database} " in title:
                    postgres.append(pid)
            elif name.startswith("redis-server"):
                title = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
                if pid in mine or (redis_port and f":{redis_port}" in title):
                    redis.append(pid)
        roles["postgresql"] = postgres
        roles["redis"] = redis
        return roles

    def sample(self, roles: dict[str, list[int]] | None = None) -> dict[str, Usage]:
        roles = roles or self.roles()
        now: dict[str, Usage] = {}
        for role, pids in roles.items():
            usage = Usage()
            for pid in pids:
                found = _stat(pid)
                if found is None:
                    continue
                rss, pss = _memory(pid)
                usage.rss += rss
                usage.pss += pss
                usage.cpu += found[2]
                usage.processes += 1
            now[role] = usage
        self.samples.append((time.time(), now))
        return now


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (not idle, not waiting for I/O)."""
    cpu = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
    return (sum(cpu) - cpu[3] - cpu[4]) / TICK


def cpu_between(before: dict[str, Usage], after: dict[str, Usage]) -> dict[str, float]:
    """CPU seconds each role used between two samples."""
    return {
        role: max(0.0, usage.cpu - before[role].cpu if role in before else usage.cpu)
        for role, usage in after.items()
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"
