"""(d) End to end: the whole pipeline as `orderpipe up --broker KIND` starts it
(services/pipeline/stack.py), on a fresh local broker of the run's kind (embedded Tansu or Apache Kafka).

Orders are POSTed to the orders API; an order is COMPLETED when the order-status worker
publishes its COMPLETED status to `orders.status`. Latency = the broker timestamp of that
status message (its producer's create time) minus the moment the client sent the POST.

Phases on one running stack, after a warm-up:
1. capacity: orders posted as fast as the API takes them (N requests in flight), then the
   completion rate: orders COMPLETED per second, first POST to last COMPLETED; and each
   process's CPU time per completed order (where the time goes);
2. latency: the fixed offered load of the target (open loop: request i is sent at
   start + i/rate, whether or not earlier ones have been answered), then p50/p95/p99
   placed-to-COMPLETED. Above the capacity measured in 1 this measures the backlog;
3. sustainable: when the fixed load is above half the capacity, the same at half the
   capacity: the latency while the pipeline keeps up. This phase (or 2, when 3 is not
   needed) is the one `--soak S` stretches and the memory check judges.
Every process's RSS is sampled throughout and its peak (VmHWM) read at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.common import CODEC, broker_pids, sample_http_order
from bench.memory import RssSampler, cpu_snapshot, growth, verdict
from services.runtime.settings import Settings
from services.runtime.topology import DEFAULT_PARTITIONS, ORDERS_STATUS

FINAL = ("COMPLETED", "FAILED")


class StatusWatcher:
    """Reads orders.status from the beginning and remembers, per order, the broker timestamp
    (seconds) of its first final status."""

    def __init__(self, bootstrap: str):
        self.final: dict[str, tuple[str, float]] = {}
        self.messages = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-status-{uuid.uuid4().hex[:6]}",
                                   "enable.auto.commit": False, "isolation.level": "read_committed"})
        self._consumer.assign([TopicPartition(ORDERS_STATUS, p, OFFSET_BEGINNING) for p in range(DEFAULT_PARTITIONS)])
        self._thread = threading.Thread(target=self._run, name="status-watcher", daemon=True)

    def start(self) -> StatusWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for msg in self._consumer.consume(500, 0.2):
                    if msg.error():
                        continue
                    self.messages += 1
                    record = CODEC.decode(msg.value()).record
                    if record["state"] in FINAL:
                        with self._lock:
                            self.final.setdefault(record["order_id"], (record["state"], msg.timestamp()[1] / 1000))
        finally:
            self._consumer.close()

    def wait_for(self, order_ids, timeout: float) -> int:
        """Wait until every order is final; returns how many are still not final."""
        ids = list(order_ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                missing = sum(1 for o in ids if o not in self.final)
            if not missing:
                return 0
            time.sleep(0.2)
        with self._lock:
            return sum(1 for o in ids if o not in self.final)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


async def _post(client: httpx.AsyncClient, body: dict, sent: dict, answered: dict, errors: list,
                scheduled: float | None = None) -> None:
    t = time.time() if scheduled is None else scheduled
    try:
        r = await client.post("/orders", json=body)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        errors.append(repr(exc))
        return
    order_id = r.json()["order_id"]
    sent[order_id] = t
    answered[order_id] = time.time()


IN_FLIGHT = 64  # open-loop requests beyond this wait in our own queue, not in httpx's pool


async def offered_load(api_url: str, rate: float, seconds: float, rng: random.Random) -> tuple[dict, dict, list]:
    """Open loop: request i is due at start + i/rate and its latency counts from then, whether
    it could be sent at once or waited for a free connection (no coordinated omission).

    At most IN_FLIGHT requests are handed to httpx at a time: its connection pool scans every
    queued request on each event, so thousands queued there (an offered load above capacity)
    made the load generator itself burn a core and starve the pipeline it measures."""
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    errors: list[str] = []
    total = max(1, int(rate * seconds))
    bodies = [sample_http_order(rng) for _ in range(total)]
    slots = asyncio.Semaphore(IN_FLIGHT)
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=limits) as client:
        async def one(body: dict, due: float) -> None:
            async with slots:
                await _post(client, body, sent, answered, errors, scheduled=due)

        start, wall_start = time.perf_counter(), time.time()
        tasks = []
        for i, body in enumerate(bodies):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, wall_start + i / rate)))
        await asyncio.gather(*tasks)
    return sent, answered, errors


async def as_fast_as_possible(api_url: str, count: int, concurrency: int, rng: random.Random):
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    errors: list[str] = []
    bodies = [sample_http_order(rng) for _ in range(count)]
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=limits) as client:
        async def worker():
            while not queue.empty():
                await _post(client, queue.get_nowait(), sent, answered, errors)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent, answered, errors


def start_py_spy(pids: dict[str, int], out_dir: Path) -> dict[str, tuple[subprocess.Popen, Path]]:
    """py-spy on every Python process of the stack (not the broker), non-blocking, 50 Hz, only
    samples holding the GIL: where the Python CPU time goes, idle waits left out."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return {}
    spies = {}
    for name, pid in pids.items():
        if name == "broker" or name.startswith("broker-"):
            continue
        path = out_dir / f"py-spy-{name}.txt"
        proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "50", "--nonblocking", "--gil",
                                 "--format", "raw", "-o", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spies[name] = (proc, path)
    return spies


def stop_py_spy(spies) -> dict[str, dict]:
    """Stop the samplers; per process, the functions with the most samples (self and total)."""
    out = {}
    for name, (proc, path) in spies.items():
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for name, (proc, path) in spies.items():
        if path.exists():
            out[name] = {"file": str(path), **summarize_collapsed(path.read_text())}
    return out


def summarize_collapsed(text: str, top: int = 12) -> dict:
    """Collapsed stacks ("frame;frame;frame count") to the top frames by self and total samples."""
    self_count: dict[str, int] = {}
    total_count: dict[str, int] = {}
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        if frames[0].startswith("thread") or frames[0].startswith("process"):
            frames = frames[1:]
        if frames:
            self_count[frames[-1]] = self_count.get(frames[-1], 0) + n
        for f in set(frames):
            total_count[f] = total_count.get(f, 0) + n

    def best(d):
        return [[f, round(c / samples, 3)] for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]] if samples else []

    return {"samples": samples, "top_self": best(self_count), "top_total": best(total_count)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


BENCH = "bench (load generator)"


WARM_UP_NOTE = {"embedded": "group joins take a few seconds on Tansu",
                "kafka": "the first group joins; a fresh JVM compiles its request path meanwhile"}


def latency_per_minute(sent: dict[str, float], final: dict[str, tuple], t0: float) -> list[dict]:
    """p50 and p99 placed-to-final of the orders due in each minute of a phase (by due time)."""
    minutes: dict[int, list[float]] = {}
    for order_id, due in sent.items():
        if order_id in final:
            minutes.setdefault(int((due - t0) // 60), []).append(final[order_id][1] - due)
    return [{"minute": m + 1, "orders": len(lat), "p50_s": round(percentile(lat, 0.50), 4),
             "p99_s": round(percentile(lat, 0.99), 4)} for m, lat in sorted(minutes.items())]


def run(sizes, workdir: Path, soak: float | None = None, log=print, profile_dir: Path | None = None,
        broker: str = "embedded") -> dict:
    """`broker`: the kind of local broker the stack starts ("embedded" or "kafka"), as
    `orderpipe up --broker`; KAFKA_BOOTSTRAP_SERVERS is ignored, so the whole run is on one kind."""
    from services.pipeline.stack import Stack

    rng = random.Random(23)
    stack = Stack(Settings(KAFKA_BOOTSTRAP_SERVERS=None), data_dir=workdir / "e2e", broker=broker, fresh=True,
                  progress=log)
    info = stack.start(timeout=120)

    def pids(with_bench: bool = False) -> dict[str, int]:
        found = dict(stack.supervisor.pids()) if stack.supervisor else {}
        found.update(broker_pids(stack.broker))  # Tansu, or the Kafka node's JVM: counted like any process
        if with_bench:  # CPU accounting only: the load generator shares the machine
            found[BENCH] = os.getpid()
        return found

    sampler = RssSampler(pids, interval=1.0).start()
    watcher = StatusWatcher(info.bootstrap_servers).start()
    result: dict = {"broker": info.broker, "processes": sorted(pids())}
    try:
        # Warm-up: every consumer group has joined and every process has seen traffic.
        log(f"e2e: warming up ({WARM_UP_NOTE.get(info.broker, 'first group joins')})")
        sent, _, errors = asyncio.run(offered_load(info.api_url, 20, 1.0, rng))
        if errors or watcher.wait_for(sent, 180):
            raise RuntimeError(f"e2e warm-up did not complete: {errors[:3]}; see {info.log_dir}")

        log(f"e2e: capacity phase, {sizes.e2e_capacity_orders} orders, {sizes.e2e_concurrency} in flight")
        sampler.mark("capacity_start")
        cpu_before = cpu_snapshot(pids(with_bench=True))
        spies = start_py_spy(pids(), profile_dir) if profile_dir else {}
        sent, answered, errors = asyncio.run(
            as_fast_as_possible(info.api_url, sizes.e2e_capacity_orders, sizes.e2e_concurrency, rng))
        incomplete = watcher.wait_for(sent, 600)
        sampler.mark("capacity_end")
        cpu_after = cpu_snapshot(pids(with_bench=True))
        if spies:
            result["py_spy"] = stop_py_spy(spies)
        first_post = min(sent.values())
        done_at = sorted(watcher.final[o][1] for o in sent if o in watcher.final)
        n = len(done_at)
        # From the first POST to the last COMPLETED: a window inside the run (say the middle 80%
        # of completions) overstates it, because completions come in bursts (a consumer that
        # fell behind folds its backlog at once), so the middle can span a short burst.
        whole = n / (done_at[-1] - first_post) if n else 0.0
        capacity = {
            "orders": len(sent), "concurrency": sizes.e2e_concurrency, "post_errors": len(errors),
            "incomplete": incomplete,
            "post_per_s": round(len(sent) / (max(answered.values()) - first_post), 1),
            "completed_per_s": round(whole, 1),
            "sustained_per_s": round(whole, 1),
            "seconds": round(done_at[-1] - first_post, 2) if n else 0.0,
        }
        # Where the CPU goes: CPU milliseconds per completed order, per process, in this phase.
        cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_after if name in cpu_before}
        capacity["cpu_ms_per_order"] = {
            name: round(1000 * sec / max(n, 1), 2) for name, sec in sorted(cpu.items(), key=lambda kv: -kv[1])}
        capacity["cpu_ms_per_order_total"] = round(
            1000 * sum(v for k, v in cpu.items() if k != BENCH) / max(n, 1), 2)
        capacity["cpu_seconds_available"] = round((os.cpu_count() or 1) * capacity["seconds"], 1)
        result["capacity"] = capacity

        def latency_phase(name: str, rate: float, seconds: float) -> dict:
            log(f"e2e: {name} phase, {rate:g} orders/s offered for {seconds:g} s")
            sampler.mark(f"{name}_start")
            t0 = time.time()
            sent, answered, errors = asyncio.run(offered_load(info.api_url, rate, seconds, rng))
            post_seconds = time.time() - t0
            # an offered load above capacity leaves a backlog: wait for it to drain (bounded)
            drain = len(sent) / max(capacity["sustained_per_s"], 1.0)
            incomplete = watcher.wait_for(sent, min(900.0, 60 + 2 * drain))
            sampler.mark(f"{name}_end")
            lat = [watcher.final[o][1] - t for o, t in sent.items() if o in watcher.final]
            post_lat = [answered[o] - sent[o] for o in sent]
            phase = {
                "offered_per_s": round(rate, 1), "seconds": round(seconds, 1), "orders": len(sent),
                "achieved_post_per_s": round(len(sent) / post_seconds, 1) if post_seconds else 0.0,
                "post_errors": len(errors), "incomplete": incomplete,
                "overloaded": rate > capacity["sustained_per_s"],
                "failed": sum(1 for o in sent if watcher.final.get(o, ("",))[0] == "FAILED"),
                "p50_s": round(percentile(lat, 0.50), 4), "p95_s": round(percentile(lat, 0.95), 4),
                "p99_s": round(percentile(lat, 0.99), 4), "max_s": round(max(lat, default=0.0), 4),
                "post_p50_s": round(percentile(post_lat, 0.5), 4),
                "post_p99_s": round(percentile(post_lat, 0.99), 4),
            }
            if seconds >= 120:  # a soak: is the latency stable, or does it drift or come in bursts?
                phase["per_minute"] = latency_per_minute(sent, watcher.final, t0)
            return phase

        # The target's fixed load; above capacity its latencies measure the backlog, not the pipeline.
        result["latency"] = latency_phase("latency", sizes.e2e_rate, sizes.e2e_seconds if soak is None
                                          or sizes.e2e_rate > capacity["sustained_per_s"] / 2 else soak)
        memory_phase = "latency"
        sustainable = round(capacity["sustained_per_s"] / 2, 1)
        if sizes.e2e_rate > sustainable and sustainable >= 1:
            # Half the measured capacity: the latency the pipeline has when it keeps up, and the
            # load for the memory check (a backlog would grow queues and caches legitimately).
            result["latency_sustainable"] = latency_phase("sustainable", sustainable,
                                                          soak or sizes.e2e_sustainable_seconds)
            memory_phase = "sustainable"
        sampler.sample()
        peaks = sampler.peaks()
        sampler.stop()
        lo, hi = sampler.marks[f"{memory_phase}_start"], sampler.marks[f"{memory_phase}_end"]
        memory = {}
        for name, series in sampler.samples.items():
            g = growth(series, lo, hi)
            memory[name] = {"peak_rss_mb": peaks.get(name, max((mb for _, mb in series), default=0.0)),
                            "restarts": len(sampler.seen_pids.get(name, ())) - 1,
                            "latency_phase": g, "verdict": verdict(g, hi - lo, name, info.broker)}
        result["memory"] = {"per_process": memory, "marks": sampler.marks, "judged_phase": memory_phase,
                            "samples": {k: v for k, v in sampler.samples.items()}}
        result["status_messages"] = watcher.messages
        return result
    finally:
        sampler.stop()
        watcher.stop()
        stack.stop()
