"""Behind a real nginx: per-IP limits count real clients, and a forged X-Forwarded-For does not.

nginx listens on loopback in front of two ``bilten serve`` instances that trust it
(``BILTEN_TRUSTED_PROXIES=127.0.0.1``). Clients are told apart by their source address: the
whole of 127.0.0.0/8 is loopback, so one client connects from 127.0.0.2 and another from
127.0.0.3, and nginx sees them as two.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]

LIMIT = 6  # API requests per client IP and minute

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream bilten {{
        least_conn;
        {servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bilten;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(tmp: Path, upstreams: list[str]) -> Iterator[str]:
    port = free_port()
    servers = "\n        ".join(f"server {u.removeprefix('http://')};" for u in upstreams)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, servers=servers))
    with started_nginx("nginx", conf, tmp, f"http://127.0.0.1:{port}") as url:
        yield url


@contextlib.contextmanager
def started_nginx(
    binary: str, conf: Path, folder: Path, url: str, wait: float = 10
) -> Iterator[str]:
    """nginx on ``conf`` (prefix ``folder``), once ``url`` answers /health; stopped after."""
    out = folder / "nginx.out"
    with open(out, "wb") as stderr:
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(folder)], stderr=stderr)
    try:
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def client_from(address: str, base: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=base, transport=transport, timeout=10)


def used_up(client: httpx.Client, headers: dict[str, str] | None = None) -> list[int]:
    """The budget used up, a request at a time. Each instance tells the others what it counted
    every few milliseconds (bilten.budget): requests paced wider than that see every hit."""
    statuses = []
    for _ in range(LIMIT + 1):
        statuses.append(client.get("/events", headers=headers or {}).status_code)
        time.sleep(0.02)
    return statuses


def test_per_ip_limits_count_real_clients_behind_nginx(spawn_server, tmp_path):
    env = {"BILTEN_TRUSTED_PROXIES": "127.0.0.1", "BILTEN_LIMIT_API_IP": f"{LIMIT}/60"}
    a, b = spawn_server(**env), spawn_server(**env)
    with nginx(tmp_path, [a.url, b.url]) as front:
        with client_from("127.0.0.2", front) as one, client_from("127.0.0.3", front) as two:
            # A forged X-Forwarded-For from an untrusted hop changes nothing: nginx appends the
            # address it saw, and the instances believe only that one.
            forged = {"X-Forwarded-For": "203.0.113.9"}
            assert used_up(one, forged) == [200] * LIMIT + [429]
            assert one.get("/events").status_code == 429  # the same client, whatever it says
            assert used_up(two) == [200] * LIMIT + [429]  # another client: a budget of its own
        # Straight to an instance, bypassing nginx: the peer is not a trusted proxy, so its
        # X-Forwarded-For is ignored and it is counted as itself.
        with client_from("127.0.0.4", a.url) as direct:
            assert used_up(direct, {"X-Forwarded-For": "127.0.0.9"}) == [200] * LIMIT + [429]
            assert (
                direct.get("/events", headers={"X-Forwarded-For": "127.0.0.8"}).status_code == 429
            )


def test_without_trusted_proxies_forwarded_headers_are_ignored(spawn_server):
    """Nobody is trusted by default, not even a client on the same host (uvicorn on its own
    would believe 127.0.0.1)."""
    server = spawn_server(BILTEN_LIMIT_API_IP=f"{LIMIT}/60")
    with client_from("127.0.0.1", server.url) as liar:
        statuses = [
            liar.get("/events", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code
            for n in range(LIMIT + 1)
        ]
    assert statuses == [200] * LIMIT + [429]
