"""The README's two commands, exactly as a newcomer types them.

Each test makes a fresh ``git clone`` of this repository (its committed tree plus what is not
committed yet, so that it tests the working tree) inside a private (0700) folder, under a path
with a space in it, and there runs ``make run`` (which builds ``.venv`` first) and ``make
test``, as root and as a plain user. ``make test`` is narrowed with ``PYTEST_ADDOPTS`` to a few
modules that start the embedded servers; the whole suite running inside itself would never end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.procs import command_line, descendants, still_alive

pytestmark = pytest.mark.slow

PLAIN_USER = "nobody"
RUNUSER = shutil.which("runuser")
INSTALL_TIMEOUT = 600  # a plain user has no pip cache: every wheel is downloaded
MOVED = r"/var/tmp/bilten-(?:pgdata|postgres)-[\w.-]+"
NESTED_TESTS = "tests/test_migrations.py tests/test_http_basics.py"


def test_the_readme_gives_exactly_these_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quick_start, re.S)
    assert block is not None
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]


def newcomer_env(home: Path, **extra: str) -> dict[str, str]:
    """A login environment: nothing of this test run's configuration leaks in."""
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


@contextlib.contextmanager
def private_clone(owner: str | None = None) -> Iterator[Path]:
    """A fresh clone in ``<0700 folder>/my projects/bilten``, owned by ``owner`` if given."""
    parent = Path(tempfile.mkdtemp(prefix="bilten-newcomer-"))  # mode 0700
    target = parent / "my projects" / "bilten"
    try:
        # What is not committed yet is part of what we test (git stash create touches nothing;
        # a local clone takes every object, this one too).
        work = subprocess.run(
            ["git", "stash", "create"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
        if work:
            subprocess.run(["git", "checkout", "--quiet", work], cwd=target, check=True)
        new = subprocess.run(  # and files not yet added (the stash leaves them out)
            ["git", "ls-files", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for name in filter(None, (n.decode() for n in new)):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
        if owner:
            subprocess.run(["chown", "-R", f"{owner}:", str(parent)], check=True)
        assert parent.stat().st_mode & 0o777 == 0o700
        yield target
    finally:
        # What root keeps outside the private folder: the cluster and the copied binaries.
        for log in parent.glob("*.log"):
            for moved in set(
                re.findall(r"/var/tmp/bilten-(?:pgdata|postgres)-[\w.-]+", log.read_text())
            ):
                shutil.rmtree(moved, ignore_errors=True)
        shutil.rmtree(parent, ignore_errors=True)


def as_user(user: str | None, argv: list[str]) -> list[str]:
    return [RUNUSER or "runuser", "-u", user, "--", *argv] if user else argv


def make_run(clone: Path, env: dict[str, str], user: str | None = None) -> None:
    """``make run``: ready within seconds once installed, and Ctrl-C leaves nothing behind."""
    port = free_port()
    log_path = clone.parent.parent / "make-run.log"
    with open(log_path, "wb") as log:
        # A session of its own, so that Ctrl-C can go to the whole group, as a terminal sends it.
        make = subprocess.Popen(
            as_user(user, ["make", "run"]),
            cwd=clone,
            env={**env, "BILTEN_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        installed = wait_for(
            lambda: (clone / ".venv" / ".installed").exists(), make, INSTALL_TIMEOUT
        )
        assert installed, log_path.read_text()[-3000:]
        began = time.monotonic()
        assert wait_for(lambda: ready(base), make, 60), log_path.read_text()[-3000:]
        print(f"make run: ready {time.monotonic() - began:.1f} s after the install")
        output = log_path.read_text()
        assert f"Bilten is ready at {base}" in output
        assert f"{base}/docs" in output
        assert str(clone / ".bilten") in output
        assert "Ctrl-C" in output
        assert httpx.get(base + "/docs", timeout=5).status_code == 200
        # The web app opens onto the demo event.
        page = httpx.get(base + "/", timeout=5)
        assert page.status_code == 200 and "/assets/" in page.text, page.text[:500]
        listed = httpx.get(base + "/events", timeout=5).json()["items"]
        assert [e["title"] for e in listed] == ["Bilten Demo Night"], listed
        running = descendants(make.pid)
        lines = [command_line(pid) for pid in running]
        assert any("bin/postgres" in line for line in lines), lines
        assert any("redis-server" in line for line in lines), lines

        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        make.wait(30)
        assert not still_alive(running), [command_line(pid) for pid in running]
        output = log_path.read_text()
        assert "Traceback" not in output, output[-3000:]
        assert '"level":"error"' not in output, output[-3000:]
        if os.geteuid() == 0 and user is None:  # root's private checkout: nobody runs copies
            assert "copied the PostgreSQL binaries" in output
            assert "keeping the cluster in /var/tmp/bilten-pgdata-" in output
    finally:
        if make.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(make.pid, signal.SIGKILL)
            make.wait()


def make_test(clone: Path, env: dict[str, str], user: str | None = None) -> None:
    """``make test`` on the embedded servers, narrowed to a few modules."""
    result = subprocess.run(
        as_user(user, ["make", "test"]),
        cwd=clone,
        env={**env, "PYTEST_ADDOPTS": f"-p no:cacheprovider {NESTED_TESTS}"},
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert re.search(r"\b\d+ passed\b", result.stdout), result.stdout[-2000:]


def wait_for(check, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if proc.poll() is not None:
            return check()
        time.sleep(0.1)
    return False


def ready(base: str) -> bool:
    try:
        return httpx.get(base + "/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(INSTALL_TIMEOUT * 2)
def test_make_run_and_make_test_from_a_fresh_clone_in_a_private_folder():
    with private_clone() as clone:
        env = newcomer_env(Path.home())  # the pip cache of whoever runs the suite
        make_run(clone, env)
        make_test(clone, env)


def plain_user_problem() -> str | None:
    """Why the plain-user test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to act as another user"
    if RUNUSER is None:
        return "runuser is not installed"
    # The plain user needs a Python 3.11+ of their own to reach: root's may sit in /root.
    probe = subprocess.run(
        as_user(
            PLAIN_USER, ["python3", "-c", "import sys, venv; assert sys.version_info >= (3, 11)"]
        ),
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
    )
    return None if probe.returncode == 0 else f"{PLAIN_USER} has no Python 3.11+ with venv"


PLAIN_USER_PROBLEM = plain_user_problem()


@pytest.mark.skipif(PLAIN_USER_PROBLEM is not None, reason=str(PLAIN_USER_PROBLEM))
@pytest.mark.timeout(INSTALL_TIMEOUT * 2)
def test_make_run_and_make_test_as_a_plain_user():
    with private_clone(owner=PLAIN_USER) as clone:
        env = newcomer_env(clone.parent.parent, PATH="/usr/local/bin:/usr/bin:/bin")
        make_run(clone, env, user=PLAIN_USER)
        make_test(clone, env, user=PLAIN_USER)
