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
