"""The local Apache Kafka's pure parts: cluster ids its StorageTool accepts."""

from __future__ import annotations

import base64

from services.tools.brokers.apache_kafka import new_cluster_id


def test_cluster_ids_are_16_bytes_and_never_look_like_an_option():
    ids = [new_cluster_id() for _ in range(2000)]  # about 31 of these would start with "-" if allowed
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
