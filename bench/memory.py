"""Resident memory of the pipeline's processes: sampled over the run, peak from the kernel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def proc_status_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS: now, VmHWM: peak), or None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples VmRSS of named processes every `interval` seconds in a background thread.

    `pids()` is called on every tick, so a restarted child (new pid) is followed by name and
    its restart is recorded."""

    def __init__(self, pids: Callable[[], dict[str, int]], interval: float = 1.0):
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.seen_pids: dict[str, set[int]] = {}
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def mark(self, name: str) -> None:
        """Remember when a phase started (seconds since the sampler started)."""
        self.marks[name] = time.monotonic() - self._t0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = time.monotonic() - self._t0
        for name, pid in self.pids().items():
            kb = proc_status_kb(pid, "VmRSS")
            if kb is not None:
                self.samples.setdefault(name, []).append((round(now, 2), round(kb / 1024, 1)))
                self.seen_pids.setdefault(name, set()).add(pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peaks(self) -> dict[str, float]:
        """VmHWM (peak RSS, MB) of each process running now."""
        out = {}
        for name, pid in self.pids().items():
            kb = proc_status_kb(pid, "VmHWM")
            if kb is not None:
                out[name] = round(kb / 1024, 1)
        return out


def growth(samples: list[tuple[float, float]], start: float, end: float) -> dict:
    """How RSS moved within [start, end]: the mean of the middle third vs the last third, and
    the least-squares slope over the second half (MB per minute). Warm-up (the first third) is
    left out: caches, pools and the interpreter fill up there and then stay."""
    window = [(t, mb) for t, mb in samples if start <= t <= end]
    if len(window) < 6:
        return {"samples": len(window)}
    third = len(window) // 3
    middle = [mb for _, mb in window[third:2 * third]]
    last = [mb for _, mb in window[2 * third:]]
    half = window[len(window) // 2:]
    n = len(half)
    mean_t = sum(t for t, _ in half) / n
    mean_m = sum(m for _, m in half) / n
    var = sum((t - mean_t) ** 2 for t, _ in half)
    slope = sum((t - mean_t) * (m - mean_m) for t, m in half) / var if var else 0.0
    mid_mean, last_mean = sum(middle) / len(middle), sum(last) / len(last)
    return {"samples": len(window), "middle_third_mb": round(mid_mean, 1), "last_third_mb": round(last_mean, 1),
            "growth_mb": round(last_mean - mid_mean, 1), "slope_mb_per_min": round(slope * 60, 2),
            "min_mb": min(mb for _, mb in window), "max_mb": max(mb for _, mb in window)}


def verdict(g: dict, seconds: float, name: str, broker: str = "embedded") -> str:
    """`broker`: the kind of local broker the run used. The embedded one (Tansu, memory storage)
    holds every message in its RSS, so it grows with the data by design; Apache Kafka keeps its
    log on disk (the page cache is not its RSS) and is judged like every other process."""
    if "growth_mb" not in g:
        return "n/a: too few samples"
    is_broker = name == "broker" or name.startswith("broker-")
    if is_broker and broker == "embedded":
        return "grows with data (in-memory broker, by design)"
    if seconds < 60:
        return "n/a: run < 60 s (use --soak 300)"
    bounded = g["growth_mb"] <= max(5.0, 0.05 * g["middle_third_mb"])
    if bounded:
        return "flat"
    grown = f"GROWING ({g['growth_mb']:+.1f} MB over the last third)"
    # A JVM takes its heap from the OS as it needs it, up to -Xmx, and keeps it.
    return f"{grown}; a JVM: RSS rises until the heap reaches -Xmx" if is_broker else grown


_TICKS = None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat), or None if gone."""
    global _TICKS
    import os

    if _TICKS is None:
        _TICKS = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: s for name, pid in pids.items() if (s := proc_cpu_seconds(pid)) is not None}
