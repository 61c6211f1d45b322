"""The order-status transport's flow control (streams/order_status/transport.py, fix 3).

Faust empties every stream buffer on `flow_control.resume()`. After a restore it calls
`resume()` a second time, while the flow is already running and the buffers hold messages
Faust counts as read; emptying them lost those events for good. The end-to-end case is
tests/integration/test_order_status_stream.py::test_killed_worker_restarts_and_answers_as_before.
"""

from __future__ import annotations

import asyncio

import faust
from mode.utils.queues import FlowControlQueue

from streams.order_status import transport


def _queue(flow_control) -> FlowControlQueue:
    return FlowControlQueue(maxsize=10, flow_control=flow_control, clear_on_resume=True)


def test_a_resume_without_a_suspend_keeps_what_the_buffers_hold() -> None:
    async def scenario() -> tuple[int, int, int]:
        flow = transport.KeepingFlowControl()
        queue = _queue(flow)
        flow.resume()  # the first resume (after the restore): from suspended, empties
        queue.put_nowait("fetched after the partitions were resumed")
        flow.resume()  # the second resume, after the seek: keeps them
        kept = queue.qsize()
        flow.suspend()  # a rebalance: what is buffered now is read again after the seek
        queue.put_nowait("fetched before the rebalance")
        flow.resume()
        return kept, queue.qsize(), flow._resume.is_set()

    kept, after_rebalance, resumed = asyncio.run(scenario())
    assert kept == 1
    assert after_rebalance == 0
    assert resumed


def test_the_plain_flow_control_would_have_dropped_them() -> None:
    """The behaviour the fix exists for, so this test fails if Faust ever changes it."""
    from mode.utils.queues import FlowControlEvent

    async def scenario() -> int:
        flow = FlowControlEvent()
        queue = _queue(flow)
        flow.resume()
        queue.put_nowait("fetched after the partitions were resumed")
        flow.resume()
        return queue.qsize()

    assert asyncio.run(scenario()) == 0


def test_install_gives_the_app_the_keeping_flow_control(tmp_path) -> None:
    app = faust.App("transport-test", broker="kafka://127.0.0.1:1", datadir=str(tmp_path), autodiscover=False)
    transport.install(app)
    assert isinstance(app.flow_control, transport.KeepingFlowControl)
    assert isinstance(app.transport, transport.Transport)


def test_the_worker_consumer_waits_on_fetches_as_configured(tmp_path) -> None:
    """Faust hard-codes a 1,500 ms fetch wait, which the embedded broker always waits out."""
    from streams.order_status.app import create_app

    app = create_app("127.0.0.1:9", data_dir=tmp_path, web_port=6066, store="memory://", fetch_wait_max_ms=40)

    async def build():  # aiokafka wants a running loop; nothing connects before start()
        thread = app.consumer._new_consumer_thread()
        return thread._create_worker_consumer(app.transport)

    consumer = asyncio.run(build())
    assert isinstance(app.consumer, transport.Consumer)
    assert consumer._fetch_max_wait_ms == 40


def test_the_rocksdb_store_opens_with_bounded_buffers(tmp_path) -> None:
    """Faust's RocksDB defaults (3 x 64 MB write buffers, a 2 GB block cache per partition) let
    the worker's memory climb by hundreds of MB before a flush; the table sets its own."""
    from streams.order_status.app import ROCKSDB_OPTIONS, create_app

    app = create_app("127.0.0.1:9", data_dir=tmp_path, web_port=6066, store="rocksdb://")
    table = app.tables["order-status"]
    options = table.data.rocksdb_options
    assert options.write_buffer_size == ROCKSDB_OPTIONS["write_buffer_size"] == 4 * 1024**2
    assert options.max_write_buffer_number == 2
    assert options.block_cache_size == 16 * 1024**2


# -- fix 4: the offset bookkeeping follows what the broker accepted ---------------------------

def _consumer_with_one_partition(tmp_path, commit_outcomes):
    """The worker's real consumer with its bookkeeping, one assigned partition, and a broker
    commit replaced by `commit_outcomes`: callables run in place of the commit request, each
    returning whether the broker accepted it (the broker itself is the e2e test's part)."""
    from faust.types import TP

    from streams.order_status.app import create_app

    app = create_app("127.0.0.1:9", data_dir=tmp_path, web_port=6066, store="memory://")
    consumer = app.consumer
    tp = TP("orders.created", 0)
    consumer.assignment = lambda: {tp}
    committed_at_broker: list[dict] = []

    async def commit(offsets):
        accepted = commit_outcomes.pop(0)(consumer, tp)
        if accepted:
            committed_at_broker.append(dict(offsets))
        return accepted

    async def flush():
        return None

    consumer._commit = commit
    app.producer.flush = flush
    app.topics.acks_enabled_for = lambda topic: True  # set when the agents subscribe, at start
    return app, consumer, tp, committed_at_broker


def _acked(consumer, tp, offset: int) -> bool:
    from faust.types.tuples import Message

    message = Message(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=tp)
    return consumer.ack(message)


def test_a_commit_overtaken_by_a_rebalance_does_not_hide_the_message_read_again(tmp_path) -> None:
    """The broker-failure run's case: the commit of offset 6 is refused because the group
    rebalanced, and the rebalance seeked the partition back to the broker's committed 5. The
    message at 5, read again, must be acked and committed; Faust's own bookkeeping said 6 and
    ignored that ack, leaving the partition one behind until its next event."""
    def refused_by_a_rebalance(consumer, tp):
        consumer.app.consumer_generation_id += 1  # what the rebalance's assignment does
        consumer._committed_offset[tp] = 5  # and its seek to the broker's committed offset
        return False

    app, consumer, tp, at_broker = _consumer_with_one_partition(
        tmp_path, [refused_by_a_rebalance, lambda consumer, tp: True])

    async def scenario():
        app.consumer_generation_id = 1
        consumer._committed_offset[tp] = 5
        assert _acked(consumer, tp, 5)
        assert not await consumer.commit()  # refused
        assert _acked(consumer, tp, 5), "the message read again after the seek is acked"
        assert await consumer.commit()

    asyncio.run(scenario())
    assert at_broker == [{tp: 6}]
    assert consumer._committed_offset[tp] == 6


def test_a_refused_commit_is_sent_again_without_a_new_ack(tmp_path) -> None:
    """Refused while the generation lasts (REBALANCE_IN_PROGRESS before the rejoin): the next
    commit sends it again, although no message was acked since."""
    app, consumer, tp, at_broker = _consumer_with_one_partition(
        tmp_path, [lambda consumer, tp: False, lambda consumer, tp: True])

    async def scenario():
        app.consumer_generation_id = 1
        consumer._committed_offset[tp] = 5
        assert _acked(consumer, tp, 5) and _acked(consumer, tp, 6)
        assert not await consumer.commit()
        assert consumer._committed_offset[tp] == 5, "a refused commit is not counted as done"
        assert await consumer.commit()

    asyncio.run(scenario())
    assert at_broker == [{tp: 7}]
    assert consumer._committed_offset[tp] == 7


def test_the_declared_worker_topics_are_the_ones_faust_creates(tmp_path) -> None:
    """`orderpipe up` and the deploy manifests create the worker's own topics before it joins
    (topology.STATUS_OWN_TOPICS); if a name or a setting differed, Faust would create another
    topic at start and the declared one would stay unused."""
    from services.runtime.topology import ORDER_STATUS_APP, STATUS_OWN_TOPICS
    from streams.order_status.app import create_app

    app = create_app("127.0.0.1:9", data_dir=tmp_path, web_port=6066, store="memory://")
    assert app.conf.id == ORDER_STATUS_APP
    changelog = app.tables["order-status"].changelog_topic
    sla = app.agents["fold-sla"].channel
    declared = {spec.name: spec for spec in STATUS_OWN_TOPICS}
    assert set(declared) == {changelog.get_topic_name(), sla.get_topic_name()}
    for topic, policy in ((changelog, "compact"), (sla, "delete")):
        spec = declared[topic.get_topic_name()]
        assert (spec.partitions, spec.cleanup_policy) == (topic.partitions, policy)
    assert changelog.compacting and not changelog.deleting


def test_the_worker_folds_the_event_topics_and_the_failure_notices_all_co_partitioned(tmp_path) -> None:
    """Not the groups' retry and dead-letter topics (the notices say what happened there), and
    every input with the table's partition count: a key's input, changelog and table_route
    partitions must be the same."""
    from services import registry
    from services.runtime.topology import FAILURES, STATUS_INPUTS
    from streams.order_status.app import create_app

    app = create_app("127.0.0.1:9", data_dir=tmp_path, web_port=6066, store="memory://")
    folded = set(app.agents["fold-order-events"].channel.topics)
    assert folded == {*STATUS_INPUTS, FAILURES}
    declared = {t.name: t.partitions for t in registry.all_topics()}
    assert {declared[t] for t in folded} == {app.tables["order-status"].partitions}


def test_the_worker_subscribes_only_after_its_topics_are_readable(tmp_path, monkeypatch, caplog) -> None:
    """Fix 6's wiring (the wait itself runs against real brokers in
    tests/integration/test_order_status_join.py): the subscription, which makes the consumer join
    its group, comes after the wait, with the same topics; a topic still missing is logged."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from streams.order_status.app import create_app

    app = create_app("127.0.0.1:9", data_dir=tmp_path, web_port=6066, store="memory://")
    calls: list[tuple[str, set[str]]] = []

    async def fake_wait(client, topics, timeout=transport.TOPICS_READY_TIMEOUT_S, interval=0.2):
        calls.append(("wait", set(topics)))
        return {"order-status-__assignor-__leader"}

    async def fake_subscribe(self, topics):
        calls.append(("subscribe", set(topics)))

    monkeypatch.setattr(transport, "wait_until_topics_readable", fake_wait)
    monkeypatch.setattr(faust_aiokafka.AIOKafkaConsumerThread, "subscribe", fake_subscribe)

    async def scenario() -> None:
        thread = app.consumer._new_consumer_thread()
        thread._consumer = object()  # what _ensure_consumer hands the wait (the fake ignores it)
        thread._ensure_consumer = lambda: type("C", (), {"_client": None})()
        thread.call_thread = lambda fn, *args, **kwargs: fn(*args, **kwargs)
        await thread.subscribe(["orders.created", "order-status-__assignor-__leader"])

    with caplog.at_level("WARNING", logger="orderpipe.order_status"):
        asyncio.run(scenario())
    topics = {"orders.created", "order-status-__assignor-__leader"}
    assert calls == [("wait", topics), ("subscribe", topics)]
    assert "order-status-__assignor-__leader" in caplog.text and "rebalance" in caplog.text
