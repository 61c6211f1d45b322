"""Faust's Kafka transport with six fixes that table recovery, commits, consumption and a steady
group depend on, and one for latency.

1. Changelog end offsets checked against a fetch.

Faust restores a table by reading its changelog up to the "highwater" it gets from ListOffsets
(latest). The embedded broker (Tansu) answers that with the last *batch's* base offset + 1
instead of the last offset + 1, so a restore stops at the first record of the last batch and
the rest of that batch is never applied: a memory:// worker restarted on a changelog whose
last batch held 20 records came back with 19 orders in an older state (reproduced in
tests/integration/test_order_status_stream.py).

A Fetch response carries the partition's high watermark too, and there it is right. So every
end offset Faust asks for is also read from one small fetch of the partition's last batch, and
the larger of the two is used. On Apache Kafka both agree and the fetch only costs a round
trip per recovery. Nothing here depends on Tansu: it is plain Kafka protocol.

2. A producer flush that really flushes the table's writes.
A table write (`table[key] = value`) queues its changelog record in Faust's ProducerBuffer,
and the consumer commits input offsets after `producer.flush()`. But the buffer's flush
returns as soon as one queued record takes more than 0.1 s to be handed to aiokafka, so under
load offsets were committed for inputs whose changelog records were still queued; a SIGKILL
then lost those records for good (the inputs are never read again): a memory:// worker came
back with orders stuck half-way, a RocksDB one with a changelog missing what its store holds.
`DrainingBuffer.flush` waits until the queue is empty and nothing is between queue and aiokafka.

3. Stream buffers kept when the flow is resumed but was never suspended.
`app.flow_control.resume()` empties every stream buffer: meant for messages fetched before a
rebalance, which the seek to the committed offsets reads again. But after a restore, Faust
resumes the flow for the changelog, then resumes the input partitions while the fetcher runs,
seeks them to their committed offsets and only then calls `resume()` again. Messages fetched in
between sit in the buffers with Faust's read offsets already past them, so that `resume()`
dropped them for good; the next message was taken as the end of a gap and the commit moved
past the dropped ones (a restarted worker lost a few events per partition: orders stuck
PENDING). `KeepingFlowControl.resume` clears only when the flow was suspended; messages of an
older generation are still skipped by Faust's generation check.

4. A failed or overtaken offset commit not taken for a done one.
Faust records an offset as committed whether the commit succeeded or not, and after the commit
returns. A commit refused because the group rebalanced ("already rebalanced", seen when a
broker failure moves the group coordinator) therefore counted as done, and so did one whose
rebalance ran while it waited: the rebalance had seeked the partition back to the broker's
committed offset N, then the late bookkeeping said N+1, so Faust refused the ack of the
message at N read again (an ack below the committed offset is ignored) and that partition
stayed one behind until its next event (seen in the broker-failure e2e test). A commit counts
only when it succeeded in the generation it started in; a failed one is tried again at the
next commit while the generation lasts (a rebalance instead reads from the committed offset).

5. Records dropped while the assignment changes are read again, on every partition.
Faust hands its live set of active partitions to the consumer thread, which asks aiokafka for
the records of those partitions; a recovery mutating that set meanwhile (clear, then update)
can leave it empty, and aiokafka reads an empty set as "every partition". Records of the
paused input partitions came back, their positions moved past them, and Faust dropped them as
not active (it also drops a fetched batch when the flow stops in the middle of it). Faust's
answer to such drops is the seek to the committed offsets at the end of every recovery; but
aiokafka's `seek_to_committed` skips a partition with nothing committed yet, so on a partition
that new, the dropped records were never read again: a second worker joining during a burst
sat on its partitions without folding anything (test_two_workers_answer_every_order_from_
either_worker, under load), and a stock.rejected partition with nothing committed yet lost the
one rejection on it after a broker failure moved the group (the broker-failure e2e test). Now
the thread gets a snapshot of the set, and the seek puts a partition with no committed offset
back at its beginning (auto.offset.reset is "earliest" for this app), changelogs excepted:
Faust positions those itself.

6. A worker joins only once every topic it subscribes to can be read.
Faust creates its own topics as it starts (the table's changelog, the SLA topic, the assignor's
`<app id>-__assignor-__leader`) and joins its group at once. A busy Apache Kafka can take
seconds to elect the leader of a partition just created; the assignment then leaves that topic
out ("Ignoring missing topic"), and when the next metadata refresh sees it (within
`consumer_metadata_max_age_ms`, 10 s) the group rebalances: the view, ready moments before,
answered 503 "rebalancing" for a refresh (seen in the console and HTTP-contract e2e tests on
Apache Kafka). `orderpipe up` creates the first two beforehand, but not Faust's assignor topic,
and nothing does for a worker started by hand. `subscribe` now first waits, up to
`TOPICS_READY_TIMEOUT_S`, until the cluster's metadata gives every subscribed topic's partitions
a leader; past that it logs what is missing and joins anyway (the old behaviour).

Also (latency, not correctness): Faust creates its worker consumer with a hard-coded
`fetch_max_wait_ms=1500`. The embedded broker holds a fetch for that long even when data
arrives meanwhile, so every status update waited ~0.75 s on average. `install()` takes the
wait to use (`ORDERPIPE_FETCH_WAIT_MAX_MS`, as for the services' consumers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from faust.types.tuples import FutureMessage
from mode.utils.queues import FlowControlEvent

from services.runtime.crashpoints import crash_point

log = logging.getLogger("orderpipe.order_status")


async def fetched_end_offsets(bootstrap_servers: str, listed: Mapping[Any, int], timeout: float = 10.0,
                              **client_settings: Any) -> dict[Any, int]:
    """For each partition (anything with .topic and .partition) with a listed end offset > 0,
    the high watermark of a Fetch of its last batch, if larger; the listed offset otherwise.
    `client_settings` go to the AIOKafkaConsumer (security_protocol, ssl_context, sasl_*)."""
    result = dict(listed)
    wanted = {TopicPartition(tp.topic, tp.partition): tp for tp, end in listed.items() if end and end > 0}
    if not wanted:
        return result
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                **client_settings)
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        for tp, original in wanted.items():
            consumer.seek(tp, listed[original] - 1)  # inside the last batch, whichever broker
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Every fetch response sets the partition's high watermark, with or without records.
        while (pending := [tp for tp in wanted if consumer.highwater(tp) is None]) and loop.time() < deadline:
            await consumer.getmany(*pending, timeout_ms=500)
        if pending:
            raise TimeoutError(f"no fetch answer within {timeout:g}s for {', '.join(map(str, pending))}")
        for tp, original in wanted.items():
            watermark = consumer.highwater(tp)
            if watermark > result[original]:
                log.info("end offset of %s:%s is %s by fetch, %s by ListOffsets; using the fetch",
                         tp.topic, tp.partition, watermark, result[original])
                result[original] = watermark
    finally:
        await consumer.stop()
    return result


TOPICS_READY_TIMEOUT_S = 30.0


async def wait_until_topics_readable(client: Any, topics: Iterable[str], timeout: float = TOPICS_READY_TIMEOUT_S,
                                     interval: float = 0.2) -> set[str]:
    """Fix 6: wait until the cluster's metadata (`client`: an aiokafka client) names every topic
    with at least one partition, each with a leader; the topics still missing after `timeout`
    seconds (none: all readable)."""
    wanted = set(topics)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            cluster = await client.fetch_all_metadata()
        except KafkaError:  # no broker answered this time: a broker outage at start is retried as before
            missing = wanted
        else:
            missing = {t for t in wanted
                       if not cluster.partitions_for_topic(t)
                       or cluster.available_partitions_for_topic(t) != cluster.partitions_for_topic(t)}
        if not missing or loop.time() >= deadline:
            return missing
        await asyncio.sleep(interval)


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka hands this to its Fetcher when the consumer starts, which is after this.
        consumer._fetch_max_wait_ms = transport.fetch_max_wait_ms
        return consumer

    async def subscribe(self, topics: Iterable[str]) -> None:
        """Fix 6: join only once the subscribed topics have readable partitions."""
        topics = set(topics)
        missing = await self.call_thread(self._wait_until_topics_readable, topics)
        if missing:
            log.warning("joining although %s have no readable partitions after %gs: the group will "
                        "rebalance when they do", ", ".join(sorted(missing)), TOPICS_READY_TIMEOUT_S)
        await super().subscribe(topics)

    async def _wait_until_topics_readable(self, topics: set[str]) -> set[str]:
        return await wait_until_topics_readable(self._ensure_consumer()._client, topics)

    async def getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        """Fix 5: the partitions as they are now, not the live set a recovery may empty meanwhile."""
        snapshot = None if active_partitions is None else set(active_partitions)
        return await super().getmany(snapshot, timeout)

    async def seek_to_committed(self) -> Mapping[Any, int]:
        """Fix 5: every input partition back at its committed offset, or at its beginning when
        nothing is committed yet (aiokafka leaves those where the dropped records left them)."""
        return await self.call_thread(self._seek_to_committed_or_beginning)

    async def _seek_to_committed_or_beginning(self) -> Mapping[Any, int]:
        return await seek_to_committed_or_beginning(self._ensure_consumer(), skip=self.consumer._is_changelog_tp)


async def seek_to_committed_or_beginning(consumer: AIOKafkaConsumer, skip: Callable[[Any], bool]) -> dict[Any, int]:
    """Every assigned partition at its committed offset, or at its beginning when nothing (or 0)
    is committed, except those `skip` names; returns the committed offsets (None: none)."""
    committed = await consumer.seek_to_committed()
    uncommitted = [tp for tp, offset in committed.items() if not offset and not skip(tp)]
    if uncommitted:
        await consumer.seek_to_beginning(*uncommitted)
    return committed


class Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # partition -> (generation, offset) of a commit that failed: sent again at the next commit
        self._failed_commits: dict[TP, tuple[int, int]] = {}

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: TP) -> int | None:
        offset = super()._new_offset(tp)  # from the acks since the last commit
        generation, failed = self._failed_commits.pop(tp, (None, None))
        if failed is None or generation != self.app.consumer_generation_id:
            return offset  # a rebalance since: the partition was read again from the committed offset
        return failed if offset is None else max(offset, failed)

    async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        """Faust's, but the bookkeeping follows what the broker accepted (fix 4)."""
        if self.in_transaction:  # exactly-once commits go through the transaction manager; not used here
            return await super()._commit_offsets(offsets, start_new_transaction)
        assignment = self.assignment()
        committable = {tp: offset for tp, offset in offsets.items() if tp in assignment}
        if len(committable) < len(offsets):
            log.info("not committing revoked partitions (read again by their new owner): %s",
                     {tp: offset for tp, offset in offsets.items() if tp not in assignment})
        if not committable:
            return False
        generation = self.app.consumer_generation_id
        await self.app.producer.flush()  # the changelog first (fix 2), then the inputs' offsets
        crash_point("status.after_changelog_flush")
        if not await self._commit(committable):
            log.info("offset commit refused (the group is rebalancing); trying again: %s", committable)
            self._failed_commits.update({tp: (generation, offset) for tp, offset in committable.items()})
            return False
        self.app.tables.on_commit(committable)
        if generation == self.app.consumer_generation_id:  # else the rebalance's seek has set them
            self._committed_offset.update(committable)
        self.app.monitor.on_tp_commit(committable)
        return True

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        listed = await super().highwaters(*partitions)
        conf = self.app.conf  # the same TLS / SASL settings as Faust's own clients
        auth = faust_aiokafka.credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context)
        return await fetched_end_offsets(_bootstrap(self.transport.url), listed, **auth)


class DrainingBuffer(ProducerBuffer):
    in_flight = 0  # taken off the queue, not yet handed to aiokafka
    flush_timeout_s = 120.0

    async def _send_pending(self, fut: FutureMessage) -> None:
        self.in_flight += 1  # no await between the queue's get() and here
        try:
            await super()._send_pending(fut)
        finally:
            self.in_flight -= 1

    async def flush(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.flush_timeout_s
        while self.size or self.in_flight:
            if loop.time() > deadline:
                # Better no commit (the inputs are read again) than one for unwritten changes.
                raise TimeoutError(f"{self.size + self.in_flight} changelog records not sent after "
                                   f"{self.flush_timeout_s:g}s")
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                log.warning("still flushing %s changelog records", self.size + self.in_flight)


class Producer(faust_aiokafka.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.app.conf.producer_threaded:  # the threaded producer drains its own queue
            self.buffer = DrainingBuffer(loop=self.loop, beacon=self.beacon)
            self.buffer.app = self.app


class KeepingFlowControl(FlowControlEvent):
    def resume(self) -> None:
        if self.is_active():  # not suspended since the last resume: the buffers hold current messages
            self._resume.set()  # what resume() sets, without emptying the buffers
            return
        super().resume()


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Producer = Producer
    fetch_max_wait_ms = 1500  # Faust's own value; install() sets the one to use


def _bootstrap(urls: Iterable[Any]) -> str:
    return ",".join(f"{u.host}:{u.port or 9092}" for u in urls)


def install(app: Any, fetch_max_wait_ms: int = 1500) -> None:
    """Make `app` use this transport for its consumer and its producer, and keep its stream
    buffers on a resume that follows no suspend. Call it right after creating the app, before
    anything touches `app.consumer` or `app.producer`."""
    # Swap the class of the app's own instance: stream queues register with it when created.
    app.flow_control.__class__ = KeepingFlowControl
    app.transport = Transport(app.conf.broker_consumer, app)
    app.transport.fetch_max_wait_ms = fetch_max_wait_ms
    app.producer_transport = Transport(app.conf.broker_producer, app)
