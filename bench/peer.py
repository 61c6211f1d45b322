"""(g) The peer, section `bullmq`: BullMQ 5 workers on Redis, in the same run as orderpipe's
sections, so each orderpipe consumer figure can be given as a ratio to the matching BullMQ one.

The section starts its own Debian `redis-server` on 127.0.0.1 (a free port, no persistence, in a
temporary directory, stopped afterwards), installs `bench/bullmq/package.json` into
`bench/bullmq/node_modules` on first use (`npm ci`, versions pinned by its lockfile) and runs
`bench/bullmq/worker.mjs`, which measures two cases (see that file):
- `noop`: jobs whose processor does nothing, concurrency 50: BullMQ's own cost per job;
- `postgresql`: each job in one PostgreSQL transaction inserts a dedup row (job id, primary
  key, ON CONFLICT DO NOTHING) and an outbox row, concurrency 50, on a scratch database.

Jobs/s count from the first completion to the last, as orderpipe's consumer figures count from
the first batch; CPU is the Node process's, and Redis's CPU over the same window is stored as
the broker's (`broker_cpu_s`, `broker_us_per_msg`), as Tansu's or Kafka's is for orderpipe.

Without node, npm or redis-server, or when the npm install fails, the section is skipped with
the reason; without PostgreSQL only the no-op case runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import figure, scratch_postgres

HERE = Path(__file__).resolve().parent / "bullmq"
WORKER = HERE / "worker.mjs"
CONCURRENCY = 50
INSTALL_TIMEOUT_S = 600


class PeerUnavailable(Exception):
    """What the section needs is not there: the reason is reported as a skip."""


def plain_postgres_url(url: str) -> str:
    """SQLAlchemy's `postgresql+psycopg://...` as the plain `postgresql://...` node-postgres takes."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def missing_tools() -> str | None:
    missing = [tool for tool in ("node", "npm", "redis-server") if shutil.which(tool) is None]
    if not missing:
        return None
    hints = {"redis-server": "apt-get install redis-server", "node": "Node.js 18+", "npm": "npm"}
    return f"{', '.join(missing)} not found on PATH ({'; '.join(hints[m] for m in missing)})"


def _installed_version(name: str) -> str | None:
    try:
        return json.loads((HERE / "node_modules" / name / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_installed(log: Callable[[str], None]) -> None:
    """`npm ci` into bench/bullmq/node_modules unless the pinned versions are there already.
    Under a lock on package.json: `make test` runs its broker passes side by side, and a second
    `npm ci` would delete the node_modules the first one's worker is using."""
    with open(HERE / "package.json") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _install(log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _install(log: Callable[[str], None]) -> None:
    wanted = json.loads((HERE / "package.json").read_text())["dependencies"]
    if all(_installed_version(name) == version for name, version in wanted.items()):
        return
    lock = (HERE / "package-lock.json").exists()
    command = ["npm", "ci" if lock else "install", "--no-audit", "--no-fund", "--loglevel=error"]
    log(f"(g) installing the peer: {' '.join(command)} in {HERE} "
        f"({', '.join(f'{n} {v}' for n, v in wanted.items())})")
    try:
        done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"npm {command[1]} in {HERE} took over {INSTALL_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).split())[-300:]
        raise PeerUnavailable(f"npm {command[1]} in {HERE} failed (exit {done.returncode}): {tail}")
    wrong = {n: _installed_version(n) for n, v in wanted.items() if _installed_version(n) != v}
    if wrong:
        raise PeerUnavailable(f"npm {command[1]} left other versions than package.json pins: {wrong}")


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(workdir: Path, attempts: int = 3) -> Iterator[tuple[int, int]]:
    """A redis-server of our own on 127.0.0.1, free port, no persistence, `workdir` as its
    directory; yields (port, pid) and stops it (SIGTERM, then SIGKILL) afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "redis.log"
    for _ in range(attempts):  # a free port can be taken between the probe and the bind
        port = _free_port()
        proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(log_file), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline and not _ping(port):
            time.sleep(0.05)
        if proc.poll() is None and _ping(port):
            break
        _stop(proc)
    else:
        tail = log_file.read_text()[-300:] if log_file.exists() else ""
        raise PeerUnavailable(f"redis-server did not start on 127.0.0.1: {' '.join(tail.split())}")
    try:
        yield port, proc.pid
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _figures(raw: dict) -> dict:
    """worker.mjs's numbers as the bench's figures (bench.common.figure), Redis as the broker."""
    p, a = raw["process"], raw["add"]
    extra = {k: raw[k] for k in ("duplicates", "dedup_rows", "outbox_rows") if k in raw}
    return {**figure(p["count"], p["seconds"], p["cpu_s"], p["redis_cpu_s"], concurrency=CONCURRENCY,
                     completed=p["completed"], **extra),
            "add": figure(a["count"], a["seconds"], a["cpu_s"], a["redis_cpu_s"])}


def run(jobs: int, pg_jobs: int, *, postgres_url: str | None, pg_problem: str | None, workdir: Path,
        pg_pool: int = 50, log: Callable[[str], None] = print, timeout: float = 600.0) -> dict:
    """The section's results: {"available": True, "versions", "settings", "noop", "postgresql"?,
    "postgresql_skipped"?} or {"available": False, "reason"}."""
    problem = missing_tools()
    if problem:
        return {"available": False, "reason": problem}
    try:
        ensure_installed(log)
        versions = {"redis": redis_version()}
        with redis_server(Path(tempfile.mkdtemp(prefix="redis-", dir=workdir))) as (port, pid):
            command = ["node", str(WORKER), "--redis-port", str(port), "--redis-pid", str(pid),
                       "--jobs", str(jobs), "--pg-jobs", str(pg_jobs), "--concurrency", str(CONCURRENCY),
                       "--pg-pool", str(pg_pool), "--clk-tck", str(os.sysconf("SC_CLK_TCK")),
                       "--timeout", str(int(timeout))]
            cases = f"{jobs:,} no-op jobs" + ("" if pg_problem else f", then {pg_jobs:,} PostgreSQL jobs")
            log(f"(g) BullMQ on redis-server {versions['redis']} at 127.0.0.1:{port}: {cases}, "
                f"concurrency {CONCURRENCY}")
            if pg_problem or not postgres_url:
                raw = _worker(command, timeout)
            else:
                with scratch_postgres(postgres_url, "bullmq") as url:
                    raw = _worker([*command, "--pg-url", plain_postgres_url(url)], timeout)
    except PeerUnavailable as exc:
        return {"available": False, "reason": str(exc)}
    out = {"available": True, "versions": {**raw["versions"], **versions},
           "settings": {**raw["settings"], "redis": f"127.0.0.1:{port}, --save '' --appendonly no"},
           "noop": _figures(raw["noop"])}
    if "postgresql" in raw:
        out["postgresql"] = _figures(raw["postgresql"])
    else:
        out["postgresql_skipped"] = f"PostgreSQL not reachable ({pg_problem})" if pg_problem else "no PostgreSQL URL"
    return out


def _worker(command: list[str], timeout: float) -> dict:
    """Runs worker.mjs; its one JSON line, or PeerUnavailable with what went wrong."""
    try:
        done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=2 * timeout + 60)
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"worker.mjs did not finish within {2 * timeout + 60:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        raw = json.loads(lines[-1])
    except (IndexError, ValueError):
        raw = {"error": " ".join((done.stderr or done.stdout or f"exit {done.returncode}").split())[-500:]}
    if done.returncode != 0 or "error" in raw:
        raise PeerUnavailable(f"worker.mjs failed: {' '.join(str(raw.get('error')).split())[:500]}")
    return raw
