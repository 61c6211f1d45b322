"""`orderpipe up` as a user runs it: starts, prints where things are, stops on Ctrl-C with no
orphans, and refuses a data folder left by an earlier embedded run."""

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

from services.runtime.brokers import free_port

pytestmark = pytest.mark.e2e


def _orderpipe(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "300"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)  # this test is about the embedded mode
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


def test_up_runs_until_ctrl_c_and_leaves_no_processes(tmp_path: Path):
    api_port = free_port()
    proc = _orderpipe("up", "--data-dir", str(tmp_path / "data"), "--api-port", str(api_port),
                      "--status-port", str(free_port()))
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "pipeline is running" in line:
                break
        output = "".join(lines)
        assert "pipeline is running" in output, output
        for shown in ("broker", "orders API", "order-status view", "SMTP sink", "data folder", "logs"):
            assert shown in output
        assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5).status_code == 200
        children = _descendants(proc.pid)
        assert len(children) >= 9, f"expected broker + 8 service processes, got {children}"
        printed = {int(p) for p in re.findall(r"\((\d+)\)", output)}
        assert printed <= children

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
        time.sleep(0.5)
        assert not [p for p in children if _alive(p)], "processes left running after Ctrl-C"
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
