"""Stand-ins for confluent-kafka's Message, Producer and Consumer, for driving
`ServiceConsumer.handle_batch` without a broker; each records what it was asked to do."""

from __future__ import annotations


class FakeMessage:
    def __init__(self, topic: str, offset: int, value: bytes | None, headers: list[tuple[str, bytes]] | None,
                 key: bytes = b"o-1", partition: int = 0):
        self._topic, self._offset, self._value, self._headers = topic, offset, value, headers
        self._key, self._partition = key, partition

    def topic(self): return self._topic
    def partition(self): return self._partition
    def offset(self): return self._offset
    def key(self): return self._key
    def value(self): return self._value
    def headers(self): return self._headers
    def timestamp(self): return (1, 1_700_000_000_000)
    def error(self): return None


class FakeProducer:
    def __init__(self):
        self.produced: list[dict] = []

    def produce(self, topic, key=None, value=None, headers=None, **_):
        self.produced.append({"topic": topic, "key": key, "value": value, "headers": dict(headers or [])})

    def poll(self, _timeout=0):
        return 0

    def flush(self, _timeout=None):
        return 0


class FakeConsumer:
    def __init__(self):
        self.stored: list = []

    def store_offsets(self, offsets=None, **_):
        self.stored.extend(offsets)

    def assignment(self):
        return []
