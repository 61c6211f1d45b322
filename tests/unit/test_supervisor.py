"""The supervisor restarts crashes, stops everything, and leaves no orphans.

Nothing here depends on how fast the machine is: tests wait for conditions with generous
deadlines, and what the supervisor did (which signal stopped a child, how long it let one wait)
is read from its logs and its calls, not from how long a stop took."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.tools.supervisor import ProcessSpec, Supervisor

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0) but is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def _until(check, timeout: float = 30.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(step)
    return check()


def test_crashed_child_is_restarted(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        sup.start(ProcessSpec("worker", SLEEPER))
        first = sup.pids()["worker"]
        sup.kill("worker")
        restarted = _until(lambda: sup.poll() == [] and sup.pids().get("worker", first) != first)
        assert restarted, "crashed child was not restarted"
        assert _alive(sup.pids()["worker"])
    log = (tmp_path / "worker.log").read_text()
    assert "signal SIGKILL" in log and log.count("--- supervisor") == 4  # started, killed, started again, stopped


def test_child_that_keeps_crashing_dies_for_good(tmp_path: Path) -> None:
    with Supervisor(tmp_path, max_restarts=2) as sup:
        sup.start(ProcessSpec("flaky", [sys.executable, "-c", "print('bo' + 'om'); raise SystemExit(3)"]))
        sup.start(ProcessSpec("oneshot", [sys.executable, "-c", "pass"], restart=False))
        assert _until(lambda: sup.poll() == ["flaky", "oneshot"])
    log = (tmp_path / "flaky.log").read_text()
    assert log.count("\nboom\n") == 3 and "exit code 3" in log  # first run + 2 restarts


def test_child_env_is_merged_over_ours(tmp_path: Path) -> None:
    code = "import os; print(os.environ['ORDERPIPE_X'], 'PATH' in os.environ)"
    with Supervisor(tmp_path) as sup:
        sup.start(ProcessSpec("env", [sys.executable, "-c", code], env={"ORDERPIPE_X": "42"}, restart=False))
        assert _until(lambda: sup.poll() == ["env"])
    assert "\n42 True\n" in (tmp_path / "env.log").read_text()


def test_stop_all_terminates_everything(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    for name in ("a", "b", "c"):
        sup.start(ProcessSpec(name, SLEEPER))
    pids = sup.pids()
    assert len(pids) == 3
    sup.stop_all(timeout=30)
    for name in ("a", "b", "c"):
        log = (tmp_path / f"{name}.log").read_text()
        assert f"pid {pids[name]} stopped (signal SIGTERM)" in log, "SIGTERM should have been enough"
        assert "SIGKILL" not in log
    assert not any(_alive(pid) for pid in pids.values())
    assert sup.pids() == {} and sup.poll() == []  # stopped children are not restarted
    sup.stop_all()  # idempotent


def test_child_ignoring_sigterm_is_killed_after_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, str, float | None]] = []  # (pid, method, wait timeout): what was done to children

    def recording(name: str):
        original = getattr(subprocess.Popen, name)

        def method(self, *args, **kwargs):
            timeout = (args[0] if args else kwargs.get("timeout")) if name == "wait" else None
            calls.append((self.pid, name, timeout))
            return original(self, *args, **kwargs)

        return method

    for name in ("terminate", "wait", "kill"):
        monkeypatch.setattr(subprocess.Popen, name, recording(name))
    stubborn = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('rea' + 'dy', flush=True)\n"
        "time.sleep(60)\n"
    )
    with Supervisor(tmp_path) as sup:
        sup.start(ProcessSpec("stubborn", [sys.executable, "-c", stubborn]))
        pid = sup.pids()["stubborn"]
        # SIGTERM before the handler is installed would kill it the normal way.
        assert _until(lambda: "\nready\n" in (tmp_path / "stubborn.log").read_text())
        started = time.monotonic()
        sup.stop_all(timeout=0.5)
        elapsed = time.monotonic() - started
    # SIGTERM, a wait of at most the timeout, SIGKILL, reaped: its whole timeout and no more
    done = [(method, timeout) for p, method, timeout in calls if p == pid]
    assert [method for method, _ in done] == ["terminate", "wait", "kill", "wait"], done
    assert done[1][1] is not None and done[1][1] <= 0.5 and done[3][1] is None, done
    assert elapsed >= 0.5
    assert not _alive(pid)
    assert "signal SIGKILL" in (tmp_path / "stubborn.log").read_text()


def test_a_child_the_others_depend_on_is_stopped_after_them(tmp_path: Path) -> None:
    """The SMTP sink (stop_last) gets its SIGTERM only once the services have exited: a service
    that takes its time to finish on SIGTERM still finds it running."""
    journal = tmp_path / "journal"

    def stops_writing(word: str, delay: float) -> list[str]:
        code = (
            "import signal, sys, time\n"
            "def stop(*_):\n"
            f"    time.sleep({delay})\n"
            f"    open({str(journal)!r}, 'a').write({word!r} + '\\n')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('rea' + 'dy', flush=True)\n"
            "time.sleep(60)\n"
        )
        return [sys.executable, "-c", code]

    with Supervisor(tmp_path) as sup:
        sup.start(ProcessSpec("sink", stops_writing("sink", 0.0), stop_last=True))
        sup.start(ProcessSpec("service", stops_writing("service", 0.3)))
        assert _until(lambda: all("\nready\n" in (tmp_path / f"{n}.log").read_text() for n in ("sink", "service")))
        sup.stop_all(timeout=30)  # each finishes on SIGTERM by itself, however busy the machine
    assert journal.read_text().split() == ["service", "sink"]


def test_restart_replaces_the_child(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        sup.start(ProcessSpec("api", SLEEPER))
        old = sup.pids()["api"]
        sup.restart("api")
        new = sup.pids()["api"]
        assert new != old and not _alive(old) and _alive(new)


def test_children_die_when_supervisor_is_sigkilled(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from services.tools.supervisor import ProcessSpec, Supervisor\n"
        f"sup = Supervisor(Path({str(tmp_path)!r}))\n"
        "for n in ('x', 'y'):\n"
        "    sup.start(ProcessSpec(n, [sys.executable, '-c', 'import time; time.sleep(60)']))\n"
        "print(' '.join(str(p) for p in sup.pids().values()), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        assert _until(lambda: not any(_alive(p) for p in pids)), f"orphans left: {pids}"
    finally:
        parent.kill()
        parent.wait()
