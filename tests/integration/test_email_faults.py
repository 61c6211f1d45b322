"""The email service as the demo runs it with `--fail-rate`: its real `build()` (eight lanes, the
SMTP mailer wrapped in the fault injector) against the SMTP sink and the real broker. Injected
transient failures go down the retry chain and every such mail is delivered once in the end;
recipients the SMTP server refuses (5xx) are dead letters at once; parallel sends really use
parallel SMTP connections."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from conftest import settings_for
from reading import delivered, read_topic, wait_until
from services.email.faults import FlakyMailer, injected_failures
from services.email.mailer import message_id_for
from services.email.service import build
from services.email.smtp_sink import SmtpSink
from services.email.tables import sent_emails
from services.runtime.codec import Codec, EmbeddedRegistry
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.envelope import Envelope, new_event_id
from services.runtime.events import OrderCreated, OrderLine
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.service_main import Runtime

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CODEC = Codec(EmbeddedRegistry())


def test_injected_faults_are_retried_and_refused_recipients_dead_lettered(kafka_bootstrap, private_group, tmp_path):
    group = private_group(retry_delays_s=(0.3, 0.3, 0.3), partitions=3, prefix="email-faults")
    with SmtpSink(tmp_path / "mail") as sink:
        settings = settings_for(kafka_bootstrap, smtp_port=sink.port, email_fail_rate=0.4, data_dir=tmp_path)
        engine = make_engine(f"sqlite:///{tmp_path / 'email.db'}")
        service = build(Runtime(settings, engine, CODEC, group))  # the real service, on a private group and topics
        service.metadata.create_all(engine)
        assert isinstance(service.deps.mailer, FlakyMailer) and service.controls.concurrency == 8
        consumer = ServiceConsumer(service, engine, make_consumer(settings, group.name), make_producer(settings),
                                   CODEC)
        stop = threading.Event()
        thread = threading.Thread(target=consumer.run, args=(stop, 0.1), daemon=True)
        thread.start()

        producer = make_producer(settings)
        sent: dict[str, tuple[str, str]] = {}  # order id -> (event id, recipient)
        for i in range(24):
            recipient = f"c{i}@example.invalid" if i % 8 == 7 else f"c{i}@example.com"
            event = OrderCreated(order_id=str(uuid.uuid4()), customer_id=f"c{i}", customer_email=recipient,
                                 currency="EUR", lines=[OrderLine(sku="SKU-1", quantity=1, unit_price=Decimal("5"))],
                                 total=Decimal("5"), created_at=datetime.now(UTC).replace(microsecond=0))
            envelope = Envelope(new_event_id(), "OrderCreated", OrderCreated.schema_version, event.order_id)
            producer.produce(group.inputs[0], key=event.order_id.encode(), headers=envelope.to_headers(),
                             value=CODEC.encode("OrderCreated", event.model_dump(), OrderCreated.schema_version))
            sent[event.order_id] = (envelope.event_id, recipient)
        delivered(producer)
        rejected = {o for o, (_, r) in sent.items() if r.endswith(".invalid")}
        flaky = {o for o, (e, _) in sent.items() if injected_failures(message_id_for(e), 0.4)}

        dlt = group.dlt_topic(group.inputs[0])
        wait_until(lambda: len(sink.messages()) == 21, what="21 delivered mails")
        dead = wait_until(lambda: (lambda d: d if len(d) == 3 else None)(read_topic(kafka_bootstrap, dlt)),
                          what="3 dead letters")
        stop.set()
        thread.join(20)
        mails = sink.messages()
        connections = len(service.deps.mailer.inner._idle)
        service.deps.mailer.close()

    assert {d.key for d in dead} == rejected
    for d in dead:
        assert d.headers["x-exception-type"] == "services.email.mailer.MailRejected"
        assert "550" in d.headers["x-exception-message"] and d.headers["x-reason"] == "not retryable"
    sent_ids = [m["Message-ID"] for m in mails]
    assert sorted(sent_ids) == sorted(message_id_for(e) for o, (e, _) in sent.items() if o not in rejected)
    retried = {m.key for n in (1, 2) for m in read_topic(kafka_bootstrap, group.retry_topic(group.inputs[0], n))}
    assert retried == flaky and flaky - rejected, "the injected faults went down the retry chain"
    assert read_topic(kafka_bootstrap, group.retry_topic(group.inputs[0], 3)) == []  # at most two faults each
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sent_emails)).scalar_one() == 21
    assert connections > 1, "sends for different orders used parallel SMTP connections"
    engine.dispose()
