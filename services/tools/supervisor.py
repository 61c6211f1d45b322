"""Run the pipeline's processes (relay, consumers, Faust worker, HTTP API) as child processes.

`orderpipe up` is one command in one terminal, so it must behave like one program:
- children never outlive it, even when it is SIGKILLed and gets no chance to clean up
  (`die_with_parent`, Linux's parent-death signal);
- a child that crashes is restarted with a short backoff, but one that keeps crashing is
  given up on and reported, instead of spinning forever and hiding the error;
- stopping is SIGTERM first (consumers commit their transaction and offsets, the relay
  flushes), SIGKILL only for a child that does not exit in time; a child the others depend on
  (the SMTP sink) is stopped after them, so the work they finish on SIGTERM still reaches it.
Each child's stdout and stderr go to `<log_dir>/<name>.log`, appended across restarts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# A child that ran this long before crashing was healthy: its crash counter starts over, so
# a service that fails once a day is not given up on after `max_restarts` days.
_STABLE_AFTER = 60.0


def die_with_parent() -> None:
    """`preexec_fn`: have the kernel SIGKILL this child when its parent dies (no-op off Linux).

    atexit handlers and `finally` blocks never run when the parent is SIGKILLed or crashes
    hard, so without this the broker and the workers would be orphaned, keep their ports and
    keep consuming. Caveat: the signal fires when the *thread* that forked exits, so spawn
    long-lived children from a long-lived thread (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # best effort: the atexit / stop_all paths still apply
    # The parent may have died between fork() and prctl(); then nobody will signal us.
    if os.getppid() == 1:
        os._exit(1)


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    restart: bool = True
    # Serves the other children (the SMTP sink): stopped once they have exited, so the mails
    # the e-mail service sends while it finishes its batch on SIGTERM still find it (stopped
    # with them, a mail cut off mid-send fails and goes out again after the next start).
    stop_last: bool = False


@dataclass
class _Child:
    spec: ProcessSpec
    proc: subprocess.Popen
    log: IO[bytes]
    started_at: float
    restarts: int = 0  # consecutive quick crashes
    restart_at: float | None = None  # when a crashed child is due to be started again
    dead: bool = False  # given up on (or restart=False and exited)
    exit_reported: bool = False  # exit already written to the log


class Supervisor:
    def __init__(self, log_dir: Path, *, max_restarts: int = 5) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.max_restarts = max_restarts
        self._children: dict[str, _Child] = {}
        self._stopping = False

    # -- starting ------------------------------------------------------------------------

    def start(self, spec: ProcessSpec) -> None:
        old = self._children.get(spec.name)
        if old is not None and old.proc.poll() is None:
            raise ValueError(f"process {spec.name!r} is already running (pid {old.proc.pid})")
        self._stopping = False
        self._children[spec.name] = self._spawn(spec)

    def _spawn(self, spec: ProcessSpec, restarts: int = 0) -> _Child:
        env = {**os.environ, **(spec.env or {})}
        # Python children would otherwise block-buffer into the log file, and the last lines
        # before a crash (the ones that explain it) would be lost.
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log_dir / f"{spec.name}.log", "ab", buffering=0)
        # Noted before the start, and nothing more until it exits (that note names its pid): a
        # note written while the child runs could land in the middle of one of its lines.
        self._note(log, f"starting: {' '.join(spec.argv)}")
        proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
            # Own session: Ctrl-C in the terminal reaches only the supervisor, which then
            # stops the children in order instead of all of them dying at once mid-batch.
            start_new_session=True,
        )
        return _Child(spec=spec, proc=proc, log=log, started_at=time.monotonic(), restarts=restarts)

    @staticmethod
    def _note(log: IO[bytes], text: str) -> None:
        stamp = datetime.now().isoformat(timespec="seconds")
        log.write(f"--- supervisor {stamp}: {text}\n".encode())

    # -- watching ------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Reap and restart crashed children; return the names of those that died for good.

        Non-blocking: a crashed child is restarted by a later call once its backoff
        (0.25 s, 0.5 s, 1 s, ... up to 5 s) has passed. The returned list is the current
        state, so it keeps naming a dead child on every call.
        """
        if self._stopping:
            return []
        now = time.monotonic()
        for name, child in list(self._children.items()):
            if child.dead:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if not child.exit_reported:
                child.exit_reported = True
                self._note(child.log, f"pid {child.proc.pid} exited with {_describe(code)}")
                if now - child.started_at >= _STABLE_AFTER:
                    child.restarts = 0
            if not child.spec.restart or child.restarts >= self.max_restarts:
                child.dead = True
                child.log.close()
                continue
            if child.restart_at is None:
                child.restart_at = now + min(0.25 * 2**child.restarts, 5.0)
            elif now >= child.restart_at:
                child.log.close()
                self._children[name] = self._spawn(child.spec, restarts=child.restarts + 1)
        return [name for name, child in self._children.items() if child.dead]

    def pids(self) -> dict[str, int]:
        """Pids of the children that are running now."""
        return {n: c.proc.pid for n, c in self._children.items() if c.proc.poll() is None}

    # -- signalling ----------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one child; `poll` treats the exit like a crash (used by crash tests)."""
        proc = self._children[name].proc
        if proc.poll() is None:
            proc.send_signal(sig)

    def restart(self, name: str, timeout: float = 10.0) -> None:
        """Stop one child (TERM, then KILL) and start it again with a fresh crash counter."""
        child = self._children[name]
        self._terminate([child], timeout)
        child.log.close()
        self._children[name] = self._spawn(child.spec)

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, wait up to `timeout`, SIGKILL the rest. Safe to call twice."""
        self._stopping = True  # poll() must not restart what we are stopping
        children = list(self._children.values())
        self._terminate([c for c in children if not c.spec.stop_last], timeout)
        self._terminate([c for c in children if c.spec.stop_last], timeout)
        for child in self._children.values():
            child.log.close()

    @staticmethod
    def _terminate(children: list[_Child], timeout: float) -> None:
        running = [c for c in children if c.proc.poll() is None]
        for c in running:
            c.proc.terminate()
        deadline = time.monotonic() + timeout
        for c in running:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()  # it ignored SIGTERM or hangs in shutdown
                c.proc.wait()
            if not c.log.closed:
                Supervisor._note(c.log, f"pid {c.proc.pid} stopped ({_describe(c.proc.returncode)})")

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
