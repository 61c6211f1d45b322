"""An order-status worker as a child process, and how long it takes to answer after a restart.

Used by the integration tests (two workers, kill and restart) and meant for the benchmark:

    report = measure_recovery(bootstrap, data_dir, store="memory://", expected_orders=100_000)
    print(report.ready_s, report.complete_s)
    report.worker.stop()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.tools.brokers import free_port
from services.tools.supervisor import die_with_parent

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """`python -m streams.order_status` as a child process that cannot outlive its parent."""

    def __init__(self, bootstrap: str, data_dir: Path, log_path: Path, *, store: str | None = None,
                 extra_args: Iterable[str] = (), port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.store = store
        self.log_path = log_path
        self._log = open(log_path, "ab")
        args = [sys.executable, "-m", "streams.order_status", "--bootstrap-servers", bootstrap,
                "--data-dir", str(data_dir), "--web-port", str(self.port), "--loglevel", "info", *extra_args]
        if store:
            args += ["--store", store]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent,
        )

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no leaving the group; what a crash looks like."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The last lines, after the first ERROR or CRITICAL line and the few after it: when the
        worker crashed, the last lines are Faust's shutdown, the first error is the cause."""
        text = self.log_path.read_text(errors="replace").splitlines()
        first = next((i for i, line in enumerate(text) if "] [ERROR] " in line or "] [CRITICAL] " in line), None)
        cause = text[first:first + 30] if first is not None and first < len(text) - lines else []
        return "\n".join([*cause, *(["[...]"] if cause else []), *text[-lines:]])

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until the worker has its partitions and its table restored; seconds since spawn."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    r = http.get("/ready")
                    if r.status_code == 200:
                        return time.monotonic() - self.started
                    last = r.text[:200]
                except httpx.TransportError as exc:
                    last = repr(exc)
                time.sleep(0.2)
        raise TimeoutError(f"worker at {self.url} not ready within {timeout:g}s ({last})\n{self.log_tail()}")


@dataclass
class RecoveryReport:
    store: str
    ready_s: float  # spawn -> partitions assigned and the table restored from its changelog (/ready)
    complete_s: float  # spawn -> the view counts every expected order and answers every probe
    orders: int  # the orders the view counts, cluster-wide
    worker: WorkerProcess  # still running: the caller stops it


def measure_recovery(bootstrap: str, data_dir: Path, *, store: str | None = None, expected_orders: int = 0,
                     probe: Iterable[str] = (), timeout: float = 600.0, log_path: Path | None = None,
                     extra_args: Iterable[str] = ()) -> RecoveryReport:
    """Start a worker on `data_dir` (a RocksDB store left by a killed worker, or nothing for
    memory://) and time how long until it answers as before: until it is ready, counts at least
    `expected_orders` orders and answers every order id in `probe`. Raises TimeoutError otherwise."""
    worker = WorkerProcess(bootstrap, data_dir, log_path or data_dir.with_suffix(".log"), store=store,
                           extra_args=extra_args)
    deadline = time.monotonic() + timeout
    try:
        ready_s = worker.wait_ready(timeout)
        pending = list(probe)
        count = -1
        with httpx.Client(base_url=worker.url, timeout=30.0) as http:
            while time.monotonic() < deadline:
                if count < expected_orders:
                    r = http.get("/status/", params={"limit": 0})
                    count = r.json()["count"] if r.status_code == 200 else -1
                pending = [o for o in pending if http.get(f"/status/{o}/").status_code != 200]
                if count >= expected_orders and not pending:
                    return RecoveryReport(store or "default", ready_s, time.monotonic() - worker.started, count, worker)
                time.sleep(0.2)
        raise TimeoutError(f"after {timeout:g}s the view counts {count} of {expected_orders} orders; "
                           f"{len(pending)} probes unanswered\n{worker.log_tail()}")
    except BaseException:
        worker.stop()
        raise
