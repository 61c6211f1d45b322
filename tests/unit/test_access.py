"""Least privilege, derived from the declarations (services/ops/access.py): each principal may do
what its service's code does, and is refused elsewhere. The same model is written to
deploy/k8s/base/kafka-users.yaml (Strimzi KafkaUser)."""

from __future__ import annotations

import pytest

from services import registry
from services.ops.access import principals

BY_NAME = {p.name: p for p in principals()}


@pytest.mark.parametrize(("user", "resource", "name", "operation"), [
    ("orderpipe-email", "topic", "orders.created", "Read"),
    ("orderpipe-email", "group", "email", "Read"),
    ("orderpipe-email", "topic", "email.sent", "Write"),
    ("orderpipe-email", "topic", "orders.created.email.retry.2", "Write"),
    ("orderpipe-email", "topic", "orders.created.email.dlt", "Write"),
    ("orderpipe-email", "topic", "orderpipe.failures", "Write"),       # a failure's notice
    ("orderpipe-invoice", "topic", "stock.reserved", "Read"),
    ("orderpipe-orders", "topic", "orders.created", "Write"),
    ("orderpipe-order-status", "topic", "orderpipe.failures", "Read"),
    ("orderpipe-order-status", "topic", "orders.status", "Write"),
    ("orderpipe-order-status", "topic", "order-status-order-status-changelog", "Create"),
    ("orderpipe-operators", "topic", "orders.created.email.dlt", "Read"),
    ("orderpipe-operators", "topic", "orders.created.email.retry.1", "Write"),
    ("orderpipe-operators", "topic", "orderpipe.audit", "Write"),
    ("orderpipe-operators", "group", "inventory", "Describe"),
])
def test_a_principal_may_do_what_its_service_does(user, resource, name, operation):
    assert BY_NAME[user].allows(resource, name, operation)


@pytest.mark.parametrize(("user", "resource", "name", "operation"), [
    ("orderpipe-email", "topic", "invoices.issued", "Read"),       # another service's events
    ("orderpipe-email", "topic", "orders.created", "Write"),       # only the orders relay writes orders
    ("orderpipe-email", "group", "inventory", "Read"),             # another group
    ("orderpipe-email", "topic", "orders.created.inventory.retry.1", "Read"),
    ("orderpipe-inventory", "topic", "orders.status", "Write"),
    ("orderpipe-orders", "topic", "orders.created", "Read"),
    ("orderpipe-order-status", "topic", "orders.created", "Write"),
    ("orderpipe-order-status", "topic", "orders.created.inventory.dlt", "Read"),  # it reads the notices instead
    ("orderpipe-email", "topic", "orderpipe.failures", "Read"),
    ("orderpipe-operators", "topic", "orders.created", "Write"),   # replays go to a retry tier, never the source
    ("orderpipe-operators", "group", "inventory", "Read"),         # sees offsets, never moves them
    ("orderpipe-operators", "topic", "stock.reserved", "Create"),
])
def test_a_principal_is_refused_what_its_service_does_not_do(user, resource, name, operation):
    assert not BY_NAME[user].allows(resource, name, operation)


def test_every_topic_has_a_writer_and_a_reader_among_the_principals():
    for topic in registry.all_topics():
        writers = [p.name for p in principals() if p.allows("topic", topic.name, "Write")]
        readers = [p.name for p in principals() if p.allows("topic", topic.name, "Read")]
        assert writers and readers, f"{topic.name}: writers {writers}, readers {readers}"
