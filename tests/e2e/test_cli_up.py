"""`orderpipe up` as a user runs it: starts, prints where things are, stops on Ctrl-C with no
orphans (the broker's JVMs included), refuses a data folder left by an earlier embedded run,
and on the local Apache Kafka continues after a restart where it left off."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from services.pipeline.demo import sample_orders
from services.invoice.tables import invoices
from services.tools.brokers import free_port

pytestmark = pytest.mark.e2e


def _orderpipe(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "300", **(env or {})}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)  # about the local brokers `up` starts itself
    return subprocess.Popen([sys.executable, "-m", "services.cli.main", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _start_up(data: Path, broker: str, api_port: int) -> tuple[subprocess.Popen, str]:
    """`orderpipe up` until it says it is running; its output so far."""
    proc = _orderpipe("up", "--broker", broker, "--data-dir", str(data), "--api-port", str(api_port),
                      "--status-port", str(free_port()), "--console-port", str(free_port()))
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "pipeline is running" in line:
            break
    return proc, "".join(lines)


def _ctrl_c(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    return rest


def test_up_runs_until_ctrl_c_and_leaves_no_processes(tmp_path: Path, stack_broker: str):
    api_port = free_port()
    proc, output = _start_up(tmp_path / "data", stack_broker, api_port)
    try:
        assert "pipeline is running" in output, output
        for shown in ("broker", "orders API", "order-status view", "ops console", "SMTP sink", "data folder", "logs"):
            assert shown in output
        assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=30).status_code == 200
        # the console `up` printed, with the operator it made for this run
        console_url = re.search(r"ops console\s*│\s*(http://127\.0\.0\.1:\d+)", output)[1]
        password = re.search(r"admin, password (\S+) ", output)[1]
        with httpx.Client(base_url=console_url, timeout=30) as browser:
            assert browser.post("/login", data={"name": "admin", "password": password}).status_code == 303
            overview = browser.get("/")
            assert overview.status_code == 200 and "Lag per group" in overview.text and "admin (operator)" in overview.text
        children = _descendants(proc.pid)
        assert len(children) >= 9, f"expected broker + 8 service processes, got {children}"
        printed = {int(p) for p in re.findall(r"\((\d+)\)", output)}
        assert printed <= children

        _ctrl_c(proc)
        deadline = time.monotonic() + 60  # reaped by now; a zombie or two may still be collected
        while [p for p in children if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if _alive(p)], "processes left running after Ctrl-C"
        # each service finished on SIGTERM by itself (committing its batch), none was cut short
        logs = tmp_path / "data" / "logs"
        for name in ("orders-api", "orders-relay", "inventory", "email", "invoice", "analytics", "order-status",
                     "ops-console", "smtp-sink"):
            stops = re.findall(r"stopped \((.+?)\)", (logs / f"{name}.log").read_text())
            assert stops == ["exit code 0"], f"{name}: {stops}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_refuses_databases_from_an_earlier_embedded_run(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "orders.db").write_bytes(b"")  # what an earlier run leaves behind
    (data / "cluster.json").write_text('{"cluster_id": "an-old-broker", "embedded": true}')
    proc = _orderpipe("up", "--data-dir", str(data), "--api-port", str(free_port()))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "--fresh" in out and "in memory" in out
    assert "Traceback" not in out
    assert (data / "orders.db").exists(), "nothing is deleted without --fresh"


def test_up_on_kafka_continues_after_a_restart_with_orders_in_flight(tmp_path: Path, apache_kafka_only):
    """Stopped with orders accepted and not yet finished, `up --broker kafka` started again on
    the same data folder finishes them: nothing lost, nothing done twice."""
    data, api_port = tmp_path / "data", free_port()
    samples = sample_orders(60, seed=3)
    proc, output = _start_up(data, "kafka", api_port)
    placed: dict[str, str] = {}  # order id -> expected final state
    try:
        assert "pipeline is running" in output, output
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
            for sample in samples:
                response = client.post("/orders", json=sample.body)
                assert response.status_code == 202, response.text
                placed[response.json()["order_id"]] = sample.expected
        _ctrl_c(proc)  # at once: most orders are still on their way
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    unfinished = _count_invoices(data) < sum(1 for e in placed.values() if e == "COMPLETED")
    assert unfinished, "the stop came after every order had finished: the restart proves nothing"

    proc, output = _start_up(data, "kafka", api_port)
    try:
        assert "pipeline is running" in output, output
        assert "--fresh" not in output
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
            deadline = time.monotonic() + 300
            states: dict[str, str] = {}
            while time.monotonic() < deadline:
                states = {oid: client.get(f"/orders/{oid}").json()["state"] for oid in placed}
                if states == placed:
                    break
                time.sleep(0.5)
            assert states == placed
        # each effect once: one invoice per completed order, one mail per order
        assert _count_invoices(data) == sum(1 for e in placed.values() if e == "COMPLETED")
        mails = [p.read_text(errors="replace") for p in (data / "maildir").glob("*.eml")]
        ids = re.findall(r"^Message-ID: (\S+)", "\n".join(mails), flags=re.MULTILINE | re.IGNORECASE)
        # A graceful stop resends nothing: the e-mail worker finishes its batch on SIGTERM while
        # the SMTP sink, stopped after it, still answers (only a kill between send and commit
        # may resend, with the same Message-ID).
        assert len(ids) == len(set(ids)) == len(placed), "one mail per order"
        assert "signal SIGKILL" not in (data / "logs" / "email.log").read_text()
        _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _count_invoices(data: Path) -> int:
    engine = create_engine(f"sqlite:///{data / 'invoice.db'}")
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(invoices)).scalar_one()
    finally:
        engine.dispose()


def test_up_on_kafka_without_java_says_what_is_missing(tmp_path: Path):
    """No Java 17 on PATH: one line that says so, no traceback, nothing started."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    proc = _orderpipe("up", "--broker", "kafka", "--data-dir", str(tmp_path / "data"),
                      env={"PATH": str(bare), "ORDERPIPE_CACHE_DIR": str(tmp_path / "cache")})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "Java 17" in out and "Traceback" not in out
